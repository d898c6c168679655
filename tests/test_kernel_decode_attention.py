"""Decode attention (kernels/decode_attention.py) against its float64 reference, under the interpreter.

Block tables are shuffled over the arena. Cache slots that belong to no sequence, and table
padding (block 0 is never handed out), hold NaN, so a read outside a sequence's context shows
up as NaN. Split boundaries are tested both with the shipped 256-key splits and with 32-key
splits (a small config), which put a short sequence over several splits cheaply.
"""
from __future__ import annotations

import math

import pytest
import torch
from kernel_harness import (
    GPU_ARCHS,
    TEST_DTYPES,
    assert_close,
    assert_no_spills,
    compile_many,
    paged_cache,
    poisoned,
)

from lockstep.kernels.decode_attention import (
    SPLIT_TARGET,
    _block_h,
    _Config,
    _config,
    _decode_merge_kernel,
    _decode_split_kernel,
    _input_precision,
    _launch,
    decode_attention,
    decode_attention_reference,
    decode_attention_with_lse,
    decode_attention_with_lse_reference,
)

# 32-key splits over 16-key tiles: lengths of a few dozen keys cross several splits.
SMALL = _Config(block_n=16, split_tokens=32, num_warps=4, num_stages=1)


def make_batch(seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int, block_size: int,
               dtype: torch.dtype, seed: int) -> dict:
    """One decode step: sequence b has seq_lens[b] tokens cached (its new token included)."""
    gen = torch.Generator().manual_seed(seed)
    k, v, tables = paged_cache(seq_lens, num_kv_heads, head_dim, block_size, gen)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen)
    return dict(q=q.to(dtype), k_cache=k.to(dtype), v_cache=v.to(dtype), block_tables=tables,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_size=block_size, scale=head_dim ** -0.5)


def run(batch: dict, cfg: _Config | None = None, out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None) -> torch.Tensor:
    """The public launcher with the shipped config, or `_launch` with a test config."""
    if out is None:
        out = poisoned(batch["q"].shape, batch["q"].dtype)
    if cfg is None:
        if lse is None:
            got = decode_attention(**batch, out=out)
        else:
            got, got_lse = decode_attention_with_lse(**batch, out=out, lse_out=lse)
            assert got_lse is lse
    else:
        _launch(**batch, out=out, lse=lse, cfg=cfg)
        got = out
    assert got is out
    return got


def check(batch: dict, cfg: _Config | None = None) -> None:
    """Output and log-sum-exp against the reference (the lse through the same launch)."""
    dtype = batch["q"].dtype
    lse = poisoned(batch["q"].shape[:2], torch.float32)
    got = run(batch, cfg, lse=lse)
    ref, ref_lse = decode_attention_with_lse_reference(**batch)
    assert_close(got, ref, dtype)
    empty = batch["seq_lens"] == 0
    assert torch.isneginf(lse[empty]).all()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=1e-5, rtol=1e-5)


# Length 1, exactly one block (16), one more (17), and a few more blocks.
LENS = [17, 1, 16, 40, 5]


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_batch_matches_reference(head_dim: int, group: int, dtype: torch.dtype) -> None:
    num_kv_heads = 1 if group == 8 else 2
    check(make_batch(LENS, num_kv_heads, group, head_dim, 16, dtype, seed=head_dim + group))


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("group, block_size", [(1, 16), (4, 1), (4, 32)])
def test_lengths_around_split_boundaries(group: int, block_size: int, dtype: torch.dtype) -> None:
    """32-key splits: lengths just under, at and over one, two and three splits, and an empty sequence."""
    lens = [1, 31, 32, 33, 64, 65, 97, 0]
    check(make_batch(lens, 2, group, 64, block_size, dtype, seed=block_size + group), SMALL)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_shipped_splits_over_long_sequences(dtype: torch.dtype) -> None:
    """The shipped 256-key splits: one split exactly, one key over, three splits."""
    assert _config(dtype, 64, 16).split_tokens == SPLIT_TARGET
    check(make_batch([SPLIT_TARGET, SPLIT_TARGET + 1, 2 * SPLIT_TARGET + 88, 3], 2, 4, 64, 16, dtype, seed=11))


