"""Kernel benchmarks on a GPU: correctness in bf16 against each kernel's torch reference, and
time against torch's own equivalent, as a fraction of ceilings measured in the same run.

    python bench/kernels.py --out $OUT            # on the GPU (bench/gpu.sh runs it)
    TRITON_INTERPRET=1 python bench/kernels.py --dry-run   # tiny sizes on the CPU: checks the script

Ceilings: device copy bandwidth (bytes read + bytes written by a large copy) and the bf16 matmul
rate. Each memory-bound kernel reports GB/s counting the bytes it must move at least once;
compute-bound ones report TFLOP/s.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Row:
    kernel: str
    shape: str
    ours_us: float
    peer: str
    peer_us: float
    metric: str  # "GB/s" or "TFLOP/s"
    ours_rate: float
    peer_rate: float
    ceiling_frac: float
    max_abs_err: float
    target: str = ""
    notes: list[str] = field(default_factory=list)


def bench(fn: Callable[[], object], dry_run: bool) -> float:
    """Median microseconds (CUDA events through triton's do_bench, after warm-up)."""
    if dry_run:
        fn()
        return float("nan")
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1000.0


def ceilings(device: str, dry_run: bool) -> dict[str, float]:
    n = (1 << 28) if not dry_run else (1 << 12)  # 512 MiB of bf16
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_us = bench(lambda: dst.copy_(src), dry_run)
    m = 8192 if not dry_run else 64
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_us = bench(lambda: a @ b, dry_run)
    return {"copy_GBps": 2 * src.numel() * 2 / (copy_us * 1e3), "bf16_TFLOPs": 2 * m ** 3 / (mm_us * 1e6)}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def paged_kv(batch: int, ctx: int, kv_heads: int, head_dim: int, block_size: int, dtype, device, gen):
    """A KV arena with each sequence's blocks shuffled over it, as a long-running server's are."""
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * blocks_per_seq
    k = torch.randn(num_blocks * block_size, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    perm = torch.randperm(num_blocks, device="cpu", generator=torch.Generator().manual_seed(0))
    tables = perm.view(batch, blocks_per_seq).to(device=device, dtype=torch.int32)
    lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    return k, v, tables, lens


def run(args) -> tuple[dict, list[Row]]:
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float16 if args.dry_run else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    small = args.dry_run
    ceil = ceilings(device, args.dry_run)
    bw = ceil["copy_GBps"]
    rows: list[Row] = []

    def gbps(nbytes: int, us: float) -> float:
        return nbytes / (us * 1e3)

    # RMSNorm
    from lockstep.kernels.rms_norm import rms_norm, rms_norm_reference

    t, h = (8, 64) if small else (4096, 4096)
    x = torch.randn(t, h, device=device, dtype=dtype, generator=gen)
    w = torch.randn(h, device=device, dtype=dtype, generator=gen)
    err = max_err(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    ours, peer = bench(lambda: rms_norm(x, w, 1e-5), small), bench(lambda: F.rms_norm(x, (h,), w, 1e-5), small)
    nbytes = 2 * x.numel() * x.element_size()
    rows.append(Row("rms_norm", f"{t}x{h}", ours, "F.rms_norm", peer, "GB/s", gbps(nbytes, ours),
                    gbps(nbytes, peer), gbps(nbytes, ours) / bw, err, "≥ 85% of bandwidth"))

    # Decode attention (Triton, and the CUDA C++ version)
    from lockstep.kernels.decode_attention import decode_attention, decode_attention_reference

    batch, ctx, hq, hkv, d, bs = (2, 40, 8, 2, 64, 16) if small else (32, 4096, 32, 8, 128, 16)
    k, v, tables, lens = paged_kv(batch, ctx, hkv, d, bs, dtype, device, gen)
    q = torch.randn(batch, hq, d, device=device, dtype=dtype, generator=gen)
    scale = d ** -0.5
    ref = decode_attention_reference(q, k, v, tables, lens, bs, scale)
    err = max_err(decode_attention(q, k, v, tables, lens, bs, scale), ref)
    ours = bench(lambda: decode_attention(q, k, v, tables, lens, bs, scale), small)
    kc = k.view(batch, -1, hkv, d)  # peer gets contiguous K/V (no paging), its best case
    qs, ks, vs = q.unsqueeze(2), kc.transpose(1, 2), v.view(batch, -1, hkv, d).transpose(1, 2)
    peer = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True), small)
    nbytes = 2 * batch * ctx * hkv * d * k.element_size()
    rows.append(Row("decode_attention", f"B{batch} ctx{ctx} {hq}/{hkv}x{d}", ours, "SDPA (contiguous KV)", peer,
                    "GB/s", gbps(nbytes, ours), gbps(nbytes, peer), gbps(nbytes, ours) / bw, err,
                    "≥ 80% of copy bandwidth"))
    if not small:
        try:
            from lockstep.kernels.cuda_decode_attention import cuda_decode_attention

            err_c = max_err(cuda_decode_attention(q, k, v, tables, lens, bs, scale), ref)
            cu = bench(lambda: cuda_decode_attention(q, k, v, tables, lens, bs, scale), small)
            rows.append(Row("decode_attention (CUDA C++)", rows[-1].shape, cu, "Triton decode_attention", ours,
                            "GB/s", gbps(nbytes, cu), gbps(nbytes, ours), gbps(nbytes, cu) / bw, err_c))
        except Exception as exc:  # reported, never hidden
            print(f"CUDA decode attention not measured: {exc}", file=sys.stderr)

    # Prefill attention at 4k
    from lockstep.kernels.prefill_attention import prefill_attention, prefill_attention_reference

    ctx, hq, hkv, d = (40, 4, 2, 64) if small else (4096, 32, 8, 128)
    k, v, tables, lens = paged_kv(1, ctx, hkv, d, bs, dtype, device, gen)
    q = torch.randn(ctx, hq, d, device=device, dtype=dtype, generator=gen)
    starts = torch.tensor([0, ctx], device=device, dtype=torch.int32)
    err = max_err(prefill_attention(q, k, v, tables, starts, lens, bs, scale),
                  prefill_attention_reference(q, k, v, tables, starts, lens, bs, scale))
    ours = bench(lambda: prefill_attention(q, k, v, tables, starts, lens, bs, scale), small)
    qs = q.transpose(0, 1).unsqueeze(0)
    kc = k.view(1, -1, hkv, d).transpose(1, 2)
    vc = v.view(1, -1, hkv, d).transpose(1, 2)
    peer = bench(lambda: F.scaled_dot_product_attention(qs, kc, vc, is_causal=True, scale=scale, enable_gqa=True),
                 small)
    flops = 2 * 2 * hq * d * ctx * ctx / 2
    rows.append(Row("prefill_attention", f"ctx{ctx} {hq}/{hkv}x{d}", ours, "SDPA flash (causal)", peer, "TFLOP/s",
                    flops / (ours * 1e6), flops / (peer * 1e6), flops / (ours * 1e6) / ceil["bf16_TFLOPs"], err,
                    "≥ torch SDPA flash"))

    # Quantized GEMV (4-bit), batch 1
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from lockstep.kernels.quant_matmul import quant_matmul, quant_matmul_reference

    n, kdim = (64, 128) if small else (14336, 4096)
    wf = np.random.default_rng(0).standard_normal((n, kdim), dtype=np.float32) * 0.02
    wq = torch.from_numpy(quantize(wf, GGMLQuantizationType.Q4_1)).to(device)
    x = torch.randn(1, kdim, device=device, dtype=dtype, generator=gen)
    err = max_err(quant_matmul(x, wq, "Q4_1"), quant_matmul_reference(x, wq, "Q4_1"))
    ours = bench(lambda: quant_matmul(x, wq, "Q4_1"), small)
    wd = torch.from_numpy(wf).to(device=device, dtype=dtype)
    peer = bench(lambda: x @ wd.t(), small)
    nbytes = wq.numel()
    rows.append(Row("quant_matmul Q4_1 (M=1)", f"{n}x{kdim}", ours, "bf16 matmul, dequantized", peer, "GB/s",
                    gbps(nbytes, ours), gbps(wd.numel() * wd.element_size(), peer), gbps(nbytes, ours) / bw, err,
                    "≥ 75% of bandwidth (quantized bytes)"))

    # Cascade attention: 64 branches on a 2k shared prefix vs one branch
    from lockstep.kernels.cascade_attention import cascade_attention, cascade_attention_reference

    branches, prefix, suffix, hq, hkv, d = (3, 32, 8, 4, 2, 64) if small else (64, 2048, 64, 32, 8, 128)
    suffix_blocks = math.ceil(suffix / bs)  # each branch owns whole blocks
    kp, vp, ptable, _ = paged_kv(1, prefix + branches * suffix_blocks * bs, hkv, d, bs, dtype, device, gen)
    flat = ptable.view(-1)
    prefix_table = flat[:prefix // bs].contiguous()
    suffix_tables = flat[prefix // bs:].view(branches, -1).contiguous()
    suffix_lens = torch.full((branches,), suffix, device=device, dtype=torch.int32)
    q = torch.randn(branches, hq, d, device=device, dtype=dtype, generator=gen)
    cascade_args = (q, kp, vp, prefix_table, prefix, suffix_tables, suffix_lens, bs, scale)
    err = max_err(cascade_attention(*cascade_args), cascade_attention_reference(*cascade_args))
    many = bench(lambda: cascade_attention(*cascade_args), small)
    one = bench(lambda: cascade_attention(q[:1], kp, vp, prefix_table, prefix, suffix_tables[:1], suffix_lens[:1],
                                          bs, scale), small)
    rows.append(Row("cascade_attention", f"{branches} branches, prefix {prefix}", many, "same kernel, 1 branch", one,
                    "x of 1 branch", many / one, 1.0, float("nan"), err, "step ≤ 2x one branch"))

    # Sampling: top-p 0.9 at temperature 0.8 over a Llama 3 vocabulary, against torch's sort-based way
    from lockstep.kernels.sampling import sample_tokens, sample_tokens_reference

    rows_n, vocab = (3, 1000) if small else (64, 128256)
    logits = torch.randn(rows_n, vocab, device=device, dtype=torch.float32, generator=gen) * 3
    per_row = lambda value, dt: torch.full((rows_n,), value, device=device, dtype=dt)  # noqa: E731
    sample_args = (logits, per_row(0.8, torch.float32), per_row(0, torch.int32), per_row(0.9, torch.float32),
                   per_row(0.0, torch.float32), per_row(7, torch.int64),
                   torch.arange(rows_n, device=device, dtype=torch.int64), per_row(0, torch.int64))
    tokens, _ = sample_tokens(*sample_args)
    ref_tokens, _ = sample_tokens_reference(*sample_args)
    mismatch = float((tokens.cpu() != ref_tokens.cpu()).float().mean())

    def torch_top_p() -> torch.Tensor:
        probs, ids = torch.sort(torch.softmax(logits / 0.8, dim=-1), dim=-1, descending=True)
        probs[(probs.cumsum(-1) - probs) >= 0.9] = 0.0
        return ids.gather(1, torch.multinomial(probs, 1))

    ours = bench(lambda: sample_tokens(*sample_args), small)
    peer = bench(torch_top_p, small)
    nbytes = logits.numel() * logits.element_size()
    rows.append(Row("sample_tokens top-p", f"{rows_n}x{vocab}", ours, "torch sort + multinomial", peer, "GB/s",
                    gbps(nbytes, ours), gbps(nbytes, peer), gbps(nbytes, ours) / bw, mismatch,
                    "faster than the sort", ["max err column: fraction of tokens differing from the reference sampler (sample_row)"]))

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "python": platform.python_version(), "ceilings": ceil,
            "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True).stdout.strip()}
    return meta, rows


def markdown(meta: dict, rows: list[Row]) -> str:
    lines = [f"Kernels on {meta['device']} ({meta['date']}, torch {meta['torch']}, triton {meta['triton']}); "
             f"copy bandwidth {meta['ceilings']['copy_GBps']:.0f} GB/s, bf16 matmul "
             f"{meta['ceilings']['bf16_TFLOPs']:.0f} TFLOP/s, measured in the same run.", "",
             "| kernel | shape | ours µs | peer | peer µs | ours | peer | of ceiling | max err | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.shape} | {r.ours_us:.1f} | {r.peer} | {r.peer_us:.1f} | "
                     f"{r.ours_rate:.2f} {r.metric} | {r.peer_rate:.2f} | {100 * r.ceiling_frac:.0f}% | "
                     f"{r.max_abs_err:.3g} | {r.target} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (under TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    meta, rows = run(args)
    table = markdown(meta, rows)
    print(table)
    if not args.dry_run:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1))
        (args.out / "kernels.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
