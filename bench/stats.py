"""Summary statistics for latency samples, named the way `vllm bench serve` names them, so the
figures of two runtimes compare key by key (mean_ttft_ms, median_ttft_ms, p99_ttft_ms, ...).

Percentiles interpolate linearly between closest ranks (numpy's default method), which is what
vLLM's benchmark uses too.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not len(values):
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values_s: Iterable[float]) -> dict[str, float | int | None]:
    """n, mean, std, min, p50, p90, p99 and max of seconds, in milliseconds (None when empty)."""
    ms = [1000.0 * v for v in values_s]
    if not ms:
        return {"n": 0, "mean": None, "std": None, "min": None, **{f"p{q}": None for q in PERCENTILES}, "max": None}
    return {"n": len(ms), "mean": float(np.mean(ms)), "std": float(np.std(ms)), "min": min(ms),
            **{f"p{q}": percentile(ms, q) for q in PERCENTILES}, "max": max(ms)}


def vllm_names(metric: str, values_s: Iterable[float]) -> dict[str, float | None]:
    """`vllm bench serve`'s keys for one latency metric (ttft, tpot, itl, e2el), in ms."""
    s = summary(values_s)
    out = {f"mean_{metric}_ms": s["mean"], f"median_{metric}_ms": s["p50"], f"std_{metric}_ms": s["std"]}
    out.update({f"p{q}_{metric}_ms": s[f"p{q}"] for q in PERCENTILES if q != 50})
    return out


def cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Points of the empirical CDF: sorted values and the fraction of samples at or below each."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]
