"""Cascade (shared-prefix) decode attention: B branches of one prompt, one new token each.

Branch b attends to the prompt's shared prefix (prefix_len tokens, in prefix_block_table) and
then to its own suffix (suffix_lens[b] tokens, from offset 0 of its first block in
suffix_block_tables[b]):

    out[b, h] = softmax_j(scale * q[b, h] . K[j]) @ V      over j in prefix ++ suffix_b

Softmax over a concatenation is a log-sum-exp merge of softmaxes over its parts, so the work
splits in three:
  * Prefix kernel: one program per (row tile, kv head, prefix split). The rows of its tile are
    (branch, q head) pairs: all B branches x GROUP q heads of the kv head, BLOCK_M at a time. Each
    prefix K/V tile it loads is used by every row of the tile, so the shared prefix is read from
    memory once per row tile per step, not once per branch (B * GROUP <= BLOCK_M: exactly once).
    Row tiles are the grid's fastest axis, so the row tiles that read the same prefix keys run
    side by side and their re-reads mostly hit L2. It writes a partial (output, log2-sum-exp) per
    row and split, as decode attention's split kernel does, with the same tile loop.
  * Suffix: decode_attention_with_lse over the suffix tables (fp32 output, so nothing is rounded
    before the merge).
  * Merge kernel: one program per (branch, q head) merges the prefix splits in order, then the
    suffix, by log-sum-exp. An empty suffix has lse = -inf and weight 0.

BLOCK_M, BLOCK_N and the split length depend on (dtype, head_dim, block_size) only, so a row's
arithmetic does not depend on how many branches share the prefix. Grid sizes come from shapes and
the host-side int prefix_len: no device->host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import check_tensor
from .decode_attention import (
    SPLIT_TARGET,
    _attend_span,
    _block_d,
    _check_attention_args,
    _input_precision,
    decode_attention_with_lse,
)

_LOG2E = math.log2(math.e)
_LOG2E_C: tl.constexpr = tl.constexpr(_LOG2E)


@triton.jit
def _cascade_prefix_kernel(
    q_ptr, k_ptr, v_ptr, part_out_ptr, part_lse_ptr, prefix_table_ptr,
    prefix_len, num_rows, max_splits, qk_scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_TOKENS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    # Row r of the (branch, q head) pairs of this kv head: branch r // GROUP, head r % GROUP.
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    row_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    branch = (rows // GROUP).to(tl.int64)
    heads = kv_head * GROUP + rows % GROUP
    q = tl.load(q_ptr + branch[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=row_mask,
                other=0.0)
    start = split * SPLIT_TOKENS  # < prefix_len: the grid holds exactly the prefix's splits
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc, m_i, l_i = _attend_span(
        acc, m_i, l_i, q, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh, prefix_table_ptr,
        start, tl.minimum(start + SPLIT_TOKENS, prefix_len), qk_scale, stride_kt, stride_vt,
        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N,
        INPUT_PRECISION=INPUT_PRECISION)
    part = (branch * num_heads + heads) * max_splits + split
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None], mask=row_mask)
    tl.store(part_lse_ptr + part, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _cascade_merge_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, suffix_out_ptr, suffix_lse_ptr, num_prefix_splits, max_splits,
    stride_ob, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row = b.to(tl.int64) * num_heads + head
    base = row * max_splits
    suffix_lse = tl.load(suffix_lse_ptr + row) * _LOG2E_C  # natural log -> log2 units, like the partials
    m = suffix_lse
    for s in range(num_prefix_splits):
        m = tl.maximum(m, tl.load(part_lse_ptr + base + s))
    # No keys at all (empty prefix and suffix): every weight is then exp2(-inf) = 0, l_sum = 0
    # and the output 0 (the divisor below is clamped to 1; with keys, l_sum >= 1 already since
    # the largest part has weight exactly 1).
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_D], tl.float32)
    l_sum = tl.zeros([], tl.float32)
    for s in range(num_prefix_splits):  # fixed order: prefix splits, then the suffix
        w = tl.math.exp2(tl.load(part_lse_ptr + base + s) - m)
        acc += w * tl.load(part_out_ptr + (base + s) * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        l_sum += w
    w = tl.math.exp2(suffix_lse - m)
    acc += w * tl.load(suffix_out_ptr + row * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    l_sum += w
    o = acc / tl.maximum(l_sum, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=d_ok)


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    split_tokens: int
    num_warps: int
    num_stages: int


def _config(dtype: torch.dtype, head_dim: int, block_size: int) -> _Config:
    """Prefix-kernel settings: a function of dtype, head_dim and block_size only.

    Never of the branch count, so a branch's rows see the same tile shapes (and hence the same
    reduction order) however many branches share the prefix. 64 rows hold 16 branches of a
    4-head group, or 8 of an 8-head group, per prefix read. With 64 rows, 32-key tiles at 8 warps
    are the largest that compile with no spills on sm_80 and sm_90 at head_dim 128, aligned or
    not (the AOT test checks). fp32 (tf32x3 dots, twice the operand registers) is the
    correctness path and takes small tiles.
    """
    if not 1 <= head_dim <= 128:
        raise ValueError(f"head_dim must be in 1..128 (Llama-family heads are 64 or 128), got {head_dim}")
    split_tokens = -(-SPLIT_TARGET // block_size) * block_size
    if dtype == torch.float32:
        return _Config(block_m=16, block_n=32, split_tokens=split_tokens, num_warps=8, num_stages=2)
    return _Config(block_m=64, block_n=32, split_tokens=split_tokens, num_warps=8, num_stages=2)


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_block_table: torch.Tensor,
            prefix_len: int, suffix_block_tables: torch.Tensor, suffix_lens: torch.Tensor, block_size: int,
            scale: float, out: torch.Tensor, cfg: _Config) -> torch.Tensor:
    num_branches, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    if num_branches == 0:
        return out
    # Scratch sized from shapes: the prefix table's capacity bounds the prefix's splits.
    max_splits = max(1, triton.cdiv(prefix_block_table.shape[0] * block_size, cfg.split_tokens))
    num_prefix_splits = triton.cdiv(prefix_len, cfg.split_tokens)
    part_out = torch.empty((num_branches, num_heads, max_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((num_branches, num_heads, max_splits), dtype=torch.float32, device=q.device)
    if num_prefix_splits:
        num_rows = num_branches * group
        _cascade_prefix_kernel[(triton.cdiv(num_rows, cfg.block_m), num_kv_heads, num_prefix_splits)](
            q, k_cache, v_cache, part_out, part_lse, prefix_block_table, prefix_len, num_rows, max_splits,
            scale * _LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
            v_cache.stride(1),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_SIZE=block_size,
            BLOCK_N=cfg.block_n, SPLIT_TOKENS=cfg.split_tokens, INPUT_PRECISION=_input_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    suffix_out, suffix_lse = decode_attention_with_lse(
        q, k_cache, v_cache, suffix_block_tables, suffix_lens, block_size, scale,
        out=torch.empty(q.shape, dtype=torch.float32, device=q.device))
    _cascade_merge_kernel[(num_branches, num_heads)](
        out, part_out, part_lse, suffix_out, suffix_lse, num_prefix_splits, max_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), num_warps=1,
    )
    return out


def _check_inputs(q, k_cache, v_cache, prefix_block_table, prefix_len, suffix_block_tables, suffix_lens, block_size,
                  scale, out) -> None:
    _check_attention_args(q, k_cache, v_cache, block_size, scale)
    device = q.device
    num_branches = q.shape[0]
    check_tensor("prefix_block_table", prefix_block_table, dtype=torch.int32, ndim=1, device=device,
                 contiguous=True)
    capacity = prefix_block_table.shape[0] * block_size
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not 0 <= prefix_len <= capacity:
        raise ValueError(f"prefix_len must be an int in 0..{capacity} (prefix_block_table's "
                         f"{prefix_block_table.shape[0]} blocks of {block_size}), got {prefix_len!r}")
    check_tensor("suffix_block_tables", suffix_block_tables, dtype=torch.int32, shape=(num_branches, None),
                 device=device, last_dim_contiguous=True)
    check_tensor("suffix_lens", suffix_lens, dtype=torch.int32, shape=(num_branches,), device=device,
                 contiguous=True)
    if out is not None:
        check_tensor("out", out, dtype=q.dtype, shape=tuple(q.shape), device=device, last_dim_contiguous=True)


def cascade_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_block_table: torch.Tensor,
                      prefix_len: int, suffix_block_tables: torch.Tensor, suffix_lens: torch.Tensor, block_size: int,
                      scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of B branches over a shared prefix plus each branch's own suffix.

    q [B, Hq, D] (strided rows allowed, last dim contiguous); k_cache, v_cache [num_slots, Hkv, D];
    prefix_block_table [P] int32 holding prefix_len tokens (a Python int, 0..P * block_size);
    suffix_block_tables [B, max_blocks] int32 and suffix_lens [B] int32 (may be 0): branch b's
    own tokens from offset 0 of its first block. Returns out [B, Hq, D] in q's dtype; a branch
    with no keys at all gets zeros. The prefix's K/V are read once per step for all branches.
    """
    _check_inputs(q, k_cache, v_cache, prefix_block_table, prefix_len, suffix_block_tables, suffix_lens, block_size,
                  scale, out)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return _launch(q, k_cache, v_cache, prefix_block_table, prefix_len, suffix_block_tables, suffix_lens, block_size,
                   float(scale), out, _config(q.dtype, q.shape[2], block_size))


def cascade_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                prefix_block_table: torch.Tensor, prefix_len: int, suffix_block_tables: torch.Tensor,
                                suffix_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Per branch: gather prefix then suffix slots, float64 softmax attention; float32 [B, Hq, D]."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    pos = torch.arange(prefix_len, device=q.device)
    prefix_slots = prefix_block_table[pos // block_size].long() * block_size + pos % block_size
    for b, n in enumerate(suffix_lens.tolist()):
        pos = torch.arange(n, device=q.device)
        suffix_slots = suffix_block_tables[b, pos // block_size].long() * block_size + pos % block_size
        slots = torch.cat((prefix_slots, suffix_slots))
        if slots.numel() == 0:
            continue
        k = k_cache[slots].double().repeat_interleave(group, dim=1)  # [keys, Hq, D]
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", q[b].double(), k) * scale
        out[b] = torch.einsum("hk,khd->hd", torch.softmax(scores, dim=-1), v).float()
    return out
