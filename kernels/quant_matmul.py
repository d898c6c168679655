"""Weight-only quantized matmul: out = x @ dequant(w_q).T, dequantizing GGUF blocks in the kernel.

w_q holds a GGUF tensor's bytes exactly as stored: [N, (K // 32) * type_size] uint8, one row per
output feature, each row K // 32 blocks of 32 weights:

    Q8_0 (34 B): [d: fp16][q: 32 x int8]                 w = d * q
    Q4_0 (18 B): [d: fp16][16 B of nibbles]              w = d * (q - 8)
    Q4_1 (20 B): [d: fp16][m: fp16][16 B of nibbles]     w = d * q + m
    (nibbles: value i is the low nibble of byte i, value i + 16 the high nibble)

Decode streams the 4.5/5/8.5-bit weights from memory once and never materializes them in 16 bits.
Per block the kernel dots x with the block's small *integer* weights (exact in fp16/bf16, products
exact in the fp32 accumulator) and applies the block's scale afterwards in fp32:

    out[m, n] = sum_blocks( d * (x_blk . q_blk) [ + m * sum(x_blk) for Q4_1 ] )

Alignment: every type size is even, so each block, and each fp16 field in it, starts at an even
byte offset from the start of the tensor; but a row view or a memory-mapped file need not give
an aligned base, so fp16 fields are read as two bytes and reassembled (little-endian, as GGUF
stores them) and never through an fp16 pointer. Quant bytes are loaded as bytes too; the
compiler widens those loads where it can prove the alignment.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor

# qtype -> (kernel id, bytes per block of 32 weights)
_LAYOUTS = {"Q8_0": (0, 34), "Q4_0": (1, 18), "Q4_1": (2, 20)}
_QK = 32  # weights per block


@triton.jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, out_ptr, M, N, num_blocks,
    stride_xm, stride_xk, stride_wn, stride_om,
    QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCKS_PER_ITER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # [1, BLOCK_N]: each row's first block
    DTYPE = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # The K loop's order (blocks in increasing order, one scaled dot per block) depends on K only,
    # so an output row's value does not depend on M or on the tiling (batch invariance).
    for kb0 in range(0, num_blocks, BLOCKS_PER_ITER):
        for j in tl.static_range(BLOCKS_PER_ITER):  # unrolled: the blocks' loads are independent
            kb = kb0 + j
            blk = w_rows + kb * TYPE_SIZE
            # Blocks past K (the last step may overhang) read nothing and add exact zeros. The
            # test is written on tensors: the interpreter runs kb as a Python int, and a Python
            # bool in a load mask is not a mask it accepts.
            w_ok = n_ok[None, :] & (offs_n[None, :] * 0 + kb < num_blocks)
            x_ok = m_ok[:, None] & (offs_m[:, None] * 0 + kb < num_blocks)
            d_lo = tl.load(blk, mask=w_ok, other=0).to(tl.uint16)
            d_hi = tl.load(blk + 1, mask=w_ok, other=0).to(tl.uint16)
            d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)  # [1, BLOCK_N]
            if QTYPE == 0:  # Q8_0
                offs_k = tl.arange(0, 32)
                q = tl.load(blk + 2 + offs_k[:, None], mask=w_ok, other=0)  # [32, BLOCK_N] int8 bits
                if DTYPE == tl.float16:
                    # 0x6400 is 1024.0 in fp16 with an empty mantissa whose ulp is 1: OR-ing the
                    # biased byte (q + 128) into it gives 1024 + 128 + q exactly, with no int->float
                    # conversion instruction (those run at a quarter rate).
                    biased = (q ^ 0x80).to(tl.uint16)
                    w = ((biased | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - 1152.0).to(DTYPE)
                else:  # bf16 holds integers exactly only up to 256, too few for 1152 + q: convert
                    w = q.to(tl.int8, bitcast=True).to(DTYPE)
                xk = tl.load(x_rows + (kb * 32 + offs_k[None, :]) * stride_xk, mask=x_ok, other=0.0)
                acc += tl.dot(xk, w, input_precision=INPUT_PRECISION) * d
            else:  # Q4_0, Q4_1: 16 bytes, low nibbles are values 0..15, high nibbles 16..31
                offs_k = tl.arange(0, 16)
                packed = tl.load(blk + (2 if QTYPE == 1 else 4) + offs_k[:, None], mask=w_ok, other=0)
                lo = (packed & 0xF).to(tl.uint16)
                hi = (packed >> 4).to(tl.uint16)
                ZERO = 8.0 if QTYPE == 1 else 0.0  # Q4_0 stores q + 8
                if DTYPE == tl.float16:  # 1024 + q exactly, as above
                    w_lo = ((lo | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - (1024.0 + ZERO)).to(DTYPE)
                    w_hi = ((hi | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - (1024.0 + ZERO)).to(DTYPE)
                elif DTYPE == tl.bfloat16:  # 0x4300 is 128.0 in bf16, ulp 1: 128 + q exactly
                    w_lo = ((lo | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True) - (128.0 + ZERO)).to(DTYPE)
                    w_hi = ((hi | 0x4300).to(tl.uint16).to(tl.bfloat16, bitcast=True) - (128.0 + ZERO)).to(DTYPE)
                else:
                    w_lo = lo.to(tl.float32) - ZERO
                    w_hi = hi.to(tl.float32) - ZERO
                x_lo = tl.load(x_rows + (kb * 32 + offs_k[None, :]) * stride_xk, mask=x_ok, other=0.0)
                x_hi = tl.load(x_rows + (kb * 32 + 16 + offs_k[None, :]) * stride_xk, mask=x_ok, other=0.0)
                s = tl.dot(x_lo, w_lo, input_precision=INPUT_PRECISION)
                s = tl.dot(x_hi, w_hi, s, input_precision=INPUT_PRECISION)
                if QTYPE == 2:  # Q4_1: x . (d q + m) = d (x . q) + m sum(x)
                    m_lo = tl.load(blk + 2, mask=w_ok, other=0).to(tl.uint16)
                    m_hi = tl.load(blk + 3, mask=w_ok, other=0).to(tl.uint16)
                    mn = (m_lo | (m_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
                    # sum(x) as a dot with ones: the tensor cores have room to spare, while a
                    # row reduction would cost warp shuffles for every block.
                    ones = tl.full([16, BLOCK_N], 1.0, DTYPE)
                    x_sum = tl.dot(x_lo, ones, input_precision=INPUT_PRECISION)
                    x_sum = tl.dot(x_hi, ones, x_sum, input_precision=INPUT_PRECISION)
                    acc += s * d + x_sum * mn
                else:
                    acc += s * d
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    blocks_per_iter: int
    num_warps: int
    num_stages: int


def _config(qtype: str) -> _Config:
    """Launch settings: fixed per qtype, never a function of M (batch invariance).

    BLOCK_M = 16 is the smallest tl.dot tile, so decode (M = 1..16) is a single M tile: a GEMV
    that walks K once per N tile and reads each weight byte once; larger M adds M tiles (the
    grid's fast axis, so tiles that share weights run together and hit L2). BLOCK_N = 32 keeps
    N // 32 programs (128 for N = 4096) to fill the GPU at M = 1 without split-K. A K step
    covers 4 blocks (128 weights), so several independent loads are in flight per step; K // 32
    need not be a multiple of it. 8 blocks of 4-bit weights per step (same bytes as 4 of Q8_0)
    spill registers on sm_90 (fp16/bf16 Q4_1 and every fp32 variant), so 4 it is.
    """
    if qtype not in _LAYOUTS:
        raise ValueError(f"qtype must be one of {', '.join(_LAYOUTS)}, got {qtype!r}")
    return _Config(block_m=16, block_n=32, blocks_per_iter=4, num_warps=4,
                   num_stages=3)


def _input_precision(dtype: torch.dtype) -> str:
    # The weights are small integers (exact in any format), but fp32 activations would be
    # rounded to tf32 by the default: fp32 means fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_inputs(x: torch.Tensor, w_q: torch.Tensor, qtype: str, out: torch.Tensor | None) -> int:
    if qtype not in _LAYOUTS:
        raise ValueError(f"qtype must be one of {', '.join(_LAYOUTS)}, got {qtype!r}")
    type_size = _LAYOUTS[qtype][1]
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2)
    check_tensor("w_q", w_q, dtype=torch.uint8, ndim=2, device=x.device, last_dim_contiguous=True)
    if w_q.shape[1] % type_size:
        raise ValueError(f"w_q rows must be whole {qtype} blocks of {type_size} bytes, got {w_q.shape[1]} bytes")
    k = w_q.shape[1] // type_size * _QK
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns but w_q holds {k} weights per row ({qtype})")
    if out is not None:
        check_tensor("out", out, dtype=x.dtype, shape=(x.shape[0], w_q.shape[0]), device=x.device,
                     last_dim_contiguous=True)
    return type_size


def quant_matmul(x: torch.Tensor, w_q: torch.Tensor, qtype: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ W.T with W [N, K] dequantized from GGUF blocks inside the kernel.

    x [M, K] fp32/fp16/bf16 (any strides); w_q uint8 [N, (K // 32) * type_size], the GGUF tensor's
    bytes (rows may be strided, bytes within a row contiguous); qtype "Q8_0", "Q4_0" or "Q4_1".
    Returns out [M, N] in x's dtype; accumulation is fp32.
    """
    type_size = _check_inputs(x, w_q, qtype, out)
    m, n = x.shape[0], w_q.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.shape[1] == 0:
        return out.zero_()
    cfg = _config(qtype)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    _quant_matmul_kernel[grid](
        x, w_q, out, m, n, x.shape[1] // _QK,
        x.stride(0), x.stride(1), w_q.stride(0), out.stride(0),
        QTYPE=_LAYOUTS[qtype][0], TYPE_SIZE=type_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCKS_PER_ITER=cfg.blocks_per_iter, INPUT_PRECISION=_input_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def quant_matmul_reference(x: torch.Tensor, w_q: torch.Tensor, qtype: str) -> torch.Tensor:
    """x @ W.T in float64 with W from lockstep's GGUF dequantizer; returns float32 [M, N] on x's device."""
    from gguf import GGMLQuantizationType

    from lockstep.runtime.dequant import dequantize

    type_size = _LAYOUTS[qtype][1]
    n, k = w_q.shape[0], w_q.shape[1] // type_size * _QK
    raw = w_q.detach().cpu().contiguous().numpy().reshape(-1)
    w = dequantize(raw, GGMLQuantizationType[qtype], (n, k))
    return (x.detach().double() @ w.to(device=x.device, dtype=torch.float64).T).float()
