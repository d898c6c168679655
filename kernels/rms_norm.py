"""RMSNorm, and RMSNorm with the residual add fused in.

    rms_norm(x)[t]                = (x[t] * rsqrt(mean(x[t]^2) + eps) * weight).to(x.dtype)
    fused_add_rms_norm(x, r)      : r[t] <- (r[t] + x[t]).to(x.dtype) in place; returns rms_norm(r)

Arithmetic follows HF's LlamaRMSNorm: the mean of squares, the rsqrt and the product with the
weight are all in float32, and the result is rounded to x.dtype once at the end.

One program normalizes one row, holding the whole row in registers: a row is read once (twice
counting the residual) and written once, which is all the traffic RMSNorm needs. The block size
and warp count depend on the hidden size only, so a row's reduction order, and hence its bits, is
the same whatever the batch size (batch invariance).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_dtype, check_tensor

# A row lives in registers. At 16384 (16 warps, 32 values a thread) the fused kernel needs ~95
# registers and does not spill; at 32768 it hits the 128-register cap of a 512-thread block and
# spills (the AOT test compiles the largest size). Larger rows would need a looped two-pass kernel,
# so the launcher refuses them rather than spilling silently. 16384 is the largest Llama hidden size.
MAX_HIDDEN = 16384


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, H, x_row_stride, res_row_stride, out_row_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 in a long prefill
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + row * res_row_stride + cols
        r = tl.load(res_ptrs, mask=mask, other=0.0)
        # The sum is rounded to the activation dtype before it is normalized, exactly as the torch
        # backend's `x = x + attn` then `rms_norm(x)`, so both backends normalize the same values.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(res_ptrs, x, mask=mask)
    xf = x.to(tl.float32)
    # Masked lanes are 0, so they add nothing; divide by the true H, not BLOCK_H.
    variance = tl.sum(xf * xf, axis=0) / H
    # rsqrt.approx is within ~2 ulp of fp32: far below the rounding to a 16-bit output.
    inv_rms = tl.rsqrt(variance + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = xf * inv_rms * w
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_config(hidden: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps) for a hidden size; a function of the hidden size only (batch invariance)."""
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden size must be in [1, {MAX_HIDDEN}] for the one-pass RMSNorm kernel, got {hidden}")
    block = triton.next_power_of_2(hidden)
    # About 16 values per thread: two 128-bit fp16 loads each, and few enough warps that a small
    # row does not leave most threads idle.
    num_warps = max(1, min(16, block // 512))
    return block, num_warps


def _check_common(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[int, int]:
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    num_tokens, hidden = x.shape
    check_tensor("weight", weight, dtype=FLOAT_DTYPES, shape=(hidden,), device=x.device, contiguous=True)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return num_tokens, hidden


def _check_out(out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    check_tensor("out", out, dtype=x.dtype, shape=tuple(x.shape), device=x.device, last_dim_contiguous=True)
    return out


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor) -> None:
    num_tokens, hidden = x.shape
    if num_tokens == 0:
        return
    block, num_warps = _launch_config(hidden)
    res = residual if residual is not None else x  # never read when HAS_RESIDUAL is False
    _rms_norm_kernel[(num_tokens,)](
        x, res, weight, out, hidden, x.stride(0), res.stride(0), out.stride(0), float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK_H=block, num_warps=num_warps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of each row of x [T, H] (fp32/fp16/bf16; rows may be strided) times weight [H].

    Returns out [T, H] in x.dtype (allocated unless given).
    """
    _check_common(x, weight, eps)
    out = _check_out(out, x)
    _launch(x, None, weight, eps, out)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x, in place and in x.dtype; returns (rms_norm(residual) * weight, residual).

    x and residual are [T, H] of one dtype (rows may be strided); out must not alias either.
    """
    _check_common(x, weight, eps)
    check_tensor("residual", residual, shape=tuple(x.shape), device=x.device, last_dim_contiguous=True)
    check_same_dtype(x=x, residual=residual)
    out = _check_out(out, x)
    if residual.numel() and out.data_ptr() == residual.data_ptr():
        raise ValueError("out must not alias residual: the kernel writes both")
    _launch(x, residual, weight, eps, out)
    return out, residual


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The definition in float64; returns float64."""
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed in float64, new residual in x.dtype); does not modify its inputs."""
    new_residual = (x.double() + residual.double()).to(x.dtype)
    return rms_norm_reference(new_residual, weight, eps), new_residual
