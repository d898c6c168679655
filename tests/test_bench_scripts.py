"""The GPU benchmark scripts run end to end on the CPU (--dry-run), so no device minute goes on a typo.

A dry run uses tiny shapes under the Triton interpreter and times nothing; what it proves is
that every kernel call, reference and table row in the script works.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def run_script(name: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / name), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_kernel_benchmark_dry_run() -> None:
    out = run_script("kernels.py")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| kernel")]
    kernels = {row.split("|")[1].strip() for row in rows}
    assert {"rms_norm", "decode_attention", "prefill_attention", "quant_matmul Q4_1 (M=1)",
            "cascade_attention", "sample_tokens top-p"} <= kernels, out
    for row in rows:  # the max error column: each kernel against its reference, at tiny sizes
        err = row.split("|")[9].strip()
        assert err == "nan" or float(err) < 5e-2, row


@pytest.mark.slow
def test_end_to_end_benchmark_dry_run() -> None:
    out = run_script("gpu_e2e.py")
    lines = [line for line in out.splitlines() if line.startswith("synthetic:")]
    assert [line.split()[1:3] for line in lines] == [["torch", "float32"], ["triton", "float32"], ["triton", "Q4_1"]]


def test_step_planner_benchmark_dry_run() -> None:
    """CPU-only and quick: the planner and its numpy peer agree (the script checks) and each size prints a row."""
    out = run_script("step_planner.py")
    rows = [line for line in out.splitlines() if line.startswith("| 4 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["20", "70"], out
    assert "empty plan" in out


def test_host_overhead_dry_run() -> None:
    """CPU-only and quick: every part of the host's step prints a row per batch, and the verdict prints.
    It times nothing that the test checks; it proves the timers wrap what Engine.step calls."""
    out = run_script("host_overhead.py")
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| 1 |", "| 4 |"))]
    parts = {(row[1].strip(), row[2].strip()) for row in rows}
    for batch in ("1", "4"):
        for part in ("Scheduler.schedule", "ProgramRunner.plan", "of which C++ planner", "sampler.sample",
                     "detokenizer", "rest of Engine.step", "host total (sum of parts)", "Engine.step, no timers"):
            assert (batch, part) in parts, out
    sampled = [line for line in out.splitlines() if line.startswith("| 1024 |")]
    assert [row.split("|")[2:4] for row in sampled] == [[" 1 ", " greedy "], [" 1 ", " top_p 0.9, T 0.8 "],
                                                        [" 4 ", " greedy "], [" 4 ", " top_p 0.9, T 0.8 "]], out
    assert "C++ step planner at batch 4" in out and "Whole host step at batch 4" in out, out
    assert "Step planning at batch 4" in out and "A server's observers (metrics and request log)" in out, out
    # The simulated device's table: overlap off and on with the replay, on with the replay holding
    # batch work to a target, and on with the full pass.
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 250 |")]
    assert [(row[2].strip(), row[3].strip()) for row in rows] == [
        ("off", "steady replay"), ("on", "steady replay"), ("on", "steady replay, batch held to a target"),
        ("on", "full pass")], out
    assert "Host time an asynchronous device waits for per decode step at batch 4" in out, out


def test_overlap_benchmark_dry_run() -> None:
    """CPU-only and quick: both modes print a row (the real figures need a GPU: bench/gpu.sh)."""
    out = run_script("overlap.py")
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| off |", "| on |"))]
    assert [row[1].strip() for row in rows] == ["off", "on"], out
    assert all(float(row[4]) > 0 and float(row[5]) > 0 for row in rows), out
    assert "Host time exposed per decode step with overlap" in out, out


def test_latency_benchmark_dry_run() -> None:
    """bench/latency.py end to end on a tiny synthetic model: both phases, the table and the
    batch-invariance check (the script exits non-zero if the interactive stream's tokens change)."""
    proc = subprocess.run([sys.executable, str(BENCH / "latency.py"), "--dry-run"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| alone |" in proc.stdout and "| beside 4 batch streams |" in proc.stdout, proc.stdout
    assert "same tokens alone and under load: True" in proc.stdout


@pytest.mark.slow
def test_gpu_script_bench_part_dry_run(tmp_path) -> None:
    """bench/gpu.sh's second part (lockstep bench offline on each model and weights, then a serve
    sweep against a real `lockstep serve`) runs its very commands on a tiny model on the CPU."""
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "LOCKSTEP": str(venv_bin / "lockstep"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "bench"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for path in ("offline-tiny-dense/offline.json", "offline-tiny-dense/offline_tok_s.png", "serve-tiny/serve.json",
                 "serve-tiny/serve_throughput.png"):
        assert (tmp_path / path).is_file(), path
    assert "== summary ==" in proc.stdout and "| concurrency | 1 |" in proc.stdout
