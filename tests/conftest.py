from __future__ import annotations

import os
from pathlib import Path

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton is
# imported anywhere. A GPU run (bench/gpu.sh) sets LOCKSTEP_TRITON_ON_GPU=1 to keep real kernels.
if os.environ.get("LOCKSTEP_TRITON_ON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, stated: no warning on every import
# The suite runs gRPC servers in-process and spawns subprocesses afterwards, the case gRPC's
# fork handlers are known to mishandle (see runtime/__init__.py). Set here too because a test
# module may import grpc before anything of lockstep. (The suite's occasional segfault on a
# native thread, first blamed on this, was the CPU thread pool's race: tests/test_thread_pool.py.)
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import pytest


def _row_independent_interpreter_dot() -> None:
    """Makes the interpreter's tl.dot give each output row the same bits wherever the row sits.

    The interpreter runs tl.dot on numpy's matmul, i.e. OpenBLAS, whose sgemm kernels (Haswell's,
    for one) round a row differently by its place in the tile. A GPU's MMA does not, and the
    kernels' batch-invariance tests (a row alone vs inside a batch) must test the kernels, not
    OpenBLAS. einsum's own loop reduces each output element in one order; the operands are
    widened to the accumulator's dtype first, which is exact.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        acc = d.data.dtype
        if acc != np.float32 or a.data.ndim != 2 or b.data.ndim != 2 or a.dtype.primitive_bitwidth == 8:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.einsum("mk,kn->mn", a.data.astype(acc), b.data.astype(acc))
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


_row_independent_interpreter_dot()


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model, fetched into lockstep's cache on first use (make test fetches it first)."""
    from lockstep.runtime.fetch import ensure_model

    return ensure_model(quiet=True)


@pytest.fixture(scope="session")
def default_model(default_model_path: Path):
    """The default model loaded once per test session (weights are read-only, engines share them)."""
    from lockstep.runtime.loader import load_model

    return load_model(default_model_path, quiet=True)


@pytest.fixture(scope="session")
def make_engine(default_model):
    """Builds a fresh engine (own KV arena and scheduler) over the shared default model."""
    from lockstep.runtime.config import EngineConfig
    from lockstep.runtime.engine import Engine

    def make(**config) -> Engine:
        config.setdefault("kv_memory_bytes", 64 << 20)  # ~1400 tokens: plenty, and cheap to zero
        return Engine(default_model, EngineConfig(**config))

    return make


@pytest.fixture
def threads():
    """Sets lockstep._core's pool thread count for one test, and restores it afterwards."""
    from lockstep import _core

    before = _core.get_num_threads()
    yield _core.set_num_threads
    _core.set_num_threads(before)
