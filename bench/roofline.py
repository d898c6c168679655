"""The memory-bandwidth roofline of decode: how fast a step could be if it only had to read its
bytes once at the bandwidth this machine measurably delivers.

Bandwidth: a large copy (512 MiB, far beyond every cache) timed after a warm-up, counting bytes
read plus bytes written, median of a few runs; on the CPU with the benchmark's thread count, on
CUDA with events. Bytes a decode step reads (decode_bytes): every weight matrix once, in the
form the engine's matmuls read it (the GGUF blocks for lockstep's native CPU kernels and the
triton backend's quantized matmul, the float tensors otherwise), the norms, the vocabulary head
(the embedding, when tied) but not the embedding lookup's one row per token, plus each
sequence's K and V up to its position. Activations are not counted: they stay in cache.
"""
from __future__ import annotations

import statistics
import time

import torch

MATRICES = ("wqkv", "wo", "w_gate_up", "w_down")
SMALL_TENSORS = ("attn_norm", "ffn_norm", "final_norm", "bqkv", "rope_freqs")


def measure_bandwidth(device: str | torch.device = "cpu", threads: int | None = None, mib: int = 512,
                      repeats: int = 5) -> float:
    """GB/s of a large float32 copy on `device`, counting bytes read plus bytes written.

    torch's thread count is restored afterwards: an engine on lockstep's native CPU kernels keeps
    torch at one thread, because torch's OpenMP workers spin after each parallel region and take
    the cores its own pool needs (left at 2 here, a 5 ms decode step became 10 ms)."""
    device = torch.device(device)
    before = torch.get_num_threads()
    try:
        if device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        return _copy_bandwidth(device, mib, repeats)
    finally:
        torch.set_num_threads(before)


def _copy_bandwidth(device: torch.device, mib: int, repeats: int) -> float:
    src = torch.randn(mib << 18, device=device)  # mib MiB of float32
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: touches every page
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def weight_bytes_read(engine) -> int:
    """Bytes of weights one decode step reads, from the engine's memory plan (what it really holds)."""
    regions = engine.memory_plan.regions
    blocks: dict[str, int] = {}  # matrix name -> bytes of its GGUF blocks (all quant types)
    for name, region in regions.items():
        if name.startswith("weights.gguf."):
            matrix = name.rsplit(".", 1)[1]
            blocks[matrix] = blocks.get(matrix, 0) + region.nbytes
    total = sum(blocks.values())
    for name in (*MATRICES, *SMALL_TENSORS):
        if name not in blocks and f"weights.{name}" in regions:
            total += regions[f"weights.{name}"].nbytes
    if "lm_head" not in blocks:  # the head as floats: its own tensor, or the tied embedding
        total += regions["weights.lm_head"].nbytes if "weights.lm_head" in regions else regions["weights.embed"].nbytes
    return total


def kv_bytes_per_token(engine) -> int:
    """Bytes of K and V one cached token holds (every layer)."""
    return engine.model_config.kv_bytes_per_token(engine.kv.k.element_size())


def decode_bytes(engine, batch: int, mean_context: float) -> dict[str, float]:
    """Bytes one decode step of `batch` sequences at `mean_context` tokens of context reads."""
    weights = weight_bytes_read(engine)
    kv = batch * mean_context * kv_bytes_per_token(engine)
    return {"weights": weights, "kv": kv, "total": weights + kv}


def roofline_tok_s(engine, batch: int, mean_context: float, bandwidth_gbps: float) -> float:
    """The most tokens/s a decode of `batch` sequences could make at this bandwidth."""
    return batch * bandwidth_gbps * 1e9 / decode_bytes(engine, batch, mean_context)["total"]
