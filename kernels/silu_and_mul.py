"""SiLU-and-mul, the SwiGLU activation: out = silu(gate) * up, with gate_up = [gate | up].

    silu_and_mul(gate_up [T, 2F])[t, f] = silu(gate_up[t, f]) * gate_up[t, F + f],  silu(g) = g * sigmoid(g)

computed in float32 and rounded to the input dtype once. It is purely elementwise and bound by
memory: each program reads BLOCK_F gate values and BLOCK_F up values of one row and writes
BLOCK_F outputs. No reduction, so batch invariance holds trivially.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor

# 1024 elements over 4 warps is 8 per thread: one 128-bit load for 16-bit dtypes, and a tile
# small enough that a 1536-wide row (SmolLM2) is two programs rather than one mostly masked one.
BLOCK_F = 1024
NUM_WARPS = 4


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, F, in_row_stride, out_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 in a long prefill
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate_ptrs = gate_up_ptr + row * in_row_stride + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    # g / (1 + exp(-g)): for g -> -inf, exp overflows to inf and the quotient is -0, not NaN.
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate_up[:, :F]) * gate_up[:, F:] for gate_up [T, 2F] (fp32/fp16/bf16; rows may be strided).

    Returns out [T, F] in gate_up.dtype (allocated unless given).
    """
    check_tensor("gate_up", gate_up, dtype=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    num_tokens, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up's last dimension must be even (gate and up halves), got {width}")
    f = width // 2
    if out is None:
        out = torch.empty((num_tokens, f), dtype=gate_up.dtype, device=gate_up.device)
    else:
        check_tensor("out", out, dtype=gate_up.dtype, shape=(num_tokens, f), device=gate_up.device,
                     last_dim_contiguous=True)
    if num_tokens == 0 or f == 0:
        return out
    grid = (num_tokens, triton.cdiv(f, BLOCK_F))
    _silu_and_mul_kernel[grid](gate_up, out, f, gate_up.stride(0), out.stride(0), BLOCK=BLOCK_F,
                               num_warps=NUM_WARPS)
    return out


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The definition in float64; returns float64."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up
