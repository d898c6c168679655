"""The CPU step ops (lockstep._core.rms_norm, add_rms_norm, rope_and_cache, paged_attention;
cpp/cpu/cpu_ops.cpp) against float64 references, and their bitwise promises: a row's (for
attention, a sequence's) result does not depend on what else is in the batch or on the thread
count.

Inputs are fresh random normals; outputs are poisoned with NaN first, so unwritten elements show.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from cpu_harness import assert_bitwise_equal

from lockstep import _core
from lockstep.runtime.model import TorchModel

# (atol, rtol) against the float64 reference, for values of order 1: a reduction of up to a few
# hundred fp32 terms, then exp and a division, stays well inside these.
TOLERANCE = {"rms_norm": (1e-6, 2e-6), "rope": (1e-6, 1e-6), "attention": (2e-6, 2e-5)}


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def normal(seed: int, *shape: int) -> np.ndarray:
    return rng(seed).standard_normal(shape, dtype=np.float32)


def assert_close(got: np.ndarray, expected: np.ndarray, tol: str) -> None:
    atol, rtol = TOLERANCE[tol]
    assert not np.isnan(got).any(), f"{int(np.isnan(got).sum())} of {got.size} outputs were never written"
    bad = np.abs(got.astype(np.float64) - expected) > atol + rtol * np.abs(expected)
    if bad.any():
        where = np.argwhere(bad)
        i = tuple(int(v) for v in where[0])
        raise AssertionError(f"{len(where)} of {bad.size} outputs off the float64 reference; first at {i}: "
                             f"got {got[i]!r}, expected {expected[i]!r} (atol {atol}, rtol {rtol})")


# ---- RMSNorm ----

def rms_norm_reference(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return weight.astype(np.float64) * x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize("rows, cols", [(1, 576), (7, 123), (3, 1), (2, 8), (5, 2049)])
def test_rms_norm_matches_reference(rows: int, cols: int) -> None:
    x, weight = normal(rows * 31 + cols, rows, cols), normal(cols, cols)
    out = np.full_like(x, np.nan)
    _core.rms_norm(x, weight, 1e-5, out)
    assert_close(out, rms_norm_reference(x, weight, 1e-5), "rms_norm")
    _core.rms_norm(x, weight, 1e-5, x)  # in place
    assert_bitwise_equal(x, out, "in place vs into out")


@pytest.mark.parametrize("rows, cols", [(1, 576), (6, 77)])
def test_add_rms_norm_adds_then_normalizes(rows: int, cols: int) -> None:
    x, residual, weight = normal(1, rows, cols), normal(2, rows, cols), normal(3, cols)
    expected_residual = residual + x
    out = np.full_like(x, np.nan)
    _core.add_rms_norm(x, residual, weight, 1e-6, out)
    assert_bitwise_equal(residual, expected_residual, "residual")
    assert_close(out, rms_norm_reference(expected_residual, weight, 1e-6), "rms_norm")
    alone = np.full_like(x, np.nan)
    _core.rms_norm(expected_residual, weight, 1e-6, alone)
    assert_bitwise_equal(out, alone, "fused vs add then rms_norm")


def test_rms_norm_rows_do_not_depend_on_the_batch() -> None:
    x, weight = normal(4, 64, 576), normal(5, 576)
    batch = np.full_like(x, np.nan)
    _core.rms_norm(x, weight, 1e-5, batch)
    for t in (0, 17, 63):
        alone = np.full_like(x[t:t + 1], np.nan)
        _core.rms_norm(x[t:t + 1], weight, 1e-5, alone)
        assert_bitwise_equal(alone[0], batch[t], f"row {t}")


# ---- RoPE + cache write ----

def rope_tables(positions: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (10000.0 ** (np.arange(half, dtype=np.float64) / half))
    freqs = np.outer(np.arange(positions), inv_freq).astype(np.float32)
    return np.cos(freqs), np.sin(freqs)


def rope_reference(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, D] float32, cos/sin [T, D/2]: rotate-half RoPE in float64."""
    half = x.shape[-1] // 2
    x64, c, s = x.astype(np.float64), cos[:, None].astype(np.float64), sin[:, None].astype(np.float64)
    x1, x2 = x64[..., :half], x64[..., half:]
    return np.concatenate((x1 * c - x2 * s, x2 * c + x1 * s), axis=-1)


