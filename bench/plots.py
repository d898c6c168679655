"""PNG plots of benchmark results, drawn with matplotlib's non-interactive Agg backend (no
display needed): latency CDFs, a rate against batch size or concurrency, and % of roofline."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from .stats import cdf  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing drawn (every sample empty): no legend, no warning
        ax.legend(fontsize=8)


def latency_cdf(path: Path, series_ms: dict[str, list[float]], title: str, xlabel: str = "latency (ms)") -> Path:
    """One empirical CDF line per series (e.g. TTFT at each concurrency)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, values in series_ms.items():
        if values:
            xs, ys = cdf(values)
            ax.step(xs, ys, where="post", label=f"{label} (n={len(values)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples ≤ x")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def rate_plot(path: Path, series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str,
              ylabel: str, log_x: bool = True) -> Path:
    """A rate (tok/s, branches/s) against batch size or concurrency, one line per series."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if log_x:
        ax.set_xscale("log", base=2)
        # 1, 2, 4 rather than 2^0, 2^1 (or 1.0, 2.0)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def bars(path: Path, values: dict[str, float], title: str, xlabel: str, fmt: str = "%.0f",
         xlim: float | None = None) -> Path:
    """One horizontal bar per label (a runtime, a batch size), its value printed beside it."""
    fig, ax = plt.subplots(figsize=(7.2, 0.6 * len(values) + 1.6))
    labels = list(values)
    drawn = ax.barh(labels, [values[k] for k in labels], color="#4a7fb5")
    ax.bar_label(drawn, fmt=fmt, padding=3, fontsize=8)
    ax.set_xlim(0, max(xlim or 0.0, *values.values()) * 1.15)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.invert_yaxis()
    return _save(fig, path)


def roofline_bars(path: Path, percents: dict[str, float], title: str) -> Path:
    """Decode as a % of the memory-bandwidth limit, one bar per runtime or batch size."""
    return bars(path, percents, title, "% of the roofline: bytes read per token ÷ measured bandwidth",
                fmt="%.0f%%", xlim=100.0)
