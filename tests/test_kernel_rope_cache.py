"""kernels/rope_cache.py: rotate-half RoPE fused with the paged K/V cache write, against float64.

The caches start full of NaN: mapped slots must hold exactly the reference's K/V and every other
slot (unmapped, or a padded token's negative slot) must still be NaN.
"""
from __future__ import annotations

import pytest
import torch
from kernel_harness import GPU_ARCHS, TEST_DTYPES, assert_close, assert_no_spills, compile_many, poisoned

from lockstep.kernels.rope_cache import (NUM_WARPS, _launch_config, _rope_and_cache_kernel, rope_and_cache,
                                         rope_and_cache_reference)

NUM_SLOTS = 64  # 4 blocks of 16
MAX_POSITION = 100
NUM_KV_HEADS = 3  # the default model's


def _tables(head_dim: int, theta: float = 1e5) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(MAX_POSITION, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def _qkv(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int,
         pad: int = 24) -> tuple[torch.Tensor, ...]:
    """q, k, v as views into one fused [T, (Hq + 2 Hkv) D + pad] buffer (token stride != row size), and it."""
    g = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = (torch.randn(num_tokens, q_size + 2 * kv_size + pad, generator=g) * 2).to(dtype)
    q = qkv[:, :q_size].unflatten(1, (num_q_heads, head_dim))
    k = qkv[:, q_size:q_size + kv_size].unflatten(1, (num_kv_heads, head_dim))
    v = qkv[:, q_size + kv_size:q_size + 2 * kv_size].unflatten(1, (num_kv_heads, head_dim))
    return q, k, v, qkv


def _indices(num_tokens: int, seed: int, index_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed positions (unsorted, including 0 and the table's last row) and distinct slots with one
    padded token (slot -1) when there is more than one token."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=g)
    slots = torch.randperm(NUM_SLOTS, generator=g)[:num_tokens]
    if num_tokens > 1:
        positions[0], positions[-1] = MAX_POSITION - 1, 0
        slots[1] = -1
    return positions.to(index_dtype), slots.to(index_dtype)


def _caches(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return poisoned((NUM_SLOTS, num_kv_heads, head_dim), dtype), poisoned((NUM_SLOTS, num_kv_heads, head_dim), dtype)


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, want_k: torch.Tensor, want_v: torch.Tensor,
                  slot_mapping: torch.Tensor, dtype: torch.dtype) -> None:
    mapped = slot_mapping[slot_mapping >= 0].long()
    assert_close(k_cache[mapped], want_k[mapped], dtype)
    assert_close(v_cache[mapped], want_v[mapped], dtype)
    untouched = torch.ones(k_cache.shape[0], dtype=torch.bool)
    untouched[mapped] = False
    assert torch.isnan(k_cache[untouched]).all(), "k_cache: a slot not in slot_mapping was written"
    assert torch.isnan(v_cache[untouched]).all(), "v_cache: a slot not in slot_mapping was written"


def _run_and_check(q, k, v, positions, slot_mapping, dtype, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs kernel and reference on the same inputs, checks the caches, returns (q_rot, reference q_rot)."""
    head_dim, num_kv_heads = q.shape[-1], k.shape[1]
    cos, sin = _tables(head_dim)
    k_cache, v_cache = _caches(num_kv_heads, head_dim, dtype)
    want_k, want_v = _caches(num_kv_heads, head_dim, dtype)
    want_q = rope_and_cache_reference(q, k, v, positions, cos, sin, want_k, want_v, slot_mapping)
    q_rot = rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, **kwargs)
    _check_caches(k_cache, v_cache, want_k, want_v, slot_mapping, dtype)
    return q_rot, want_q


@pytest.mark.parametrize("num_tokens", [1, 16, 17])
@pytest.mark.parametrize("gqa", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_matches_reference(dtype: torch.dtype, head_dim: int, gqa: int, num_tokens: int) -> None:
    num_q_heads = gqa * NUM_KV_HEADS  # 24 q heads at head_dim 128 span two head blocks
    q, k, v, qkv = _qkv(num_tokens, num_q_heads, NUM_KV_HEADS, head_dim, dtype, seed=head_dim * gqa + num_tokens)
    qkv_before = qkv.clone()
    positions, slot_mapping = _indices(num_tokens, seed=num_tokens + gqa)
    out = poisoned((num_tokens, num_q_heads, head_dim), dtype)
    q_rot, want_q = _run_and_check(q, k, v, positions, slot_mapping, dtype, out=out)
    assert q_rot is out
    assert_close(q_rot, want_q, dtype)
    assert torch.equal(qkv, qkv_before), "q, k and v must not be modified"


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_rotates_q_in_place(dtype: torch.dtype) -> None:
    q, k, v, qkv = _qkv(17, 12, 4, 64, dtype, seed=1)
    kv_before = qkv[:, q.shape[1] * 64:].clone()
    positions, slot_mapping = _indices(17, seed=1)
    q_rot, want_q = _run_and_check(q, k, v, positions, slot_mapping, dtype, inplace_q=True)
    assert q_rot is q
    assert_close(q, want_q, dtype)
    assert torch.equal(qkv[:, q.shape[1] * 64:], kv_before), "only q may be rotated in place"


def _padded_heads(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t [N, H, D] copied into the first D columns of a NaN-filled [N, H, D + pad] buffer."""
    view = poisoned((*t.shape[:-1], t.shape[-1] + pad), t.dtype)[..., :t.shape[-1]]
    view.copy_(t)
    return view


def test_padded_heads_int32_indices_and_allocated_output() -> None:
    """Every head stride differs (q, k, v, k_cache, v_cache each padded differently), so a stride
    used for the wrong tensor shows; positions and slots are int32; the output is allocated."""
    dtype, head_dim, num_kv_heads = torch.float16, 128, 2
    q, k, v, _ = _qkv(16, 8, num_kv_heads, head_dim, dtype, seed=4)
    q, k, v = _padded_heads(q, 8), _padded_heads(k, 24), _padded_heads(v, 40)
    positions, slot_mapping = _indices(16, seed=4, index_dtype=torch.int32)
    cos, sin = _tables(head_dim)
    k_cache = _padded_heads(poisoned((NUM_SLOTS, num_kv_heads, head_dim), dtype), 16)
    v_cache = _padded_heads(poisoned((NUM_SLOTS, num_kv_heads, head_dim), dtype), 48)
    want_k, want_v = _caches(num_kv_heads, head_dim, dtype)
    want_q = rope_and_cache_reference(q, k, v, positions, cos, sin, want_k, want_v, slot_mapping)
    q_rot = rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    assert q_rot.shape == q.shape and q_rot.is_contiguous()
    assert_close(q_rot, want_q, dtype)
    _check_caches(k_cache, v_cache, want_k, want_v, slot_mapping, dtype)
    for cache in (k_cache, v_cache):  # the padding after each cached head is untouched
        padding = cache.as_strided((NUM_SLOTS, num_kv_heads, cache.stride(1) - head_dim), cache.stride(),
                                   cache.storage_offset() + head_dim)
        assert torch.isnan(padding).all()


def test_more_heads_than_one_block() -> None:
    """20 q and 20 kv heads at head_dim 128 take two head blocks each (the second partly masked)."""
    dtype = torch.float32
    _, block_heads = _launch_config(20, 128)
    assert block_heads < 20
    q, k, v, _ = _qkv(3, 20, 20, 128, dtype, seed=9)
    positions, slot_mapping = _indices(3, seed=9)
    q_rot, want_q = _run_and_check(q, k, v, positions, slot_mapping, dtype)
    assert_close(q_rot, want_q, dtype)


def test_all_tokens_padded() -> None:
    """A step of only padded tokens writes nothing to the caches but still rotates q."""
    q, k, v, _ = _qkv(4, 6, 2, 64, torch.float32, seed=2)
    positions = torch.tensor([0, 5, 0, 9])
    slot_mapping = torch.full((4,), -1)
    q_rot, want_q = _run_and_check(q, k, v, positions, slot_mapping, torch.float32)
    assert_close(q_rot, want_q, torch.float32)


def test_position_outside_the_table_gives_nan_not_a_wild_read() -> None:
    q, k, v, _ = _qkv(3, 2, 1, 64, torch.float32, seed=3)
    cos, sin = _tables(64)
    k_cache, v_cache = _caches(1, 64, torch.float32)
    positions = torch.tensor([1, MAX_POSITION, 2])
    q_rot = rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, torch.tensor([0, 1, 2]))
    assert torch.isnan(q_rot[1]).all() and torch.isnan(k_cache[1]).all()
    assert not torch.isnan(q_rot[[0, 2]]).any() and not torch.isnan(k_cache[[0, 2]]).any()


def test_no_tokens() -> None:
    q, k, v, _ = _qkv(0, 2, 1, 64, torch.float32, seed=0)
    cos, sin = _tables(64)
    k_cache, v_cache = _caches(1, 64, torch.float32)
    empty = torch.zeros(0, dtype=torch.int64)
    assert rope_and_cache(q, k, v, empty, cos, sin, k_cache, v_cache, empty).shape == (0, 2, 64)
    assert torch.isnan(k_cache).all()


def _bad_calls():
    q, k, v, _ = _qkv(4, 6, 2, 64, torch.float32, seed=5)
    cos, sin = _tables(64)
    k_cache, v_cache = _caches(2, 64, torch.float32)
    positions, slots = _indices(4, seed=5)
    args = dict(q=q, k=k, v=v, positions=positions, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache,
                slot_mapping=slots)

    def call(**changes):
        return lambda: rope_and_cache(**{**args, **changes})

    return {
        "q-2d": (call(q=q[:, 0]), "q"),
        "q-int": (call(q=q.long()), "q"),
        "q-last-dim-strided": (call(q=q.transpose(1, 2)), "q"),
        "k-tokens": (call(k=k[:3]), "k"),
        "k-head-dim": (call(k=k[..., :32]), "k"),
        "v-heads": (call(v=v[:, :1]), "v"),
        "v-dtype": (call(v=v.half()), "v"),
        "k-cache-heads": (call(k_cache=k_cache[:, :1]), "k_cache"),
        "v-cache-slots": (call(v_cache=v_cache[:10]), "v_cache"),
        "k-cache-dtype": (call(k_cache=k_cache.half()), "k_cache"),
        "positions-float": (call(positions=positions.float()), "positions"),
        "positions-length": (call(positions=positions[:3]), "positions"),
        "slots-float": (call(slot_mapping=slots.float()), "slot_mapping"),
        "slots-device": (call(slot_mapping=slots.to("meta")), "slot_mapping"),
        "cos-width": (call(cos=cos[:, :16]), "cos"),
        "cos-dtype": (call(cos=cos.half()), "cos"),
        "sin-shape": (call(sin=sin[:10]), "sin"),
        "odd-head-dim": (call(q=q[..., :63], k=k[..., :63], v=v[..., :63]), "head_dim"),
        "out-shape": (call(out=torch.empty(4, 6, 32)), "out"),
        "out-and-inplace": (call(out=torch.empty(4, 6, 64), inplace_q=True), "out"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_rejects_bad_inputs(case: str) -> None:
    call, name = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


def test_compiles_for_gpu() -> None:
    jobs, labels = [], []
    for num_q_heads, head_dim in ((9, 64), (32, 128)):
        block_half, block_heads = _launch_config(num_q_heads, head_dim)
        constexprs = dict(HALF=head_dim // 2, BLOCK_HALF=block_half, BLOCK_HEADS=block_heads)
        for dtype in ("fp16", "bf16"):
            sig = {name: "*" + dtype for name in ("q_ptr", "k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
            sig.update(pos_ptr="*i64", slot_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32")
            for name in ("num_q_heads", "num_kv_heads", "max_position", "num_q_blocks", "q_stride_t", "q_stride_h",
                         "k_stride_t", "k_stride_h", "v_stride_t", "v_stride_h", "cos_stride", "sin_stride",
                         "kc_stride_s", "kc_stride_h", "vc_stride_s", "vc_stride_h", "out_stride_t", "out_stride_h"):
                sig[name] = "i32"
            sig.update({name: "constexpr" for name in constexprs})
            for arch in GPU_ARCHS:
                jobs.append(dict(signature=sig, constexprs=constexprs, arch=arch, num_warps=NUM_WARPS))
                labels.append((f"rope_and_cache Hq={num_q_heads} D={head_dim} {dtype}", arch))
    for (label, arch), usage in zip(labels, compile_many(_rope_and_cache_kernel, jobs)):
        assert_no_spills(label, arch, usage)