@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [(1, 9, 3, 64), (5, 4, 1, 128), (13, 3, 3, 64)])
def test_rope_and_cache_matches_reference_and_model(tokens: int, heads: int, kv_heads: int, head_dim: int) -> None:
    # q, k and v are column slices of one fused qkv row, as the model passes them.
    qkv = normal(tokens + heads, tokens, (heads + 2 * kv_heads) * head_dim)
    q = qkv[:, :heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].reshape(tokens, kv_heads, head_dim)
    q0, k0, v0 = q.copy(), k.copy(), v.copy()
    cos, sin = rope_tables(400, head_dim // 2)
    positions = rng(tokens).integers(0, 400, tokens)
    slots = rng(heads).permutation(3 * tokens + 5)[:tokens]
    k_cache = np.full((3 * tokens + 5, kv_heads, head_dim), np.nan, dtype=np.float32)
    v_cache = k_cache.copy()
    _core.rope_and_cache(q, k, v, cos, sin, positions, slots, k_cache, v_cache)

    assert_close(q, rope_reference(q0, cos[positions], sin[positions]), "rope")
    assert_close(k, rope_reference(k0, cos[positions], sin[positions]), "rope")
    assert_bitwise_equal(v, v0, "v (not rotated)")
    assert_bitwise_equal(k_cache[slots], k, "k_cache at slots")
    assert_bitwise_equal(v_cache[slots], v0, "v_cache at slots")
    others = np.setdiff1d(np.arange(k_cache.shape[0]), slots)
    assert np.isnan(k_cache[others]).all() and np.isnan(v_cache[others]).all(), "wrote outside the slots"
    # The same operations as the torch path (model.py), so the same bits.
    c, s = torch.from_numpy(cos[positions]).unsqueeze(1), torch.from_numpy(sin[positions]).unsqueeze(1)
    assert_bitwise_equal(q, TorchModel.rope(None, torch.from_numpy(q0), c, s).numpy(), "q vs TorchModel.rope")


# ---- Paged attention ----

@dataclass
class PagedBatch:
    """What paged_attention reads besides q and the caches, plus each sequence's slots."""

    block_tables: np.ndarray  # int32 [S, W]
    query_start: np.ndarray  # int32 [S + 1]
    seq_lens: np.ndarray  # int32 [S]
    block_size: int
    slots: list[np.ndarray]  # sequence s's context positions' cache slots, for the reference

    def sequence(self, s: int) -> PagedBatch:
        """Sequence s alone, its query rows starting at 0."""
        n = int(self.query_start[s + 1] - self.query_start[s])
        return PagedBatch(self.block_tables[s:s + 1].copy(), np.array([0, n], np.int32), self.seq_lens[s:s + 1].copy(),
                          self.block_size, [self.slots[s]])


def make_batch(seed: int, seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, block_size: int = 16):
    """Random q and caches for sequences of (query_len, context_len), each sequence's blocks scattered
    over the arena. Block table entries past a sequence's blocks hold -7: they must never be read."""
    per_seq = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(per_seq) + 3
    q = normal(seed, sum(n for n, _ in seqs), heads, head_dim)
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k_cache, v_cache = normal(seed + 1, *shape), normal(seed + 2, *shape)
    order = rng(seed + 3).permutation(num_blocks).astype(np.int32)
    tables = np.full((len(seqs), max(per_seq, default=0) + 1), -7, np.int32)
    slots, used = [], 0
    for s, ((_, ctx), n_blocks) in enumerate(zip(seqs, per_seq)):
        tables[s, :n_blocks] = order[used:used + n_blocks]
        slots.append((tables[s, :n_blocks, None].astype(np.int64) * block_size + np.arange(block_size)).reshape(-1)[:ctx])
        used += n_blocks
    query_start = np.concatenate(([0], np.cumsum([n for n, _ in seqs]))).astype(np.int32)
    seq_lens = np.array([ctx for _, ctx in seqs], np.int32)
    return q, k_cache, v_cache, PagedBatch(tables, query_start, seq_lens, block_size, slots)


def attention(q, k_cache, v_cache, batch: PagedBatch, scale) -> np.ndarray:
    out = np.full((q.shape[0], q.shape[1] * q.shape[2]), np.nan, dtype=np.float32)
    _core.paged_attention(q, k_cache, v_cache, batch.block_tables, batch.query_start, batch.seq_lens,
                          batch.block_size, scale, out)
    return out


def attention_reference(q, k_cache, v_cache, batch: PagedBatch, scale) -> np.ndarray:
    heads, kv_heads, d = q.shape[1], k_cache.shape[1], q.shape[2]
    out = np.full((q.shape[0], heads * d), np.nan)
    for s, slots in enumerate(batch.slots):
        start, end, ctx = int(batch.query_start[s]), int(batch.query_start[s + 1]), int(batch.seq_lens[s])
        n = end - start
        if n == 0:
            continue
        k = np.repeat(k_cache[slots].astype(np.float64), heads // kv_heads, axis=1)  # [ctx, heads, d]
        v = np.repeat(v_cache[slots].astype(np.float64), heads // kv_heads, axis=1)
        qs = q[start:end].astype(np.float64)
        scores = np.einsum("qhd,khd->hqk", qs, k) * scale
        visible = np.arange(ctx)[None, :] <= (ctx - n + np.arange(n))[:, None]
        scores = np.where(visible[None], scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[start:end] = np.einsum("hqk,khd->qhd", p, v).reshape(n, -1)
    return out


SHAPES = [(9, 3, 64), (4, 4, 64), (8, 2, 128), (3, 1, 128)]  # (heads, kv_heads, head_dim): GQA 3, 1, 4, 3
# (query_len, context_len): decodes, prefill chunks, exactly one block and one more than a block
MIXED = [(1, 1), (1, 17), (1, 300), (5, 5), (7, 17), (30, 300), (1, 2), (16, 16), (3, 33)]


# head_dim 72 and 6 leave a remainder in both the 8-lane dot product and the 16-wide value sum.
@pytest.mark.parametrize("heads, kv_heads, head_dim", SHAPES + [(2, 1, 72), (3, 3, 6)])
@pytest.mark.parametrize("block_size", [16, 1, 5])
def test_paged_attention_matches_reference(heads: int, kv_heads: int, head_dim: int, block_size: int) -> None:
    q, kc, vc, batch = make_batch(heads * head_dim, MIXED, heads, kv_heads, head_dim, block_size)
    scale = 1 / math.sqrt(head_dim)
    assert_close(attention(q, kc, vc, batch, scale), attention_reference(q, kc, vc, batch, scale), "attention")


def test_paged_attention_leaves_rows_outside_sequences_and_takes_strided_q() -> None:
    heads, kv_heads, d, bs = 9, 3, 64, 4
    qkv = normal(7, 6, (heads + 2 * kv_heads) * d)
    q = qkv[:, :heads * d].reshape(6, heads, d)
    kc, vc = normal(8, 40, kv_heads, d), normal(9, 40, kv_heads, d)
    # Rows 1-2, none (query_len 0: its block table is never read), row 3; rows 0, 4 and 5 are no one's.
    tables = np.array([[0, 1, 2], [-7, -7, -7], [5, 6, -7]], np.int32)
    batch = PagedBatch(tables, np.array([1, 3, 3, 4], np.int32), np.array([10, 4, 7], np.int32), bs,
                       [np.arange(10), np.zeros(0, np.int64), np.arange(20, 27)])
    got = attention(q, kc, vc, batch, 0.125)
    assert np.isnan(got[[0, 4, 5]]).all(), "wrote rows outside every sequence"
    expected = attention_reference(q, kc, vc, batch, 0.125)
    assert_close(got[1:4], expected[1:4], "attention")


@pytest.mark.parametrize("heads, kv_heads, head_dim", SHAPES[:3])
def test_paged_attention_sequence_does_not_depend_on_the_batch(heads: int, kv_heads: int, head_dim: int) -> None:
    q, kc, vc, batch = make_batch(5, MIXED, heads, kv_heads, head_dim)
    together = attention(q, kc, vc, batch, 0.1)
    for s in range(len(MIXED)):
        start, end = int(batch.query_start[s]), int(batch.query_start[s + 1])
        alone = attention(q[start:end], kc, vc, batch.sequence(s), 0.1)
        assert_bitwise_equal(alone, together[start:end], f"sequence at rows {start}..{end}")


def test_paged_attention_does_not_depend_on_the_thread_count(threads) -> None:
    q, kc, vc, batch = make_batch(11, MIXED * 3, 9, 3, 64)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(attention(q, kc, vc, batch, 0.125))
    assert_bitwise_equal(results[1], results[0], "2 threads vs 1")
    assert_bitwise_equal(results[2], results[0], "3 threads vs 1")


# ---- Malformed inputs ----

def test_bad_arguments_raise_value_error_naming_them() -> None:
    x, w, out = normal(1, 3, 8), normal(2, 8), np.zeros((3, 8), np.float32)
    cases = [
        (lambda: _core.rms_norm(x.astype(np.float64), w, 1e-5, out), "x: expected dtype float32"),
        (lambda: _core.rms_norm(x, normal(2, 7), 1e-5, out), "weight: expected shape"),
        (lambda: _core.rms_norm(x, w, 1e-5, np.zeros((3, 9), np.float32)), "out: expected shape"),
        (lambda: _core.rms_norm(np.asfortranarray(normal(1, 8, 8)), w, 1e-5, np.zeros((8, 8), np.float32)),
         "x: must be C-contiguous"),
        (lambda: _core.rms_norm(torch.zeros(3, 8), w, 1e-5, out), "x: expected a numpy.ndarray"),
        (lambda: _core.add_rms_norm(x, x, w, 1e-5, out), "residual: overlaps x"),
    ]
    ro = np.zeros((3, 8), np.float32)
    ro.flags.writeable = False
    cases.append((lambda: _core.rms_norm(x, w, 1e-5, ro), "out: is read-only"))

    q, k, v = normal(3, 2, 4, 8), normal(4, 2, 2, 8), normal(5, 2, 2, 8)
    cos, sin = rope_tables(10, 4)
    kc, vc = np.zeros((6, 2, 8), np.float32), np.zeros((6, 2, 8), np.float32)
    pos, slots = np.array([0, 1]), np.array([2, 3])
    kc0 = kc.copy()
    cases += [
        (lambda: _core.rope_and_cache(q, k, v, cos, sin, np.array([0, 10]), slots, kc, vc), "positions: entry 1 is 10"),
        (lambda: _core.rope_and_cache(q, k, v, cos, sin, pos, np.array([2, -1]), kc, vc), "slots: entry 1 is -1"),
        (lambda: _core.rope_and_cache(q, k, v, cos, sin, pos.astype(np.int32), slots, kc, vc), "positions: expected dtype int64"),
        (lambda: _core.rope_and_cache(q, k, v, cos, sin, pos, slots, kc, np.zeros((6, 2, 4), np.float32)), "v_cache: expected shape"),
        (lambda: _core.rope_and_cache(q, k, v, cos, sin, pos, slots, kc, kc), "k_cache: overlaps v_cache"),
        (lambda: _core.rope_and_cache(q[:, :, ::2], k, v, cos, sin, pos, slots, kc, vc), "q: each row must be C-contiguous"),
    ]

    # kc holds 3 blocks of 2 slots; sequence 0: row 0, 3 positions; sequence 1: row 1, 2 positions.
    tables, qstart, lens = np.array([[0, 1], [2, -7]], np.int32), np.array([0, 1, 2], np.int32), np.array([3, 2], np.int32)
    o = np.zeros((2, 32), np.float32)

    def attend(tables=tables, qstart=qstart, lens=lens, bs=2, kc=kc, vc=vc, out=o):
        return lambda: _core.paged_attention(q, kc, vc, tables, qstart, lens, bs, 0.1, out)

    cases += [
        (attend(tables=np.array([[0, 3], [2, -7]], np.int32)), "block_tables: row 0, entry 1 is 3, outside [0, 3)"),
        (attend(tables=np.array([[0, 1], [-1, 0]], np.int32)), "block_tables: row 1, entry 0 is -1"),
        (attend(bs=3), "block_tables: row 1, entry 0 is 2, outside [0, 2)"),  # 6 slots hold 2 blocks of 3
        (attend(bs=0), "block_size: must be >= 1"),
        (attend(qstart=np.array([0, 2, 1], np.int32)), "query_start: entry 2 is 1, less than entry 1"),
        (attend(qstart=np.array([0, 1, 3], np.int32)), "query_start: entry 2 is 3, past q's 2 rows"),
        (attend(qstart=np.array([-1, 1, 2], np.int32)), "query_start: entry 0 is -1"),
        (attend(qstart=np.array([0, 2, 2], np.int32), lens=np.array([1, 2], np.int32)), "seq_lens: entry 0 is 1, outside"),
        (attend(lens=np.array([5, 2], np.int32)), "seq_lens: entry 0 is 5, outside [query_len 1, 4"),
        (attend(kc=np.zeros((6, 3, 8), np.float32), vc=np.zeros((6, 3, 8), np.float32)), "kv heads do not divide"),
        (attend(tables=tables.astype(np.int64)), "block_tables: expected dtype int32"),
        (attend(qstart=qstart[:2].copy()), "query_start: expected shape (3,)"),
        (attend(lens=np.array([3, 2, 1], np.int32)), "seq_lens: expected shape (2,)"),
        (attend(out=np.zeros((2, 31), np.float32)), "out: expected shape"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    assert_bitwise_equal(kc, kc0, "k_cache after rejected calls")


# ---- In the model ----

def test_engine_uses_the_ops_with_the_native_kernels_only(make_engine) -> None:
    assert make_engine().runner.native_ops
    assert not make_engine(cpu_kernels="torch").runner.native_ops


def test_native_ops_forward_matches_the_torch_ops_forward(make_engine) -> None:
    """Same matmuls, norm/RoPE/attention by _core or by torch: the same greedy tokens, and
    logprobs within fp32 reordering noise, through chunked prefill beside decodes."""
    from lockstep.runtime.sampling_params import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    results = []
    for native in (True, False):
        engine = make_engine(max_batched_tokens=8)
        engine.runner.native_ops = native
        results.append(engine.generate(prompts, [params, params]))
    for ours, theirs in zip(*results):
        assert ours.output_ids == theirs.output_ids
        np.testing.assert_allclose(ours.logprobs, theirs.logprobs, atol=2e-3)
        assert ours.logprobs != theirs.logprobs  # really two different paths