def test_split_is_whole_cache_blocks() -> None:
    assert _config(torch.float16, 128, 16).split_tokens == 256
    assert _config(torch.float16, 128, 24).split_tokens == 264
    assert _config(torch.float16, 128, 1024).split_tokens == 1024


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_head_dim_not_a_power_of_two(dtype: torch.dtype) -> None:
    """head_dim 80 runs in a 128-wide tile with the padding masked off."""
    check(make_batch([17, 3], 1, 2, 80, 16, dtype, seed=2), SMALL)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_empty_sequences_give_zeros_and_minus_inf(dtype: torch.dtype) -> None:
    batch = make_batch([0, 9, 0], 2, 3, 64, 16, dtype, seed=4)
    out, lse = decode_attention_with_lse(**batch)
    assert (out[0] == 0).all() and (out[2] == 0).all() and torch.isneginf(lse[[0, 2]]).all()
    check(batch)
    # A table with no columns at all: every sequence is empty.
    batch = dict(batch, block_tables=batch["block_tables"][:, :0], seq_lens=torch.zeros(3, dtype=torch.int32))
    check(batch)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_fp32_output_and_lse_for_a_later_merge(dtype: torch.dtype) -> None:
    """decode_attention_with_lse may write fp32 out for 16-bit inputs: no rounding before a merge."""
    batch = make_batch([40, 1, 70], 2, 4, 64, 16, dtype, seed=5)
    out, lse = decode_attention_with_lse(**batch, out=poisoned(batch["q"].shape, torch.float32))
    ref, ref_lse = decode_attention_with_lse_reference(**batch)
    assert out.dtype == torch.float32
    assert_close(out, ref, dtype)
    if dtype != torch.float32:
        assert not torch.equal(out, out.to(dtype).float()), "the fp32 output was rounded to the input dtype"
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_strided_inputs_and_output(dtype: torch.dtype) -> None:
    """q as a slice of a fused QKV projection, K/V as halves of one [slots, 2, Hkv, D] arena, out a column slice."""
    hkv, group, d = 2, 3, 64
    batch = make_batch(LENS, hkv, group, d, 16, dtype, seed=6)
    q = batch["q"]
    qkv = torch.randn(q.shape[0], (hkv * group + 2 * hkv) * d).to(dtype)
    qkv[:, :hkv * group * d] = q.reshape(q.shape[0], -1)
    batch["q"] = qkv[:, :hkv * group * d].view(q.shape[0], hkv * group, d)
    kv = torch.stack((batch["k_cache"], batch["v_cache"]), dim=1)
    batch["k_cache"], batch["v_cache"] = kv[:, 0], kv[:, 1]
    assert not batch["q"].is_contiguous() and not batch["k_cache"].is_contiguous()
    wide = poisoned((q.shape[0], hkv * group + 1, d), dtype)
    got = run(batch, SMALL, out=wide[:, 1:])
    assert_close(got, decode_attention_reference(**batch), dtype)
    assert torch.isnan(wide[:, 0]).all()  # the column outside the output view is untouched


def sub_batch(batch: dict, rows: list[int], extra_columns: int = 0) -> dict:
    """The sequences `rows` of `batch` as a batch of their own, tables trimmed to the widest of them."""
    idx = torch.tensor(rows)
    lens = batch["seq_lens"][idx]
    width = max(1, math.ceil(int(lens.max()) / batch["block_size"])) + extra_columns
    tables = batch["block_tables"][idx]
    tables = torch.nn.functional.pad(tables, (0, max(0, width - tables.shape[1])))[:, :width]
    return dict(batch, q=batch["q"][idx], block_tables=tables.contiguous(), seq_lens=lens)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("shipped", [True, False], ids=["256-key-splits", "32-key-splits"])
