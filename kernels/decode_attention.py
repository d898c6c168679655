"""GQA decode attention over the paged KV cache: one new token per sequence (flash-decoding).

Sequence b's query q[b, h] attends to all seq_lens[b] keys in its cache (its own new token
included, already written there); query head h reads kv head h // GROUP:

    out[b, h] = softmax_j(scale * q[b, h] . K[j]) @ V,      lse[b, h] = log sum_j exp(scale * q[b, h] . K[j])

Parallel decomposition (split-K with GQA grouping):
  * Split kernel: one program per (sequence, kv head, split). A split is a fixed run of
    SPLIT_TOKENS consecutive keys. The program takes ALL the GROUP query heads of its kv head as
    the rows of one tile (padded to at least 16 rows for tl.dot), so each K/V tile is loaded once
    for the whole group. It walks its split's keys through the block table in BLOCK_N tiles with
    an online softmax in fp32 and writes a partial (normalized output, log2-sum-exp) to scratch.
    A sequence with a single split writes its final output directly and skips the merge.
  * Merge kernel: one program per (sequence, q head) combines that sequence's partials in split
    order 0, 1, 2, ... by their log-sum-exp.

Batch invariance: SPLIT_TOKENS and BLOCK_N are functions of (dtype, head_dim, block_size) only, so
sequence b's number of splits, each split's key tiles and the merge order depend on seq_lens[b]
alone, never on the batch size or the other sequences: a sequence's output is bit-identical
whatever batch it is decoded in. The grid's split axis is an upper bound from the table width
(block_tables.shape[1]), so the launcher reads no tensor values (no device->host sync, graph
capturable); programs past a sequence's last split exit at once. The fp32 partials take
[B, Hq, max_splits, D]: about GROUP / 256 of the K/V bytes the tables can address. A seq_lens[b]
past its table row's capacity is clamped to it, so a bad length cannot read or write out of bounds.

`_attend_span` (the tile loop) is shared with the cascade prefix kernel (cascade_attention.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_dtype, check_tensor

_LOG2E = math.log2(math.e)
_LN2: tl.constexpr = tl.constexpr(math.log(2.0))

# Keys per split, before rounding up to a multiple of the cache's block size. 256 keys of a
# 128-wide fp16 head are 128 KiB of K/V per program: enough work to hide the merge, and short
# enough that a single long sequence still spreads over many SMs (a 4k context is 16 splits per
# kv head). It must never depend on the batch (see the module docstring).
SPLIT_TARGET = 256


@triton.jit
def _attend_span(acc, m_i, l_i, q, k_head, v_head, table_row, start, end, qk_scale, stride_kt, stride_vt,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """Online softmax of q's rows over keys start..end-1 (end > start): returns (acc, m_i, l_i).

    Key j lives in slot table_row[j // BLOCK_SIZE] * BLOCK_SIZE + j % BLOCK_SIZE; gathering per
    key keeps BLOCK_N independent of the cache's block size. m_i is in log2 units (qk_scale holds
    log2(e)). Tiles start at `start`, so they depend on the span alone.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    # Stage 0 walks the whole tiles with no mask at all; stage 1 the one partial tile, if any.
    for stage in tl.static_range(2):
        if stage == 0:
            lo = start
            hi = full_end
        else:
            lo = full_end
            hi = end
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            key_ok = offs_n < end
            # Keys past `end` are masked before any load: their table entries may be padding
            # (block 0) and their slots may hold stale or NaN values.
            if stage == 0:
                block_ids = tl.load(table_row + offs_n // BLOCK_SIZE)
            else:
                block_ids = tl.load(table_row + offs_n // BLOCK_SIZE, mask=key_ok, other=0)
            # int64: slot * stride overflows int32 in caches over 2**31 elements.
            slots = block_ids.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
            k_ptrs = k_head + slots[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = v_head + slots[:, None] * stride_vt + offs_d[None, :]
            if stage == 0 and BLOCK_D == HEAD_DIM:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
            if stage == 1:
                qk = tl.where(key_ok[None, :], qk, float("-inf"))
            # Every tile holds at least one real key, so m_new is finite and exp2 never sees
            # -inf - -inf; masked keys get p = 0 exactly.
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # V is masked too: p = 0 times a NaN in an unused slot would still be NaN.
            if stage == 0 and BLOCK_D == HEAD_DIM:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, block_tables_ptr, seq_lens_ptr,
    qk_scale, max_blocks, max_splits,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ob, stride_oh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_TOKENS: tl.constexpr, STORE_LSE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    # A length past the table's capacity is clamped, so a bad seq_len cannot read past the
    # table row or write past this sequence's scratch.
    seq_len = tl.minimum(tl.load(seq_lens_ptr + b), max_blocks * BLOCK_SIZE)
    num_splits = tl.cdiv(seq_len, SPLIT_TOKENS)
    start = split * SPLIT_TOKENS

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < GROUP
    row_mask = h_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    heads = kv_head * GROUP + offs_h
    b64 = b.to(tl.int64)
    out_ptrs = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    lse_ptrs = lse_ptr + b64 * num_heads + heads
    if start < seq_len:
        # The group's query heads are the tile's rows; padding rows are zeros and never stored.
        q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=row_mask,
                    other=0.0)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc, m_i, l_i = _attend_span(
            acc, m_i, l_i, q, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh,
            block_tables_ptr + b64 * stride_bt, start, tl.minimum(start + SPLIT_TOKENS, seq_len), qk_scale,
            stride_kt, stride_vt, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N,
            INPUT_PRECISION=INPUT_PRECISION)
        o = acc / l_i[:, None]
        lse2 = m_i + tl.math.log2(l_i)
        if num_splits == 1:
            tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask)
            if STORE_LSE:
                tl.store(lse_ptrs, lse2 * _LN2, mask=h_ok)
        else:
            part = (b64 * num_heads + heads) * max_splits + split
            tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_mask)
            tl.store(part_lse_ptr + part, lse2, mask=h_ok)
    else:
        if split == 0:  # an empty sequence: attention over no keys is 0, its log-sum-exp -inf
            tl.store(out_ptrs, tl.zeros([BLOCK_H, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty),
                     mask=row_mask)
            if STORE_LSE:
                tl.store(lse_ptrs, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=h_ok)


@triton.jit
def _decode_merge_kernel(
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr, max_blocks, max_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT_TOKENS: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + b), max_blocks * BLOCK_SIZE)
    num_splits = tl.cdiv(seq_len, SPLIT_TOKENS)
    if num_splits > 1:  # a single split already wrote its output
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        b64 = b.to(tl.int64)
        base = (b64 * num_heads + head) * max_splits
        # Two passes in split order: the max first, so every weight is <= 1 and nothing is
        # rescaled; both loops run in a fixed order set by this sequence's length alone.
        m = tl.full([], float("-inf"), tl.float32)
        for s in range(num_splits):
            m = tl.maximum(m, tl.load(part_lse_ptr + base + s))
        acc = tl.zeros([BLOCK_D], tl.float32)
        l_sum = tl.zeros([], tl.float32)
        for s in range(num_splits):
            w = tl.math.exp2(tl.load(part_lse_ptr + base + s) - m)
            acc += w * tl.load(part_out_ptr + (base + s) * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
            l_sum += w
        tl.store(out_ptr + b64 * stride_ob + head * stride_oh + offs_d, (acc / l_sum).to(out_ptr.dtype.element_ty),
                 mask=d_ok)
        if STORE_LSE:
            tl.store(lse_ptr + b64 * num_heads + head, (m + tl.math.log2(l_sum)) * _LN2)


@dataclass(frozen=True)
class _Config:
    block_n: int
    split_tokens: int
    num_warps: int
    num_stages: int


def _config(dtype: torch.dtype, head_dim: int, block_size: int) -> _Config:
    """Launch settings: a function of dtype, head_dim and block_size only, never of the batch.

    The split is SPLIT_TARGET keys rounded up to whole cache blocks. 64-key tiles (16 KiB of K
    per tile at head_dim 128 in fp16) with 3 stages keep cp.async loads in flight while the
    previous tile is used, and compile with no register spills on sm_80 and sm_90, aligned or
    not (the AOT test checks the unaligned build, the heavier one); 8 warps at head_dim 128 split
    the tile's gathered addresses over more threads. fp32 runs tf32x3 dots whose operands take
    twice the registers, hence its smaller tiles: it is the correctness path, not the fast one.
    """
    if not 1 <= head_dim <= 128:
        raise ValueError(f"head_dim must be in 1..128 (Llama-family heads are 64 or 128), got {head_dim}")
    split_tokens = -(-SPLIT_TARGET // block_size) * block_size
    if dtype == torch.float32:
        return _Config(block_n=32, split_tokens=split_tokens, num_warps=8, num_stages=2)
    return _Config(block_n=64, split_tokens=split_tokens, num_warps=4 if head_dim <= 64 else 8, num_stages=3)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16


def _block_h(group: int) -> int:
    return max(16, triton.next_power_of_2(group))  # the group's q heads, padded for tl.dot


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 means fp32: plain tf32 keeps 10 mantissa bits on the GPU; tf32x3 is as accurate as
    # fp32 FMAs and keeps tensor cores. The setting is ignored for 16-bit inputs.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor, lse: torch.Tensor | None,
            cfg: _Config) -> None:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_seqs == 0:
        return
    max_blocks = block_tables.shape[1]
    # Upper bound on any sequence's splits, from the table's width: shapes only, no sync. At
    # least one, so an empty table still launches the programs that write empty sequences.
    max_splits = max(1, triton.cdiv(max_blocks * block_size, cfg.split_tokens))
    part_out = torch.empty((num_seqs, num_heads, max_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((num_seqs, num_heads, max_splits), dtype=torch.float32, device=q.device)
    store_lse = lse is not None
    lse_arg = lse if store_lse else part_lse  # never written when STORE_LSE is off
    group = num_heads // num_kv_heads
    _decode_split_kernel[(num_seqs, num_kv_heads, max_splits)](
        q, k_cache, v_cache, out, lse_arg, part_out, part_lse, block_tables, seq_lens,
        scale * _LOG2E, max_blocks, max_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_H=_block_h(group),
        BLOCK_SIZE=block_size, BLOCK_N=cfg.block_n, SPLIT_TOKENS=cfg.split_tokens, STORE_LSE=store_lse,
        INPUT_PRECISION=_input_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if max_splits > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            out, lse_arg, part_out, part_lse, seq_lens, max_blocks, max_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_SIZE=block_size, SPLIT_TOKENS=cfg.split_tokens,
            STORE_LSE=store_lse, num_warps=1,
        )


def _check_attention_args(q, k_cache, v_cache, block_size, scale) -> None:
    """The checks decode and cascade attention share: q, the caches, block_size and scale."""
    check_tensor("q", q, dtype=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    device = q.device
    num_heads, head_dim = q.shape[1:]
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
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale) -> None:
    _check_attention_args(q, k_cache, v_cache, block_size, scale)
    num_seqs = q.shape[0]
    check_tensor("block_tables", block_tables, dtype=torch.int32, shape=(num_seqs, None), device=q.device,
                 last_dim_contiguous=True)
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, shape=(num_seqs,), device=q.device, contiguous=True)


def _check_out(out: torch.Tensor | None, q: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=dtypes[0], device=q.device)
    check_tensor("out", out, dtype=dtypes, shape=tuple(q.shape), device=q.device, last_dim_contiguous=True)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, block_size: int, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """GQA attention of each sequence's one new token over its paged context.

    q [B, Hq, D] (strided rows allowed, last dim contiguous); k_cache, v_cache [num_slots, Hkv, D]
    (q's dtype, Hq % Hkv == 0); block_tables [B, max_blocks] int32, covering seq_lens[b] slots;
    seq_lens [B] int32, context length including the new token. Returns out [B, Hq, D] in q's
    dtype; an empty sequence (seq_lens[b] == 0) gets zeros. Bit-identical for a sequence whatever
    else is in the batch.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale)
    out = _check_out(out, q, (q.dtype,))
    _launch(q, k_cache, v_cache, block_tables, seq_lens, block_size, float(scale), out, None,
            _config(q.dtype, q.shape[2], block_size))
    return out


def decode_attention_with_lse(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                              out: torch.Tensor | None = None,
                              lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_attention, plus lse [B, Hq] fp32 = log sum_j exp(scale * q . K[j]) (natural log).

    An empty sequence gets out = 0 and lse = -inf, so (out, lse) pairs merge by log-sum-exp with
    no special case (cascade_attention does). `out` may be float32 as well as q's dtype, so a
    partial result that will be merged again is not rounded first; lse_out must be contiguous.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale)
    out = _check_out(out, q, (q.dtype, torch.float32))
    if lse_out is None:
        lse_out = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    check_tensor("lse_out", lse_out, dtype=torch.float32, shape=tuple(q.shape[:2]), device=q.device,
                 contiguous=True)
    _launch(q, k_cache, v_cache, block_tables, seq_lens, block_size, float(scale), out, lse_out,
            _config(q.dtype, q.shape[2], block_size))
    return out, lse_out


def decode_attention_with_lse_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                        block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence float64 softmax attention over the gathered slots; float32 (out, lse)."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for b, ctx in enumerate(seq_lens.tolist()):
        if ctx == 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].double().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", q[b].double(), k) * scale
        out[b] = torch.einsum("hk,khd->hd", torch.softmax(scores, dim=-1), v).float()
        lse[b] = torch.logsumexp(scores, dim=-1).float()
    return out, lse


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                               scale: float) -> torch.Tensor:
    """Float64 reference for decode_attention; returns float32 [B, Hq, D]."""
    return decode_attention_with_lse_reference(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale)[0]
