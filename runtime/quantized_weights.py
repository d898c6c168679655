"""Linear layers kept as the GGUF file stores them, for kernels that dequantize in-kernel.

The triton backend's quantized matmul (kernels/quant_matmul.py) reads Q8_0/Q4_0/Q4_1 blocks
straight from memory, so a decode step streams 4.5-8.5 bits per weight instead of 16 or 32.
This module lifts those blocks out of a GGUF in the layout the forward wants: Q, K and V rows
stacked into one matrix and gate and up into another, the same fusion as weights.assemble.

A row of a quantized matrix is a whole number of blocks along the input dimension, so stacking
matrices and permuting rows (llama.cpp's Q/K interleave) work on the raw bytes. A fused matrix
whose parts are stored in different types, or in a type the kernel lacks, stays dense: the
forward then uses the float weights for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import ModelConfig
from .weights import ModelWeights

# GGUF types the quantized matmul kernels read, with the bytes of one block of 32 weights.
KERNEL_QTYPES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


@dataclass
class QuantizedMatrix:
    qtype: str  # one of KERNEL_QTYPES, or "F32" for float rows (the native CPU kernel reads those too)
    blocks: torch.Tensor  # uint8 [rows, (cols // 32) * block bytes], as stored in the file
    # The numpy view the native CPU kernel takes, made once: a decode step makes ~120 matmul calls.
    _array: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def rows(self) -> int:
        return self.blocks.shape[0]

    def numpy(self) -> np.ndarray:
        if self._array is None:
            self._array = self.blocks.numpy()
        return self._array

    def to(self, device: torch.device | str) -> QuantizedMatrix:
        return QuantizedMatrix(self.qtype, self.blocks.to(device))


@dataclass
class QuantizedLayer:
    wqkv: QuantizedMatrix | None
    wo: QuantizedMatrix | None
    w_gate_up: QuantizedMatrix | None
    w_down: QuantizedMatrix | None


@dataclass
class QuantizedWeights:
    layers: list[QuantizedLayer]
    lm_head: QuantizedMatrix | None
    # The token embedding's blocks (the lm_head object itself when tied): the native CPU forward
    # decodes only the rows a step looks up (_core.dequantize_rows) instead of a float table.
    embed: QuantizedMatrix | None = None

    def matrices(self) -> list[QuantizedMatrix | None]:
        out = [self.lm_head]
        for layer in self.layers:
            out += [layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down]
        return out

    def count(self) -> tuple[int, int]:
        """(quantized matrices, all matrices)."""
        found = self.matrices()
        return sum(m is not None for m in found), len(found)

    def nbytes(self) -> int:
        seen, total = set(), 0
        for m in self.matrices():
            if m is not None and m.blocks.data_ptr() not in seen:
                seen.add(m.blocks.data_ptr())
                total += m.blocks.numel()
        return total

    def to(self, device: torch.device | str) -> QuantizedWeights:
        move = lambda m: None if m is None else m.to(device)  # noqa: E731
        layers = [QuantizedLayer(*(move(getattr(layer, f)) for f in ("wqkv", "wo", "w_gate_up", "w_down")))
                  for layer in self.layers]
        lm_head = move(self.lm_head)
        return QuantizedWeights(layers, lm_head, lm_head if self.embed is self.lm_head else move(self.embed))


RawMatrix = Callable[[str], "tuple[str, torch.Tensor] | None"]


def assemble_quantized(config: ModelConfig, raw: RawMatrix) -> QuantizedWeights:
    """Fuses the blocks that `raw(canonical name)` gives ((qtype, uint8 rows) or None for a
    matrix the kernel cannot read) into the forward's layout, as weights.assemble does."""

    def fused(*names: str) -> QuantizedMatrix | None:
        parts = [raw(n) for n in names]
        if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
            return None
        return QuantizedMatrix(parts[0][0], torch.cat([p[1] for p in parts]).contiguous())

    layers = []
    for n in range(config.num_layers):
        name = lambda part: f"layers.{n}.{part}"  # noqa: E731
        layers.append(QuantizedLayer(
            wqkv=fused(name("q"), name("k"), name("v")), wo=fused(name("o")),
            w_gate_up=fused(name("gate"), name("up")), w_down=fused(name("down")),
        ))
    embed = fused("embed")
    return QuantizedWeights(layers, embed if config.tie_word_embeddings else fused("lm_head"), embed)


def load_quantized_gguf(path: Path, config: ModelConfig) -> QuantizedWeights:
    """The linear layers of a GGUF file whose types the kernel reads, as raw blocks."""
    import gguf

    from .gguf_loader import _load_index, _unpermute_rows, canonical_name

    index, _ = _load_index(path, None)
    tensors = {canonical_name(t.name): t for t in index.tensors}
    tensors.pop(None, None)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    unpermute = {"q": config.num_heads, "k": config.num_kv_heads} if config.arch in ("llama", "mistral") else {}

    def raw(name: str) -> tuple[str, torch.Tensor] | None:
        t = tensors[name]
        qtype = gguf.GGMLQuantizationType(t.qtype).name
        if qtype not in KERNEL_QTYPES:
            return None
        rows = t.shape[0]
        blocks = torch.from_numpy(np.array(data[t.offset:t.offset + t.nbytes])).view(rows, -1)
        heads = unpermute.get(name.rsplit(".", 1)[-1])
        return qtype, (_unpermute_rows(blocks, heads) if heads is not None else blocks)

    return assemble_quantized(config, raw)


def with_float_rows(blocks: QuantizedWeights | None, weights: ModelWeights) -> QuantizedWeights:
    """Every linear layer as rows the native CPU kernel reads: GGUF blocks where `blocks` has them,
    else the float32 weights' own bytes (no copy). One kernel then runs every matmul, so every
    matmul has the same fixed reduction order."""
    def rows(matrix: QuantizedMatrix | None, dense: torch.Tensor) -> QuantizedMatrix:
        if matrix is not None:
            return matrix
        return QuantizedMatrix("F32", dense.to(torch.float32).contiguous().view(torch.uint8))

    layers = []
    for n, dense in enumerate(weights.layers):
        have = blocks.layers[n] if blocks is not None else QuantizedLayer(None, None, None, None)
        layers.append(QuantizedLayer(*(rows(getattr(have, f), getattr(dense, f))
                                       for f in ("wqkv", "wo", "w_gate_up", "w_down"))))
    return QuantizedWeights(layers, rows(None if blocks is None else blocks.lm_head, weights.lm_head),
                            None if blocks is None else blocks.embed)


def blocked_names(blocks: QuantizedWeights | None, embedding: bool = False) -> frozenset[str]:
    """The weight-layout names (weights.assemble's) of every linear layer `blocks` holds, and
    with `embedding` the embedding table too, if it has its blocks."""
    if blocks is None:
        return frozenset()
    names = {f"layers.{n}.{f}" for n, layer in enumerate(blocks.layers)
             for f in ("wqkv", "wo", "w_gate_up", "w_down") if getattr(layer, f) is not None}
    names |= {"lm_head"} if blocks.lm_head is not None else set()
    names |= {"embed"} if embedding and blocks.embed is not None else set()
    return frozenset(names)
