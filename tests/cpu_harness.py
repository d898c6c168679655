"""Shared pieces of the native CPU kernel tests (lockstep._core)."""
from __future__ import annotations

import numpy as np


def assert_bitwise_equal(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """float32 arrays with the same bits everywhere (-0.0 and 0.0 differ; NaN payloads count)."""
    differ = actual.view(np.uint32) != expected.view(np.uint32)
    if differ.any():
        where = np.argwhere(differ)
        i = tuple(int(v) for v in where[0])
        raise AssertionError(f"{what}: {len(where)} of {differ.size} elements differ in their bits; "
                             f"first at {i}: {actual[i]!r} vs {expected[i]!r}")
