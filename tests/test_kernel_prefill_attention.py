"""Prefill attention (kernels/prefill_attention.py) against its float64 reference, under the interpreter.

Every batch is ragged and mixes fresh prompts with chunks that continue a cached prefix; block
tables are shuffled over the arena. Cache slots that belong to no sequence, and table padding
(block 0 is never handed out), hold NaN, so a read outside a sequence's context shows up as NaN.
"""
from __future__ import annotations


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

from lockstep.kernels.prefill_attention import (
    _prefill_attention_kernel,
    _block_d,
    _Config,
    _config,
    _input_precision,
    _launch,
    _vec,
    prefill_attention,
    prefill_attention_reference,
)


def make_batch(q_lens: list[int], prefixes: list[int], num_kv_heads: int, group: int, head_dim: int,
               block_size: int, dtype: torch.dtype, seed: int) -> dict:
    """A ragged step: sequence b has prefixes[b] cached tokens and q_lens[b] new ones (already cached)."""
    gen = torch.Generator().manual_seed(seed)
    ctx = [p + n for p, n in zip(prefixes, q_lens)]
    k, v, tables = paged_cache(ctx, num_kv_heads, head_dim, block_size, gen)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return dict(q=q.to(dtype), k_cache=k.to(dtype), v_cache=v.to(dtype), block_tables=tables, query_start=starts,
                seq_lens=torch.tensor(ctx, dtype=torch.int32), block_size=block_size, scale=head_dim ** -0.5)


