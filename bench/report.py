"""What every `lockstep bench` mode writes: one JSON with the run's environment (machine,
device, versions, git commit, date) and results, one markdown table, and PNG plots (plots.py).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
# Packages whose versions decide a benchmark's figures; absent ones are reported as absent.
PACKAGES = ("lockstep", "torch", "triton", "numpy", "transformers", "llama_cpp_python", "vllm")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The commit of the lockstep checkout this code runs from, "-dirty" when it has uncommitted
    changes (the figures then belong to no commit), "unknown" for a wheel install."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return "cpu"


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def environment() -> dict[str, Any]:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "os": platform.platform(),
                        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
            "device": device_name(), "versions": versions(), "command": " ".join(sys.argv)}


def run_stamp() -> dict[str, str]:
    """When, and at which commit, a benchmark ran: the first keys of the standalone scripts' JSON."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit()}


def save_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def strict_json(value: Any) -> Any:
    """value with every non-finite float spelled as a string ("inf", "nan"): JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_report(out_dir: Path, mode: str, results: dict[str, Any], markdown: str) -> dict[str, Path]:
    """Writes <out_dir>/<mode>.json (environment + results) and <mode>.md; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"schema_version": SCHEMA_VERSION, "mode": mode, "environment": environment(), "results": results}
    paths = {"json": out_dir / f"{mode}.json", "markdown": out_dir / f"{mode}.md"}
    paths["json"].write_text(json.dumps(strict_json(record), indent=1, default=str, allow_nan=False) + "\n")
    env = record["environment"]
    header = (f"# lockstep bench {mode}\n\n{env['date']}, commit {env['git_commit']}, {env['machine']['cpu']} "
              f"({env['machine']['cores']} cores), device {env['device']}, torch {env['versions']['torch']}\n\n")
    paths["markdown"].write_text(header + markdown)
    return paths
