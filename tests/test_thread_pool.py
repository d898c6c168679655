"""The native thread pool (cpp/cpu/thread_pool.cpp) under stress, built here from its source.

Every CPU kernel runs its chunks on this pool, a few hundred jobs per decode step. A race in
how workers claim chunks once let run() return while a worker still ran a chunk of the
caller's (by then destroyed) job: a segfault on a native thread once in a few full test runs,
never in a focused test. The stress program (tests/native/thread_pool_stress.cpp) runs
hundreds of thousands of short jobs and checks after each that every chunk ran exactly once;
the old code failed it in every run, at every thread count tried.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "tests" / "native" / "thread_pool_stress.cpp", ROOT / "cpp" / "cpu" / "thread_pool.cpp"]


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def stress_binary(tmp_path_factory) -> Path:
    cxx = compiler()
    if cxx is None:
        reason = "no C++ compiler (c++, g++, clang++ or $CXX) to build the thread pool stress test"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    binary = tmp_path_factory.mktemp("thread_pool") / "thread_pool_stress"
    cmd = [cxx, "-O2", "-std=c++17", f"-I{ROOT / 'cpp'}", *map(str, SOURCES), "-o", str(binary), "-pthread"]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(cmd)} failed:\n{built.stderr}"
    return binary


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_every_chunk_runs_once_and_finishes_before_run_returns(stress_binary, threads) -> None:
    # More threads than this machine's 2 cores on purpose: descheduled workers widen the windows.
    result = subprocess.run([str(stress_binary), "1000000", str(threads)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (
        f"thread pool stress on {threads} threads exited {result.returncode} "
        f"(-11 is a segfault on a worker):\n{result.stdout}{result.stderr}")
    assert "0 chunks not run exactly once" in result.stdout, result.stdout
