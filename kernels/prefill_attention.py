"""Causal GQA prefill attention over the paged KV cache, for a ragged batch of sequences.

Sequence b owns rows query_start[b]:query_start[b+1] of q (its q_len new tokens) and has
seq_lens[b] tokens of context in the cache, new tokens included (their K/V are written before
attention runs). Its query row i sits at position p = seq_lens[b] - q_len + i and attends to
keys 0..p, so a fresh prompt (no prefix), a chunk of a long prompt and an `append` to a live
sequence are the same call:

    out[row, h] = softmax_j(scale * q[row, h] . K[j, h // group]) @ V[.., h // group],  j <= p

FlashAttention-2 structure: a program owns BLOCK_M query rows of one sequence and one q head,
and walks the key blocks 0..(its last row's position) through the block table with an online
softmax in fp32. Key blocks every row of the tile fully sees run without a causal mask; only the
blocks on the diagonal are masked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_dtype, check_tensor

_LOG2E = math.log2(math.e)


@triton.jit
def _load(ptrs, mask):
    """tl.load with zeros where `mask` is off; `mask` None (a constexpr) loads with no mask at all."""
    if mask is None:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=mask, other=0.0)
    return tile


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr,
    num_seqs, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, VEC: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)

    # Which sequence owns this query tile. Sequence b's tiles are numbered from
    # query_start[b] // BLOCK_M + b: that gives each sequence at least cdiv(q_len, BLOCK_M)
    # numbers, is strictly increasing in b and needs no host-side prefix sum (no device->host
    # sync, graph-capturable). The grid has T // BLOCK_M + B tiles; binary-search the largest b
    # whose first tile is <= this one. lo/hi are explicit int32 scalars: num_seqs == 1 arrives
    # as a constexpr, and loop variables must not change type inside the loop.
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid
        else:
            hi = mid - 1
    b = lo

    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    m0 = (tile - (q_start // BLOCK_M + b)) * BLOCK_M
    if m0 < q_len:  # spare tile numbers (at most one per sequence) do nothing
        prefix = tl.load(seq_lens_ptr + b) - q_len
        offs_m = m0 + tl.arange(0, BLOCK_M)
        # Every tile is read and written d-major ([BLOCK_D, rows]) and transposed on chip, so
        # rows are the tensors' last dimension. With VEC > 1 (the launcher proved every row
        # 16-byte aligned) a thread moves VEC consecutive columns per instruction. Otherwise the
        # compiler may not vectorize, and its default would give each thread one column of many
        # rows: a 64-bit address per element, which does not fit in registers at these tile
        # sizes. Declaring the columns non-contiguous makes it spread threads over rows instead,
        # so a thread's columns share one row address plus immediate offsets.
        if VEC > 1:
            offs_d = tl.arange(0, BLOCK_D)
        else:
            offs_d = tl.max_contiguous(tl.arange(0, BLOCK_D), 1)
        row_ok = offs_m < q_len
        d_ok = offs_d < HEAD_DIM  # only used when HEAD_DIM < BLOCK_D: full rows load unmasked
        q_pos = prefix + offs_m
        rows = (q_start + offs_m).to(tl.int64)
        kv_head = head // GROUP
        q_head = q_ptr + head * stride_qh
        out_head = out_ptr + head * stride_oh
        k_head = k_ptr + kv_head * stride_kh
        v_head = v_ptr + kv_head * stride_vh
        q_rows = rows * stride_qt
        out_rows = rows * stride_ot
        if VEC > 1:
            q_head = tl.multiple_of(q_head, 16)  # bytes
            out_head = tl.multiple_of(out_head, 16)
            k_head = tl.multiple_of(k_head, 16)
            v_head = tl.multiple_of(v_head, 16)
            q_rows = tl.multiple_of(q_rows, VEC)  # elements
            out_rows = tl.multiple_of(out_rows, VEC)
        if HEAD_DIM == BLOCK_D:
            io_mask = row_ok[None, :]
        else:
            io_mask = row_ok[None, :] & d_ok[:, None]
        q = tl.trans(_load(q_head + q_rows[None, :] + offs_d[:, None], io_mask))
        table_row = block_tables_ptr + b.to(tl.int64) * stride_bt

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Keys 0..prefix + m0 are visible to every row of the tile: stage 0 walks the key blocks
        # wholly inside that range with no mask. Stage 1 walks the blocks that straddle the
        # diagonal, up to the tile's last real row, with the causal mask.
        kv_end = prefix + tl.minimum(m0 + BLOCK_M, q_len)
        full_end = ((prefix + m0 + 1) // BLOCK_N) * BLOCK_N
        for stage in tl.static_range(2):
            if stage == 0:
                lo_key = 0
                hi_key = full_end
            else:
                lo_key = full_end
                hi_key = kv_end
            for start in range(lo_key, hi_key, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                # Key j lives in slot block_tables[b, j // BLOCK_SIZE] * BLOCK_SIZE + j % BLOCK_SIZE.
                # Gathering per key keeps BLOCK_N independent of the cache's block size. Slots are
                # int64 because slot * stride overflows int32 in caches over 2**31 elements.
                key_ok = offs_n < kv_end
                if stage == 0:
                    block_ids = tl.load(table_row + offs_n // BLOCK_SIZE)
                else:
                    block_ids = tl.load(table_row + offs_n // BLOCK_SIZE, mask=key_ok, other=0)
                slots = block_ids.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
                k_rows = slots * stride_kt
                v_rows = slots * stride_vt
                if VEC > 1:
                    k_rows = tl.multiple_of(k_rows, VEC)
                    v_rows = tl.multiple_of(v_rows, VEC)
                # Stage 0 keys all exist; stage 1 masks the keys past the tile's last row (their
                # slots may hold anything, and p = 0 times a NaN in V would still be NaN).
                if stage == 0 and HEAD_DIM == BLOCK_D:  # the common case loads with no mask at all
                    kv_mask = None
                elif stage == 0:
                    kv_mask = d_ok[:, None]
                elif HEAD_DIM == BLOCK_D:
                    kv_mask = key_ok[None, :]
                else:
                    kv_mask = key_ok[None, :] & d_ok[:, None]
                kt = _load(k_head + k_rows[None, :] + offs_d[:, None], kv_mask)
                qk = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale  # log2 units: exp2 below
                if stage == 1:
                    visible = (offs_n[None, :] <= q_pos[:, None]) & key_ok[None, :]
                    qk = tl.where(visible, qk, float("-inf"))
                # Every row sees key 0 in its first block, so m_new is finite from then on and
                # exp2(m_i - m_new) is never NaN; a block a row cannot see gives it p = 0 and
                # alpha = 1 exactly, so extra diagonal blocks leave the row's result unchanged.
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(qk - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.trans(_load(v_head + v_rows[None, :] + offs_d[:, None], kv_mask))
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
                m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_head + out_rows[None, :] + offs_d[:, None], tl.trans(out.to(out_ptr.dtype.element_ty)),
                 mask=io_mask)


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _config(dtype: torch.dtype, head_dim: int) -> _Config:
    """Tile sizes: a function of dtype and head_dim only, never of the batch.

    A query row's arithmetic (which key blocks, in which order, with which dot shapes) then does
    not depend on how the prompt was chunked or what else is in the batch (batch invariance):
    key blocks are aligned to absolute key positions, and blocks past a row's diagonal are exact
    no-ops for it. 128-row query tiles are FlashAttention-2's choice for 16-bit inputs; the key
    block and warp counts are the largest that compile without register spills on sm_80 and
    sm_90 with aligned rows (VEC > 1) and without (VEC == 1): at head_dim 128, 195 / 160
    registers on sm_80 / sm_90 aligned, 168 / 128 unaligned; 8 warps because 4 would hold
    128 x 128 fp32 accumulators in 128 registers a thread. fp32 runs tf32x3 dots whose operands
    take twice the registers, hence its small tiles: it is the correctness path, not the fast one.
    """
    if not 1 <= head_dim <= 128:
        raise ValueError(f"head_dim must be in 1..128 (Llama-family heads are 64 or 128), got {head_dim}")
    if dtype == torch.float32:
        return _Config(block_m=16, block_n=32, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return _Config(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return _Config(block_m=128, block_n=32, num_warps=8, num_stages=3)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16


def _vec(*tensors: torch.Tensor) -> int:
    """Elements per 16-byte vector if every row of every tensor starts on a 16-byte boundary, else 1.

    The kernel needs to know at compile time whether it may vectorize (it lays its loads out
    differently when it may not), and it promises the compiler that alignment for the row and head
    offsets it computes, which Triton's own specialization on argument values cannot see.
    """
    vec = 16 // tensors[0].element_size()
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(0) % vec == 0 and t.stride(1) % vec == 0 for t in tensors)
    return vec if aligned else 1


def _input_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            query_start: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
            out: torch.Tensor, cfg: _Config) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    grid = (num_tokens // cfg.block_m + num_seqs, num_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start, seq_lens,
        num_seqs, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=num_heads // k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        # fp32 means fp32: plain tf32 would keep 10 mantissa bits of fp32 inputs on the GPU;
        # tf32x3 (three tf32 products) is as accurate as fp32 FMAs and keeps tensor cores.
        INPUT_PRECISION=_input_precision(q.dtype), VEC=_vec(q, k_cache, v_cache, out),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _check_inputs(q, k_cache, v_cache, block_tables, query_start, seq_lens, block_size, scale, out) -> None:
    check_tensor("q", q, dtype=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    device = q.device
    num_tokens, num_heads, head_dim = q.shape
    if not 1 <= head_dim <= 128:
        raise ValueError(f"q's head_dim must be in 1..128 (Llama-family heads are 64 or 128), got {head_dim}")
    check_tensor("k_cache", k_cache, dtype=FLOAT_DTYPES, shape=(None, None, head_dim), device=device,
                 last_dim_contiguous=True)
    check_tensor("v_cache", v_cache, dtype=FLOAT_DTYPES, shape=tuple(k_cache.shape), device=device,
                 last_dim_contiguous=True)
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    num_kv_heads = k_cache.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q's {num_heads} heads must be a multiple of k_cache's {num_kv_heads} kv heads")
    check_tensor("block_tables", block_tables, dtype=torch.int32, ndim=2, device=device, last_dim_contiguous=True)
    num_seqs = block_tables.shape[0]
    check_tensor("query_start", query_start, dtype=torch.int32, shape=(num_seqs + 1,), device=device,
                 contiguous=True)
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, shape=(num_seqs,), device=device, contiguous=True)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if out is not None:
        check_tensor("out", out, dtype=q.dtype, shape=tuple(q.shape), device=device, last_dim_contiguous=True)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention of a ragged batch's new tokens over their paged context.

    q [T, Hq, D]; k_cache, v_cache [num_slots, Hkv, D] (same dtype as q, Hq % Hkv == 0);
    block_tables [B, max_blocks] int32; query_start [B+1] int32, cumulative (sequence b owns
    rows query_start[b]:query_start[b+1]); seq_lens [B] int32, context length including the new
    tokens (>= the sequence's q_len; its table must cover seq_lens[b] slots). Row i of sequence b
    attends to keys 0..seq_lens[b] - q_len + i. Returns out [T, Hq, D] in q's dtype; every row
    that belongs to a sequence is written exactly once.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, query_start, seq_lens, block_size, scale, out)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return _launch(q, k_cache, v_cache, block_tables, query_start, seq_lens, block_size, float(scale), out,
                   _config(q.dtype, q.shape[2]))


def prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
                                block_size: int, scale: float) -> torch.Tensor:
    """Per-sequence float64 attention over the gathered context slots; returns float32 [T, Hq, D]."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    starts, lens = query_start.tolist(), seq_lens.tolist()
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].double().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].double(), k) * scale
        q_pos = ctx - (e - s) + torch.arange(e - s, device=q.device)
        scores.masked_fill_(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v).float()
    return out