def check(batch: dict, dtype: torch.dtype, cfg: _Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = poisoned(batch["q"].shape, dtype)
    if cfg is None:
        got = prefill_attention(**batch, out=out)
        assert got is out
    else:
        got = _launch(**batch, out=out, cfg=cfg)
    assert_close(got, prefill_attention_reference(**batch), dtype)
    return got


# A ragged batch: query lengths 1, one block (16) and one more (17), fresh and behind a prefix.
Q_LENS = [17, 1, 16, 1, 17]
PREFIXES = [0, 0, 21, 40, 5]


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_ragged_batch(head_dim: int, group: int, dtype: torch.dtype) -> None:
    num_kv_heads = 1 if group == 8 else 2
    batch = make_batch(Q_LENS, PREFIXES, num_kv_heads, group, head_dim, 16, dtype, seed=head_dim + group)
    check(batch, dtype)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_small_tiles_span_many_query_tiles_and_key_blocks(block_size: int, dtype: torch.dtype) -> None:
    """16 x 16 tiles: sequences over several query tiles, unmasked key blocks, cache blocks != key blocks."""
    batch = make_batch([33, 16, 1, 17, 40], [0, 16, 47, 3, 29], 2, 2, 64, block_size, dtype, seed=block_size)
    check(batch, dtype, cfg=_Config(block_m=16, block_n=16, num_warps=4, num_stages=1))


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_long_prefix_uses_unmasked_key_blocks(dtype: torch.dtype) -> None:
    """With the shipped tiles, a prefix longer than a key block takes the unmasked path."""
    batch = make_batch([17, 2], [150, 131], 2, 4, 64, 16, dtype, seed=3)
    check(batch, dtype)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_head_dim_not_a_power_of_two(dtype: torch.dtype) -> None:
    """head_dim 80 runs in a 128-wide tile with the padding masked off."""
    check(make_batch([17, 3], [0, 70], 1, 2, 80, 16, dtype, seed=2), dtype)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_empty_sequences_and_single_sequence(dtype: torch.dtype) -> None:
    check(make_batch([0, 5, 0], [7, 0, 3], 2, 3, 64, 16, dtype, seed=4), dtype)
    check(make_batch([16], [0], 2, 3, 64, 16, dtype, seed=5), dtype)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_strided_inputs_and_output(dtype: torch.dtype) -> None:
    """q as a slice of a fused QKV projection, K/V as halves of one [slots, 2, Hkv, D] arena, out a column slice."""
    hkv, group, d = 2, 3, 64
    batch = make_batch(Q_LENS, PREFIXES, hkv, group, d, 16, dtype, seed=6)
    q = batch["q"]
    qkv = torch.randn(q.shape[0], (hkv * group + 2 * hkv) * d).to(dtype)
    qkv[:, :hkv * group * d] = q.reshape(q.shape[0], -1)
    batch["q"] = qkv[:, :hkv * group * d].view(q.shape[0], hkv * group, d)
    kv = torch.stack((batch["k_cache"], batch["v_cache"]), dim=1)
    batch["k_cache"], batch["v_cache"] = kv[:, 0], kv[:, 1]
    assert not batch["q"].is_contiguous() and not batch["k_cache"].is_contiguous()
    wide = poisoned((q.shape[0], hkv * group + 1, d), dtype)
    check(batch, dtype, out=wide[:, 1:])
    assert torch.isnan(wide[:, 0]).all()  # the column outside the output view is untouched


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_unaligned_rows_take_the_scalar_path(dtype: torch.dtype) -> None:
    """Rows that do not start on 16-byte boundaries run with VEC == 1 (scalar loads, rows across threads)."""
    hkv, group, d = 2, 2, 64
    batch = make_batch(Q_LENS, PREFIXES, hkv, group, d, 16, dtype, seed=7)
    assert _vec(batch["q"], batch["k_cache"], batch["v_cache"]) == 16 // batch["q"].element_size()

    def shifted(t: torch.Tensor) -> torch.Tensor:  # the same values, one element past an aligned base
        flat = torch.full((t.numel() + 1,), float("nan"), dtype=t.dtype)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)

    batch["q"] = shifted(batch["q"])
    batch["v_cache"] = shifted(batch["v_cache"])
    out = poisoned((batch["q"].shape[0] * batch["q"].shape[1] * d + 1,), dtype)[1:].view(batch["q"].shape)
    assert _vec(batch["q"], batch["k_cache"], batch["v_cache"], out) == 1
    check(batch, dtype, out=out)
    # Odd strides with an aligned base: a head_dim 80 cache padded to 81 columns per row.
    batch = make_batch([17, 3], [0, 70], 1, 2, 80, 16, dtype, seed=2)
    padded = torch.full((batch["k_cache"].shape[0], 1, 81), float("nan"), dtype=dtype)
    padded[..., :80] = batch["k_cache"]
    batch["k_cache"] = padded[..., :80]
    assert _vec(batch["k_cache"]) == 1
    check(batch, dtype)


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_rows_do_not_depend_on_chunking_or_batch(dtype: torch.dtype) -> None:
    """Batch invariance: a prompt's rows are bit-identical whole, in chunks, or beside other sequences."""
    whole = make_batch([40], [0], 2, 4, 64, 16, dtype, seed=8)
    full = prefill_attention(**whole)
    for lo, hi in ((0, 13), (13, 30), (30, 40)):
        chunk = dict(whole, q=whole["q"][lo:hi], query_start=torch.tensor([0, hi - lo], dtype=torch.int32),
                     seq_lens=torch.tensor([hi], dtype=torch.int32))
        assert torch.equal(prefill_attention(**chunk), full[lo:hi])
    # The same prompt second in a batch, after an unrelated sequence.
    other = make_batch([7], [9], 2, 4, 64, 16, dtype, seed=9)
    offset = other["k_cache"].shape[0] // 16
    both = dict(whole,
                q=torch.cat((other["q"], whole["q"])),
                k_cache=torch.cat((other["k_cache"], whole["k_cache"])),
                v_cache=torch.cat((other["v_cache"], whole["v_cache"])),
                block_tables=torch.cat((torch.nn.functional.pad(other["block_tables"], (0, 2)),
                                        whole["block_tables"] + offset)),
                query_start=torch.tensor([0, 7, 47], dtype=torch.int32),
                seq_lens=torch.tensor([16, 40], dtype=torch.int32))
    assert torch.equal(prefill_attention(**both)[7:], full)


