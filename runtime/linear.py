"""The linear layers of a forward, through whichever matmul the backend chose.

A backend asks for `linears(x, layer, "wqkv")`; this module decides where the weights come
from: GGUF blocks through a quantized kernel (the Triton one on a GPU, lockstep's native one
on the CPU), or float weights through torch's matmul. The models (model.py, triton_model.py)
then state only the architecture.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lockstep import _core

from .quantized_weights import QuantizedMatrix, QuantizedWeights
from .weights import ModelWeights

Matmul = Callable[[torch.Tensor, QuantizedMatrix], torch.Tensor]


class Linears:
    def __init__(self, weights: ModelWeights, blocks: QuantizedWeights | None = None,
                 matmul: Matmul | None = None) -> None:
        """`blocks` holds the matrices `matmul` reads; a matrix it lacks (None) uses torch on `weights`."""
        self.weights = weights
        self.blocks = blocks
        self.matmul = matmul

    def __call__(self, x: torch.Tensor, layer: int | None, name: str) -> torch.Tensor:
        """x @ W.T (+ bias) for layer `layer`'s matrix `name`, or the vocabulary head when layer is None."""
        if layer is None:
            dense, bias = self.weights.lm_head, None
            matrix = None if self.blocks is None else self.blocks.lm_head
        else:
            dense = getattr(self.weights.layers[layer], name)
            bias = self.weights.layers[layer].bqkv if name == "wqkv" else None
            matrix = None if self.blocks is None else getattr(self.blocks.layers[layer], name)
        if matrix is None:
            return F.linear(x, dense, bias)
        out = self.matmul(x, matrix)
        return out if bias is None else out.add_(bias)


def native_cpu_matmul(x: torch.Tensor, matrix: QuantizedMatrix) -> torch.Tensor:
    """x @ W.T on the CPU by lockstep._core.quant_matmul, reading W's GGUF blocks (or float rows)
    as stored; each output element is reduced in one fixed order, so a row's result does not
    depend on the batch around it or on the thread count (cpp/cpu/quant_matmul.cpp)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], matrix.rows, dtype=torch.float32)
    _core.quant_matmul(x.numpy(), matrix.numpy(), matrix.qtype, out.numpy())
    return out
