"""Cascade attention (kernels/cascade_attention.py) against its float64 reference, under the interpreter.

B branches of one prompt: a shared prefix in its own shuffled blocks, and each branch's own
suffix blocks. Slots that belong to nobody, the tail of the prefix's last block and table padding
(block 0 is never handed out) hold NaN, so a read outside a branch's keys shows up as NaN. A
small config (16-row tiles, 32-key splits) puts short prefixes over several splits and a few
branches over several row tiles cheaply.
"""
from __future__ import annotations

import math

import pytest
import torch
from kernel_harness import GPU_ARCHS, TEST_DTYPES, assert_close, assert_no_spills, compile_many, poisoned

from lockstep.kernels.cascade_attention import (
    _cascade_merge_kernel,
    _cascade_prefix_kernel,
    _Config,
    _config,
    _launch,
    cascade_attention,
    cascade_attention_reference,
)
from lockstep.kernels.decode_attention import SPLIT_TARGET, _input_precision, decode_attention

SMALL = _Config(block_m=16, block_n=16, split_tokens=32, num_warps=4, num_stages=1)


def make_branches(prefix_len: int, suffix_lens: list[int], num_kv_heads: int, group: int, head_dim: int,
                  block_size: int, dtype: torch.dtype, seed: int, spare_prefix_blocks: int = 0) -> dict:
    """A prompt's prefix blocks, then each branch's suffix blocks, all shuffled over one arena."""
    gen = torch.Generator().manual_seed(seed)
    prefix_blocks = math.ceil(prefix_len / block_size) + spare_prefix_blocks
    suffix_blocks = [math.ceil(n / block_size) for n in suffix_lens]
    num_blocks = 1 + prefix_blocks + sum(suffix_blocks) + 2  # block 0 and two more are spare
    order = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    k = torch.full((num_blocks * block_size, num_kv_heads, head_dim), float("nan"))
    v = k.clone()

    def fill(table: torch.Tensor, n: int) -> None:
        pos = torch.arange(n)
        slots = table[pos // block_size].long() * block_size + pos % block_size
        k[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        v[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen)

    prefix_table = torch.tensor(order[:prefix_blocks], dtype=torch.int32)
    order = order[prefix_blocks:]
    fill(prefix_table, prefix_len)
    suffix_tables = torch.zeros(len(suffix_lens), max(suffix_blocks + [1]), dtype=torch.int32)
    for b, n in enumerate(suffix_blocks):
        suffix_tables[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
        fill(suffix_tables[b], suffix_lens[b])
    q = torch.randn(len(suffix_lens), num_kv_heads * group, head_dim, generator=gen)
    return dict(q=q.to(dtype), k_cache=k.to(dtype), v_cache=v.to(dtype), prefix_block_table=prefix_table,
                prefix_len=prefix_len, suffix_block_tables=suffix_tables,
                suffix_lens=torch.tensor(suffix_lens, dtype=torch.int32), block_size=block_size,
                scale=head_dim ** -0.5)


def check(batch: dict, cfg: _Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    dtype = batch["q"].dtype
    if out is None:
        out = poisoned(batch["q"].shape, dtype)
    if cfg is None:
        got = cascade_attention(**batch, out=out)
    else:
        got = _launch(**batch, out=out, cfg=cfg)
    assert got is out
    assert_close(got, cascade_attention_reference(**batch), dtype)
    return got


SUFFIXES = [0, 1, 5, 16, 17, 33, 2]  # branch b's suffix length: none, one token, a block, a block + 1, ...


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("prefix_len", [0, 1, 16, 17, 75])
@pytest.mark.parametrize("branches", [1, 3, 7])
def test_branches_match_reference(branches: int, prefix_len: int, dtype: torch.dtype) -> None:
    """Small config: 75 prefix keys are three 32-key splits; 7 branches x 4 heads are two 16-row tiles."""
    suffixes = SUFFIXES[:branches] if prefix_len else [n + 1 for n in SUFFIXES[:branches]]
    check(make_branches(prefix_len, suffixes, 2, 4, 64, 16, dtype, seed=branches * 100 + prefix_len), SMALL)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gqa_and_head_dims_with_shipped_config(head_dim: int, group: int, dtype: torch.dtype) -> None:
    num_kv_heads = 1 if group == 8 else 2
    check(make_branches(40, [0, 1, 20], num_kv_heads, group, head_dim, 16, dtype, seed=head_dim + group,
                        spare_prefix_blocks=1))


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_shipped_config_many_splits_and_row_tiles(dtype: torch.dtype) -> None:
    """A prefix over three 256-key splits, 9 branches x 8 heads = 72 rows (two 64-row tiles in fp16,
    five 16-row tiles in fp32), and a suffix that crosses a decode split."""
    cfg = _config(dtype, 64, 16)
    assert cfg.split_tokens == SPLIT_TARGET and 9 * 8 > cfg.block_m
    check(make_branches(2 * SPLIT_TARGET + 21, [0, 1, 3, 16, 17, 2, 0, SPLIT_TARGET + 3, 9], 1, 8, 64, 16, dtype,
                        seed=12))


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_empty_prefix_and_suffix_give_zeros(dtype: torch.dtype) -> None:
    batch = make_branches(0, [0, 3], 2, 2, 64, 16, dtype, seed=13)
    got = check(batch, SMALL)
    assert (got[0] == 0).all()


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("prefix_len", [32, 96])
def test_equals_decode_attention_on_full_tables(prefix_len: int, dtype: torch.dtype) -> None:
    """With a block-aligned prefix, branch b is a plain sequence with table prefix ++ suffix_b."""
    batch = make_branches(prefix_len, [0, 1, 17, 40], 2, 3, 64, 16, dtype, seed=prefix_len)
    got = check(batch, SMALL)
    prefix_table = batch["prefix_block_table"]
    tables = torch.cat((prefix_table.expand(4, -1), batch["suffix_block_tables"]), dim=1).contiguous()
    decoded = decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], tables,
                               batch["suffix_lens"] + prefix_len, batch["block_size"], batch["scale"])
    assert_close(got, decoded.float(), dtype)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_strided_q_and_output(dtype: torch.dtype) -> None:
    """q as a slice of a fused QKV projection, out a column slice of a wider buffer."""
    hkv, group, d = 2, 2, 64
    batch = make_branches(50, [3, 0, 20], hkv, group, d, 16, dtype, seed=14)
    q = batch["q"]
    qkv = torch.randn(q.shape[0], (hkv * group + 2 * hkv) * d).to(dtype)
    qkv[:, :hkv * group * d] = q.reshape(q.shape[0], -1)
    batch["q"] = qkv[:, :hkv * group * d].view(q.shape[0], hkv * group, d)
    assert not batch["q"].is_contiguous()
    wide = poisoned((q.shape[0], hkv * group + 1, d), dtype)
    check(batch, SMALL, out=wide[:, 1:])
    assert torch.isnan(wide[:, 0]).all()


def _good() -> dict:
    return make_branches(20, [3, 0], 2, 2, 64, 16, torch.float32, seed=15)


@pytest.mark.parametrize("name, change, message", [
    ("q", lambda b: b.update(q=b["q"].to(torch.int32)), "q must have dtype"),
    ("k_cache", lambda b: b.update(k_cache=b["k_cache"][..., :32]), "k_cache must have shape"),
    ("v_cache", lambda b: b.update(v_cache=b["v_cache"].half()), "inputs must share one dtype"),
    ("prefix_block_table", lambda b: b.update(prefix_block_table=b["prefix_block_table"].long()),
     "prefix_block_table must have dtype"),
    ("prefix_block_table", lambda b: b.update(prefix_block_table=b["prefix_block_table"][None]),
     "prefix_block_table must have 1 dimensions"),
    ("prefix_len", lambda b: b.update(prefix_len=33), "prefix_len must be an int in 0..32"),
    ("prefix_len", lambda b: b.update(prefix_len=-1), "prefix_len must be an int"),
    ("prefix_len", lambda b: b.update(prefix_len=torch.tensor(20)), "prefix_len must be an int"),
    ("suffix_block_tables", lambda b: b.update(suffix_block_tables=b["suffix_block_tables"][:1]),
     "suffix_block_tables must have shape"),
    ("suffix_lens", lambda b: b.update(suffix_lens=b["suffix_lens"].long()), "suffix_lens must have dtype"),
    ("block_size", lambda b: b.update(block_size=-16), "block_size must be a positive int"),
    ("scale", lambda b: b.update(scale=None), "scale must be a finite float"),
    ("out", lambda b: b.update(out=torch.empty(2, 4, 64, dtype=torch.float16)), "out must have dtype"),
    ("out", lambda b: b.update(out=torch.empty(2, 4, 63)), "out must have shape"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(name: str, change, message: str) -> None:
    batch = _good()
    change(batch)
    with pytest.raises(ValueError, match=message) as err:
        cascade_attention(**batch)
    assert name in str(err.value)


def test_compiles_for_gpus_without_spills() -> None:
    """Prefix and merge kernels, fp16/bf16/fp32 at head_dim 64 and 128, GQA group 4, on sm_80 and sm_90.
    (The suffix runs decode attention's kernels, compiled by its own test.)"""
    strides = ["stride_qb", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh"]
    prefix_jobs, merge_jobs, labels = [], [], []
    for dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for head_dim in (64, 128):
            cfg = _config(dtype, head_dim, 16)
            prefix_constexprs = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=cfg.block_m, BLOCK_SIZE=16,
                                     BLOCK_N=cfg.block_n, SPLIT_TOKENS=cfg.split_tokens,
                                     INPUT_PRECISION=_input_precision(dtype))
            prefix_signature = {**{n: f"*{ty}" for n in ("q_ptr", "k_ptr", "v_ptr")},
                                "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "prefix_table_ptr": "*i32",
                                "prefix_len": "i32", "num_rows": "i32", "max_splits": "i32", "qk_scale": "fp32",
                                **{n: "i32" for n in strides}, **{n: "constexpr" for n in prefix_constexprs}}
            merge_constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim)
            merge_signature = {"out_ptr": f"*{ty}",
                               **{n: "*fp32" for n in ("part_out_ptr", "part_lse_ptr", "suffix_out_ptr",
                                                       "suffix_lse_ptr")},
                               "num_prefix_splits": "i32", "max_splits": "i32", "stride_ob": "i32", "stride_oh": "i32",
                               **{n: "constexpr" for n in merge_constexprs}}
            for arch in GPU_ARCHS:
                prefix_jobs.append(dict(signature=prefix_signature, constexprs=prefix_constexprs, arch=arch,
                                        num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                merge_jobs.append(dict(signature=merge_signature, constexprs=merge_constexprs, arch=arch,
                                       num_warps=1))
                labels.append((f"{ty} d{head_dim}", arch))
    for kernel, jobs in ((_cascade_prefix_kernel, prefix_jobs), (_cascade_merge_kernel, merge_jobs)):
        for (label, arch), usage in zip(labels, compile_many(kernel, jobs)):
            assert_no_spills(f"{kernel.fn.__name__} {label}", arch, usage)
