"""Rotary embedding fused with writing K/V into the paged cache.

For token t at position p = positions[t], with c = cos[p], s = sin[p] (float32 tables of
[max_position, D/2]) and each head split into halves x = [x1, x2] (HF's rotate-half convention):

    rope(x) = [x1 * c - x2 * s,  x2 * c + x1 * s]
    q_rot[t]                   = rope(q[t])
    k_cache[slot_mapping[t]]   = rope(k[t]),  v_cache[slot_mapping[t]] = v[t]   (slot >= 0 only)

A negative slot marks a padded token: nothing is written to the caches for it. The rotation is
computed in float32 and rounded to the output dtype once, as the torch backend does (its bf16/fp16
activations are promoted by the float32 tables).

Grid: one program per (token, block of heads). The first blocks along axis 1 rotate q heads; the
remaining ones rotate k heads and copy v heads of the same token. Fusing the cache write with the
rotation means the rotated K is never written to (and read back from) an intermediate buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_dtype, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)
# A head-block tile is BLOCK_HEADS x BLOCK_HALF per half; 1024 elements over 4 warps is 8 values
# per thread per half (one 128-bit load for 16-bit dtypes), so a block is at most 16 heads at
# D = 128 and 32 at D = 64: a decode token of an 8B model (32 q heads, 8 kv heads) is 3 programs.
TILE_ELEMENTS = 1024
NUM_WARPS = 4
MAX_HEAD_DIM = 512


@triton.jit
def _rope_and_cache_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, out_ptr,
        num_q_heads, num_kv_heads, max_position, num_q_blocks,
        q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
        cos_stride, sin_stride, kc_stride_s, kc_stride_h, vc_stride_s, vc_stride_h, out_stride_t, out_stride_h,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    # int64 offsets: slot * cache stride passes 2**31 in a large KV arena.
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    # A position outside the tables reads NaN instead of wild memory: wrong output that shows,
    # not a crashed GPU context. (Padded tokens are expected to carry a valid position such as 0.)
    pos_ok = (pos >= 0) & (pos < max_position)
    pos = tl.where(pos_ok, pos, 0)
    d = tl.arange(0, BLOCK_HALF)
    # Scalar conditions are folded into a bound (d < 0 is all false) rather than and-ed with a
    # vector mask: the interpreter mis-types a scalar bool broadcast into a mask.
    cs_mask = d < tl.where(pos_ok, HALF, 0)
    c = tl.load(cos_ptr + pos * cos_stride + d, mask=cs_mask, other=float("nan"))
    s = tl.load(sin_ptr + pos * sin_stride + d, mask=cs_mask, other=float("nan"))

    # The q and k programs differ only in where their heads come from and go to, so both run
    # the one rotation below. (One tile shape for both: a kv block may be mostly masked, which
    # costs idle lanes, not memory traffic.)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    write = slot >= 0
    slot = tl.where(write, slot, 0)
    is_q = block < num_q_blocks
    if is_q:
        head0 = block * BLOCK_HEADS
        num_heads = num_q_heads
        src = q_ptr + t * q_stride_t
        src_stride_h = q_stride_h
        dst = out_ptr + t * out_stride_t
        dst_stride_h = out_stride_h
    else:
        head0 = (block - num_q_blocks) * BLOCK_HEADS
        # A padded token has no heads to move: its K/V is not read and the cache is not written.
        num_heads = tl.where(write, num_kv_heads, 0)
        src = k_ptr + t * k_stride_t
        src_stride_h = k_stride_h
        dst = k_cache_ptr + slot * kc_stride_s
        dst_stride_h = kc_stride_h
    heads = head0 + tl.arange(0, BLOCK_HEADS)
    mask = (heads[:, None] < num_heads) & (d[None, :] < HALF)
    src_ptrs = src + heads[:, None] * src_stride_h + d[None, :]
    x1 = tl.load(src_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    dst_ptrs = dst + heads[:, None] * dst_stride_h + d[None, :]
    # All loads above happen before these stores, so dst may be src (q rotated in place).
    tl.store(dst_ptrs, (x1 * c[None, :] - x2 * s[None, :]).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst_ptrs + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(dst.dtype.element_ty), mask=mask)

    if not is_q:
        v_src = v_ptr + t * v_stride_t + heads[:, None] * v_stride_h + d[None, :]
        v_dst = v_cache_ptr + slot * vc_stride_s + heads[:, None] * vc_stride_h + d[None, :]
        tl.store(v_dst, tl.load(v_src, mask=mask), mask=mask)
        tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=mask), mask=mask)


def _launch_config(num_q_heads: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_HALF, BLOCK_HEADS) for the model's head shape."""
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q's last dimension) must be even and in [2, {MAX_HEAD_DIM}], got {head_dim}")
    block_half = triton.next_power_of_2(head_dim // 2)
    # Sized by the q heads (the larger count under GQA), capped at one tile.
    return block_half, min(triton.next_power_of_2(num_q_heads), max(1, TILE_ELEMENTS // block_half))


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, out: torch.Tensor | None = None,
                   inplace_q: bool = False) -> torch.Tensor:
    """Rotates q [T, Hq, D] and k [T, Hkv, D]; writes rotated k and v [T, Hkv, D] into k_cache/v_cache
    [S, Hkv, D] at slot_mapping [T] (negative: skip); returns rotated q.

    positions and slot_mapping are int32 or int64; cos/sin are float32 [P, D/2]. q/k/v may be
    token-strided views into a fused qkv buffer. The result goes to `out` if given, into q itself
    if inplace_q, else to a new contiguous tensor.
    """
    check_tensor("q", q, dtype=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    num_tokens, num_q_heads, head_dim = q.shape
    block_half, block_heads = _launch_config(num_q_heads, head_dim)
    device = q.device
    check_tensor("k", k, ndim=3, shape=(num_tokens, None, head_dim), device=device, last_dim_contiguous=True)
    num_kv_heads = k.shape[1]
    kv_shape = (num_tokens, num_kv_heads, head_dim)
    check_tensor("v", v, shape=kv_shape, device=device, last_dim_contiguous=True)
    check_tensor("k_cache", k_cache, shape=(None, num_kv_heads, head_dim), device=device, last_dim_contiguous=True)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), device=device, last_dim_contiguous=True)
    check_same_dtype(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    check_tensor("positions", positions, dtype=INDEX_DTYPES, shape=(num_tokens,), device=device, contiguous=True)
    check_tensor("slot_mapping", slot_mapping, dtype=INDEX_DTYPES, shape=(num_tokens,), device=device,
                 contiguous=True)
    check_tensor("cos", cos, dtype=torch.float32, shape=(None, head_dim // 2), device=device,
                 last_dim_contiguous=True)
    check_tensor("sin", sin, dtype=torch.float32, shape=tuple(cos.shape), device=device, last_dim_contiguous=True)
    if inplace_q:
        if out is not None and out is not q:
            raise ValueError("give either out or inplace_q=True, not both")
        out = q
    elif out is None:
        out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=device)
    else:
        check_tensor("out", out, dtype=q.dtype, shape=tuple(q.shape), device=device, last_dim_contiguous=True)
    if num_tokens == 0:
        return out
    num_q_blocks = triton.cdiv(num_q_heads, block_heads)
    grid = (num_tokens, num_q_blocks + triton.cdiv(num_kv_heads, block_heads))
    _rope_and_cache_kernel[grid](
        q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, out,
        num_q_heads, num_kv_heads, cos.shape[0], num_q_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        HALF=head_dim // 2, BLOCK_HALF=block_half, BLOCK_HEADS=block_heads,
        num_warps=NUM_WARPS)
    return out


def _rope_reference(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rope_and_cache_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> torch.Tensor:
    """The definition in float64: writes the caches' mapped slots (in the cache dtype) like the kernel;
    returns rotated q in float64."""
    c = cos.double()[positions.long()].unsqueeze(1)
    s = sin.double()[positions.long()].unsqueeze(1)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots] = _rope_reference(k, c, s)[keep].to(k_cache.dtype)
    v_cache[slots] = v[keep].to(v_cache.dtype)
    return _rope_reference(q, c, s)
