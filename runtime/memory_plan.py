"""The static memory plan: every byte the engine holds, decided and allocated at start-up.

Regions are weights, the KV arena (plus one scratch block that padded rows write), RoPE
tables and the step workspace (runtime/workspace.py). `lockstep plan` prints them. After
start-up nothing else is allocated for a step: on the CPU the native forward checks, when the
guard is on (EngineConfig.guard_memory), that every buffer it hands a kernel lies inside a
planned region (`MemoryPlan.check`); on CUDA, decode steps replay graphs whose memory was
taken at capture.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


class UnplannedMemoryError(RuntimeError):
    """A step touched a buffer outside the memory plan (a bug in lockstep, caught by the guard)."""


@dataclass
class Region:
    name: str
    nbytes: int
    shape: str
    dtype: str
    device: str
    count: int = 1  # tensors of this shape (per-layer weights are one row)


class MemoryPlan:
    def __init__(self) -> None:
        self.regions: "OrderedDict[str, Region]" = OrderedDict()
        self.capacity: dict[str, int] = {}
        self._spans: list[tuple[int, int]] = []
        self._seen: set[int] = set()

    def add(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        """Adds a tensor to region `name` (same-named tensors aggregate); a tensor added twice
        (tied embeddings) counts once."""
        if isinstance(tensor, np.ndarray):
            tensor = torch.from_numpy(tensor)
        ptr = tensor.data_ptr()
        if ptr in self._seen:
            return
        self._seen.add(ptr)
        nbytes = tensor.numel() * tensor.element_size()  # every planned tensor is contiguous
        span = (ptr, ptr + nbytes)
        region = self.regions.get(name)
        if region is None:
            self.regions[name] = Region(name, nbytes, "x".join(map(str, tensor.shape)) or "scalar",
                                        str(tensor.dtype).removeprefix("torch."), str(tensor.device))
        else:
            region.nbytes += nbytes
            region.count += 1
        if tensor.device.type == "cpu":
            self._spans.append(span)

    def add_span(self, name: str, start: int, end: int, shape: str, dtype: str, device: str) -> None:
        self.regions[name] = Region(name, end - start, shape, dtype, device)
        if device == "cpu":
            self._spans.append((start, end))

    def add_opaque(self, name: str, nbytes: int, shape: str, device: str) -> None:
        """A region known by size only (a CUDA graph memory pool)."""
        self.regions[name] = Region(name, nbytes, shape, "mixed", device)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.regions.values())

    def owns(self, array: np.ndarray) -> bool:
        """Whether all of `array`'s memory lies inside one planned host region."""
        lo = array.__array_interface__["data"][0]
        hi = lo + max(1, array.nbytes)
        return any(start <= lo and hi <= end for start, end in self._spans)

    def check(self, op: str, arrays: tuple) -> None:
        for a in arrays:
            if isinstance(a, np.ndarray) and a.size and not self.owns(a):
                raise UnplannedMemoryError(f"{op}: a {a.dtype} buffer of shape {a.shape} is not in the memory plan")

    def format(self) -> str:
        rows = [("region", "bytes", "shape", "dtype", "device")]
        for r in self.regions.values():
            shape = r.shape if r.count == 1 else f"{r.count} x {r.shape}"
            rows.append((r.name, human_bytes(r.nbytes), shape, r.dtype, r.device))
        rows.append(("total", human_bytes(self.total_bytes), "", "", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


MATRICES = ("wqkv", "wo", "w_gate_up", "w_down")


def build_memory_plan(weights, blocks, kv, rope: tuple[torch.Tensor, torch.Tensor], workspace,
                      max_num_seqs: int) -> MemoryPlan:
    """The plan of what an engine allocated: ModelWeights, the GGUF blocks its matmuls read
    (QuantizedWeights or None), the KVCache, the RoPE tables and the StepWorkspace."""
    plan = MemoryPlan()
    if blocks is not None:  # first, so float rows the native kernel reads in place count as weights.gguf
        for layer in blocks.layers:
            for name in MATRICES:
                matrix = getattr(layer, name)
                if matrix is not None:
                    plan.add(f"weights.gguf.{matrix.qtype.lower()}.{name}", matrix.blocks)
        if blocks.lm_head is not None:
            plan.add(f"weights.gguf.{blocks.lm_head.qtype.lower()}.lm_head", blocks.lm_head.blocks)
        if blocks.embed is not None and weights.embed is None:  # a tied table is counted once, as the head
            plan.add(f"weights.gguf.{blocks.embed.qtype.lower()}.embed", blocks.embed.blocks)
    if weights.embed is not None:
        plan.add("weights.embed", weights.embed)
    if weights.lm_head is not None:
        plan.add("weights.lm_head", weights.lm_head)
    plan.add("weights.final_norm", weights.final_norm)
    for layer in weights.layers:
        for name in ("attn_norm", "ffn_norm", "bqkv", *MATRICES):
            tensor = getattr(layer, name)
            if tensor is not None:
                plan.add(f"weights.{name}", tensor)
    if weights.rope_freqs is not None:
        plan.add("weights.rope_freqs", weights.rope_freqs)
    plan.add("kv.k", kv.k)
    plan.add("kv.v", kv.v)
    plan.add("rope.cos", rope[0])
    plan.add("rope.sin", rope[1])
    for name, arena in workspace.arenas:
        start, end = arena.span()
        plan.add_span(name, start, end, f"{len(arena.specs)} buffers", "mixed", str(arena.device))
    plan.capacity = {
        "kv_blocks": kv.num_blocks, "block_size": kv.block_size, "kv_tokens": kv.capacity_tokens,
        "max_num_seqs": max_num_seqs, "scratch_blocks": 1,
        "workspace_rows": workspace.rows, "workspace_seqs": workspace.seqs,
        "max_blocks_per_seq": workspace.max_blocks,
    }
    return plan
