"""CPU quantized matmul (lockstep._core.quant_matmul) on the default model's shapes, against torch's
fp32 F.linear on the same weights dequantized, with the memory bandwidth measured in the same run.

Shapes are SmolLM2-135M's linear layers as the GGUF stores them (Q4_1): the fused qkv (K=576 ->
N=960), o (576 -> 576), the fused gate_up (576 -> 3072) and down (1536 -> 576), plus the tied
Q8_0 output head (576 -> 49152). Each is timed at M = 1 (decode) and M = 100 (a prompt), with
1 and 2 threads.

Weights are read cold: each call takes the next of enough copies to fill 256 MiB, far beyond
the caches, as a decode step reading 97 MB of weights per token does. Rates:
  * GB/s: weight bytes the call must read once (quantized for ours, fp32 for torch) per second;
  * % copy bw: ours as a share of the copy bandwidth (512 MiB float32 copy with the same
    threads, bytes read + bytes written); a read-only stream can beat it, so the read
    bandwidth of a 512 MiB sum is printed too;
  * GFLOP/s: 2 M N K per second, the figure that matters once M is large;
  * max rel err: ours against a float64 F.linear on the dequantized weights, relative to the
    largest output.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_quant_matmul.py            # ~1 min
    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_quant_matmul.py --dry-run  # tiny, checks the script
    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_quant_matmul.py --isa avx512 avx2  # compare kernels
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from lockstep import _core

from lockstep.bench.report import cpu_name, run_stamp, save_json as save_result  # noqa: E402

# (name, qtype, N, K) of the default model's linear layers; 30 of each layer per token.
LAYERS = [("qkv", "Q4_1", 960, 576), ("o", "Q4_1", 576, 576), ("gate_up", "Q4_1", 3072, 576),
          ("down", "Q4_1", 576, 1536)]
HEAD = ("lm_head", "Q8_0", 49152, 576)
NUM_LAYERS = 30
COLD_BYTES = 256 << 20


@dataclass
class Row:
    layer: str
    qtype: str
    n: int
    k: int
    m: int
    threads: int
    isa: str
    weight_bytes: int
    ours_us: float
    ours_gbps: float
    pct_of_copy_bw: float
    ours_gflops: float
    torch_us: float
    torch_gbps: float
    torch_gflops: float
    speedup: float
    max_rel_err: float


def time_per_call(fn: Callable[[int], object], calls: int, repeats: int, warmup_s: float) -> float:
    """Median over `repeats` of the mean seconds per call, fn(i) being call i of a run of `calls`.

    The warm-up runs for warmup_s first: besides warming caches it brings back pool workers
    that have gone to sleep (they nap up to 16 ms, and short jobs do not wake them)."""
    end = time.perf_counter() + warmup_s
    i = 0
    while time.perf_counter() < end or i < 2:
        fn(i)
        i += 1
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def copy_bandwidth_gbps(threads: int, nbytes: int) -> float:
    """GB/s of a large float32 copy with `threads` torch threads, bytes read + bytes written."""
    torch.set_num_threads(threads)
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda i: dst.copy_(src), calls=3, repeats=3, warmup_s=0.0)
    return 2 * src.numel() * 4 / seconds / 1e9


def read_bandwidth_gbps(threads: int, nbytes: int) -> float:
    """GB/s of summing a large float32 tensor with `threads` torch threads: reads only, the
    traffic pattern of a matmul's weights, which can beat the copy's read + write rate."""
    torch.set_num_threads(threads)
    src = torch.randn(nbytes // 4)
    seconds = time_per_call(lambda i: src.sum(), calls=3, repeats=3, warmup_s=0.0)
    return src.numel() * 4 / seconds / 1e9


def bench_layer(name: str, qtype: str, n: int, k: int, m: int, threads: int, isa: str, bandwidth: float,
                cold_bytes: int, repeats: int, warmup_s: float, seed: int) -> Row:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)
    stored = np.ascontiguousarray(quantize(weights, GGMLQuantizationType[qtype])).view(np.uint8).reshape(n, -1)
    dense = torch.from_numpy(dequantize(stored, GGMLQuantizationType[qtype]).reshape(n, k).astype(np.float32))
    ours_w = [stored.copy() for _ in range(max(1, cold_bytes // stored.nbytes))]
    torch_w = [dense.clone() for _ in range(max(1, cold_bytes // (dense.numel() * 4)))]
    x = rng.standard_normal((m, k), dtype=np.float32)
    x_t = torch.from_numpy(x)
    out = np.empty((m, n), dtype=np.float32)

    _core.set_num_threads(threads)
    torch.set_num_threads(threads)
    _core.quant_matmul(x, stored, qtype, out, isa)
    expected = F.linear(x_t.double(), dense.double())
    max_rel_err = float((torch.from_numpy(out).double() - expected).abs().max() / expected.abs().max())

    calls = max(len(ours_w), 3 if m > 1 else 20)
    ours = time_per_call(lambda i: _core.quant_matmul(x, ours_w[i % len(ours_w)], qtype, out, isa), calls, repeats, warmup_s)
    calls = max(len(torch_w), 3 if m > 1 else 20)
    peer = time_per_call(lambda i: F.linear(x_t, torch_w[i % len(torch_w)]), calls, repeats, warmup_s)
    flops = 2 * m * n * k
    return Row(name, qtype, n, k, m, threads, isa, stored.nbytes, ours * 1e6, stored.nbytes / ours / 1e9,
               100 * stored.nbytes / ours / 1e9 / bandwidth, flops / ours / 1e9, peer * 1e6,
               dense.numel() * 4 / peer / 1e9, flops / peer / 1e9, peer / ours, max_rel_err)


def call_overhead_us() -> float:
    """Microseconds of one call too small to measure anything but the binding and dispatch."""
    x = np.random.default_rng(0).standard_normal((1, 32), dtype=np.float32)
    w = np.ascontiguousarray(quantize(x.repeat(4, axis=0), GGMLQuantizationType.Q4_1))
    out = np.empty((1, 4), np.float32)
    return 1e6 * time_per_call(lambda i: _core.quant_matmul(x, w, "Q4_1", out), 2000, 5, 0.01)


def markdown(rows: list[Row]) -> str:
    lines = ["| layer | qtype | N x K | M | threads | isa | ours us | GB/s | % copy bw | GFLOP/s | "
             "torch fp32 us | torch GB/s | torch GFLOP/s | speedup | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.layer} | {r.qtype} | {r.n}x{r.k} | {r.m} | {r.threads} | {r.isa} | {r.ours_us:.1f} | "
                     f"{r.ours_gbps:.1f} | {r.pct_of_copy_bw:.0f}% | {r.ours_gflops:.1f} | {r.torch_us:.1f} | "
                     f"{r.torch_gbps:.1f} | {r.torch_gflops:.1f} | {r.speedup:.2f}x | {r.max_rel_err:.1e} |")
    return "\n".join(lines)


def decode_summary(rows: list[Row], bandwidth: dict[int, float], read_bandwidth: dict[int, float]) -> list[dict]:
    """Per token at M = 1, for each thread count and isa: the time of all 121 matmuls (30 layers +
    head) and what it implies."""
    summary = []
    for threads in sorted(bandwidth):
        for isa in dict.fromkeys(r.isa for r in rows):
            at_m1 = {r.layer: r for r in rows if r.m == 1 and r.threads == threads and r.isa == isa}
            if set(at_m1) != {name for name, *_ in LAYERS} | {HEAD[0]}:
                continue
            seconds = (NUM_LAYERS * sum(at_m1[name].ours_us for name, *_ in LAYERS) + at_m1[HEAD[0]].ours_us) / 1e6
            nbytes = NUM_LAYERS * sum(at_m1[name].weight_bytes for name, *_ in LAYERS) + at_m1[HEAD[0]].weight_bytes
            summary.append({"threads": threads, "isa": isa, "matmul_ms_per_token": seconds * 1e3,
                            "matmul_only_tok_s": 1 / seconds, "weight_MB_per_token": nbytes / 1e6,
                            "pct_of_copy_bw": 100 * nbytes / seconds / 1e9 / bandwidth[threads],
                            "pct_of_read_bw": 100 * nbytes / seconds / 1e9 / read_bandwidth[threads]})
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes and few repeats: checks the script")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--isa", nargs="+", default=["auto"],
                        help="kernels to time: auto (what the engine runs), avx512, avx2, scalar")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_quant_matmul.json")
    args = parser.parse_args()

    features = _core.cpu_features()
    dry = args.dry_run
    cold_bytes = 1 << 20 if dry else COLD_BYTES
    repeats = 1 if dry else args.repeats
    warmup_s = 0.0 if dry else 0.1
    shapes = LAYERS + [HEAD]
    if dry:
        shapes = [(name, qtype, 64, 32 * (k // 576)) for name, qtype, _, k in shapes]
    print(f"{cpu_name()}, {features}, default threads {_core.get_num_threads()}", file=sys.stderr)

    big = 1 << 22 if dry else 512 << 20
    bandwidth = {t: copy_bandwidth_gbps(t, big) for t in args.threads}
    read_bandwidth = {t: read_bandwidth_gbps(t, big) for t in args.threads}
    rows = []
    for threads in args.threads:
        for m in args.m:
            for isa in args.isa:
                isa_run = features["auto_isa"] if isa == "auto" else isa
                for seed, (name, qtype, n, k) in enumerate(shapes):
                    rows.append(bench_layer(name, qtype, n, k, m, threads, isa_run, bandwidth[threads], cold_bytes,
                                            repeats, warmup_s, seed))
                    print(f"  {name} M={m} threads={threads} isa={isa_run}: {rows[-1].ours_us:.1f} us",
                          file=sys.stderr)
    overhead = call_overhead_us()
    summary = decode_summary(rows, bandwidth, read_bandwidth)

    print(markdown(rows))
    print()
    for t, gbps in bandwidth.items():
        print(f"memory bandwidth, {t} thread{'s' if t > 1 else ''}: copy {gbps:.1f} GB/s (read + write), "
              f"sum {read_bandwidth[t]:.1f} GB/s (read only)")
    print(f"call overhead (Python binding, checks, dispatch): {overhead:.2f} us")
    for s in summary:
        print(f"decode matmuls at {s['threads']} thread{'s' if s['threads'] > 1 else ''}, {s['isa']}: "
              f"{s['matmul_ms_per_token']:.2f} ms/token ({s['matmul_only_tok_s']:.0f} tok/s if nothing else ran), "
              f"{s['weight_MB_per_token']:.0f} MB at {s['pct_of_copy_bw']:.0f}% of copy bandwidth, "
              f"{s['pct_of_read_bw']:.0f}% of read bandwidth")
    result = {
        **run_stamp(),
        "machine": {"cpu": cpu_name(), "features": features, "python": platform.python_version(),
                    "torch": torch.__version__, "numpy": np.__version__},
        "dry_run": dry,
        "copy_bandwidth_GBps": bandwidth,
        "read_bandwidth_GBps": read_bandwidth,
        "call_overhead_us": overhead,
        "decode": summary,
        "rows": [asdict(r) for r in rows],
    }
    if not dry:
        save_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
