"""The wheel installs one namespace, `lockstep`, and nothing named `kernels` or `runtime` at the top."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_the_lockstep_namespace(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("lockstep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lockstep"}, tops
    assert "lockstep/runtime/engine.py" in names and "lockstep/kernels/__init__.py" in names
    assert any(n.startswith("lockstep/_core.") and n.endswith(".so") for n in names), names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lockstep = lockstep.runtime.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