def test_sequence_is_bit_identical_in_any_batch(shipped: bool, dtype: torch.dtype) -> None:
    """Batch invariance: a sequence decoded alone or among others (any batch size, any table width,
    any position) gives torch.equal outputs and lse, one split or three."""
    cfg = None if shipped else SMALL
    split = SPLIT_TARGET if shipped else SMALL.split_tokens
    # Sequences 0 and 1 are the ones watched: three splits and one split.
    lens = [2 * split + 37, split - 5, 1, split + 1, 16, 0]
    batch = make_batch(lens, 1, 4, 64, 16, dtype, seed=7)

    def decode(rows: list[int], extra_columns: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        sub = sub_batch(batch, rows, extra_columns)
        lse = poisoned(sub["q"].shape[:2], torch.float32)
        return run(sub, cfg, lse=lse), lse

    for watched in (0, 1):
        alone, alone_lse = decode([watched])
        assert_close(alone, decode_attention_reference(**sub_batch(batch, [watched])), dtype)
        for rows, extra in (([watched, 2], 0), ([3, watched], 3), ([4, 5, watched, 2], 0),
                            ([5, 4, 3, 2, 1 - watched, watched], 1)):
            out, lse = decode(rows, extra)
            pos = rows.index(watched)
            assert torch.equal(out[pos], alone[0]), f"sequence {watched} changed in batch {rows}"
            assert torch.equal(lse[pos], alone_lse[0]), f"sequence {watched}'s lse changed in batch {rows}"


def test_gqa_group_is_one_tile() -> None:
    """Group heads are padded to 16 rows for tl.dot; larger groups take the next power of two."""
    assert [_block_h(g) for g in (1, 3, 8, 16, 24)] == [16, 16, 16, 16, 32]


def _good() -> dict:
    return make_batch([3, 20], 2, 2, 64, 16, torch.float32, seed=10)


@pytest.mark.parametrize("name, change, message", [
    ("q", lambda b: b.update(q=b["q"].to(torch.int32)), "q must have dtype"),
    ("q", lambda b: b.update(q=b["q"][..., ::2]), "q must have a contiguous last dimension"),
    ("q", lambda b: b.update(q=torch.randn(2, 4, 256)), "q.s head_dim must be in 1..128"),
    ("k_cache", lambda b: b.update(k_cache=b["k_cache"][..., :32]), "k_cache must have shape"),
    ("v_cache", lambda b: b.update(v_cache=b["v_cache"][:-1]), "v_cache must have shape"),
    ("v_cache", lambda b: b.update(v_cache=b["v_cache"].half()), "inputs must share one dtype"),
    ("k_cache", lambda b: b.update(q=torch.randn(2, 3, 64)), "multiple of k_cache's 2 kv heads"),
    ("block_tables", lambda b: b.update(block_tables=b["block_tables"].long()), "block_tables must have dtype"),
    ("block_tables", lambda b: b.update(block_tables=b["block_tables"][:1]), "block_tables must have shape"),
    ("seq_lens", lambda b: b.update(seq_lens=b["seq_lens"].float()), "seq_lens must have dtype"),
    ("seq_lens", lambda b: b.update(seq_lens=b["seq_lens"][:1]), "seq_lens must have shape"),
    ("seq_lens", lambda b: b.update(seq_lens=b["seq_lens"].to("meta")), "seq_lens is on meta"),
    ("block_size", lambda b: b.update(block_size=0), "block_size must be a positive int"),
    ("scale", lambda b: b.update(scale=float("inf")), "scale must be a finite float"),
    ("out", lambda b: b.update(out=torch.empty(2, 4, 64, dtype=torch.float16)), "out must have dtype"),
    ("out", lambda b: b.update(out=torch.empty(3, 4, 64)), "out must have shape"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(name: str, change, message: str) -> None:
    batch = _good()
    change(batch)
    with pytest.raises(ValueError, match=message) as err:
        decode_attention(**batch)
    assert name in str(err.value)


@pytest.mark.parametrize("lse_out, message", [
    (torch.empty(2, 4, dtype=torch.float16), "lse_out must have dtype"),
    (torch.empty(2, 5), "lse_out must have shape"),
    (torch.empty(4, 2).t(), "lse_out must be contiguous"),
])
def test_bad_lse_out_raises(lse_out: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_attention_with_lse(**_good(), lse_out=lse_out)


def test_compiles_for_gpus_without_spills() -> None:
    """Both kernels, fp16/bf16/fp32 at head_dim 64 and 128, GQA group 4, on sm_80 and sm_90."""
    strides = ["stride_qb", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ob",
               "stride_oh", "stride_bt"]
    split_jobs, merge_jobs, labels = [], [], []
    for dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for head_dim in (64, 128):
            cfg = _config(dtype, head_dim, 16)
            split_constexprs = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_H=16, BLOCK_SIZE=16,
                                    BLOCK_N=cfg.block_n, SPLIT_TOKENS=cfg.split_tokens, STORE_LSE=True,
                                    INPUT_PRECISION=_input_precision(dtype))
            split_signature = {**{n: f"*{ty}" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")},
                               **{n: "*fp32" for n in ("lse_ptr", "part_out_ptr", "part_lse_ptr")},
                               "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "qk_scale": "fp32",
                               "max_blocks": "i32", "max_splits": "i32", **{n: "i32" for n in strides},
                               **{n: "constexpr" for n in split_constexprs}}
            merge_constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=16,
                                    SPLIT_TOKENS=cfg.split_tokens, STORE_LSE=True)
            merge_signature = {"out_ptr": f"*{ty}", **{n: "*fp32" for n in ("lse_ptr", "part_out_ptr", "part_lse_ptr")},
                               "seq_lens_ptr": "*i32", "max_blocks": "i32", "max_splits": "i32", "stride_ob": "i32",
                               "stride_oh": "i32", **{n: "constexpr" for n in merge_constexprs}}
            for arch in GPU_ARCHS:
                split_jobs.append(dict(signature=split_signature, constexprs=split_constexprs, arch=arch,
                                       num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                merge_jobs.append(dict(signature=merge_signature, constexprs=merge_constexprs, arch=arch,
                                       num_warps=1))
                labels.append((f"{ty} d{head_dim}", arch))
    for kernel, jobs in ((_decode_split_kernel, split_jobs), (_decode_merge_kernel, merge_jobs)):
        for (label, arch), usage in zip(labels, compile_many(kernel, jobs)):
            assert_no_spills(f"{kernel.fn.__name__} {label}", arch, usage)