def _good(dtype: torch.dtype = torch.float32) -> dict:
    return make_batch([3, 2], [0, 4], 2, 2, 64, 16, dtype, seed=10)


@pytest.mark.parametrize("name, change, message", [
    ("q", lambda b: b.update(q=b["q"].to(torch.int32)), "q must have dtype"),
    ("q", lambda b: b.update(q=b["q"][..., ::2]), "q must have a contiguous last dimension"),
    ("q", lambda b: b.update(q=torch.randn(5, 4, 256)), "q.s head_dim must be in 1..128"),
    ("k_cache", lambda b: b.update(k_cache=b["k_cache"][..., :32]), "k_cache must have shape"),
    ("v_cache", lambda b: b.update(v_cache=b["v_cache"][:-1]), "v_cache must have shape"),
    ("v_cache", lambda b: b.update(v_cache=b["v_cache"].half()), "inputs must share one dtype"),
    ("k_cache", lambda b: b.update(q=torch.randn(5, 3, 64)), "multiple of k_cache's 2 kv heads"),
    ("block_tables", lambda b: b.update(block_tables=b["block_tables"].long()), "block_tables must have dtype"),
    ("query_start", lambda b: b.update(query_start=b["query_start"][:-1]), "query_start must have shape"),
    ("seq_lens", lambda b: b.update(seq_lens=b["seq_lens"].float()), "seq_lens must have dtype"),
    ("block_size", lambda b: b.update(block_size=0), "block_size must be a positive int"),
    ("scale", lambda b: b.update(scale=float("nan")), "scale must be a finite float"),
    ("out", lambda b: b.update(out=torch.empty(5, 4, 64, dtype=torch.float16)), "out must have dtype"),
    ("out", lambda b: b.update(out=torch.empty(4, 4, 64)), "out must have shape"),
    ("seq_lens", lambda b: b.update(seq_lens=b["seq_lens"].to("meta")), "seq_lens is on meta"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(name: str, change, message: str) -> None:
    batch = _good()
    change(batch)
    with pytest.raises(ValueError, match=message) as err:
        prefill_attention(**batch)
    assert name in str(err.value)


def test_compiles_for_gpus_without_spills() -> None:
    """Every shipped config, with aligned rows (vectorized loads) and without (scalar loads), fits in registers."""
    names = ["q_ptr", "k_ptr", "v_ptr", "out_ptr"]
    strides = ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot",
               "stride_oh", "stride_bt"]
    # bf16 is the same code as fp16 at 64; head_dim 80 runs the d-masked loads in a 128-wide tile.
    variants = [(torch.float16, "fp16", 64), (torch.float16, "fp16", 80), (torch.float16, "fp16", 128),
                (torch.bfloat16, "bf16", 128), (torch.float32, "fp32", 64), (torch.float32, "fp32", 128)]
    jobs, labels = [], []
    for dtype, ty, head_dim in variants:
        cfg = _config(dtype, head_dim)
        for vec in (16 // dtype.itemsize, 1):
            constexprs = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_SIZE=16,
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, INPUT_PRECISION=_input_precision(dtype),
                              VEC=vec)
            signature = {**{n: f"*{ty}" for n in names},
                         **{n: "*i32" for n in ("block_tables_ptr", "query_start_ptr", "seq_lens_ptr")},
                         "num_seqs": "i32", "qk_scale": "fp32", **{n: "i32" for n in strides},
                         **{n: "constexpr" for n in constexprs}}
            for arch in GPU_ARCHS:
                jobs.append(dict(signature=signature, constexprs=constexprs, arch=arch,
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                labels.append((f"prefill_attention {ty} d{head_dim} vec{vec}", arch))
    for (label, arch), usage in zip(labels, compile_many(_prefill_attention_kernel, jobs)):
        assert_no_spills(label, arch, usage)
