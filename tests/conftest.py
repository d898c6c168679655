from __future__ import annotations

import os
from pathlib import Path

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton is
# imported anywhere. A GPU run (bench/gpu.sh) sets LOCKSTEP_TRITON_ON_GPU=1 to keep real kernels.
if os.environ.get("LOCKSTEP_TRITON_ON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, stated: no warning on every import

import pytest


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
