"""The C++ CPU sampler (cpp/cpu/sampling.cpp), through runtime.sampler.sample as the engine calls it,
against the reference sampler (runtime.sampler.sample_row, which sorts the whole vocabulary).

Philox and greedy must match bit for bit. Sampled tokens must equal the reference's except where
a decision sits within float rounding of a boundary (tests/sampling_harness.py). The frequencies
of sampled tokens against a numpy statement of the filters are in tests/test_sampler.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sampling_harness import check_against_reference, exact_boundary_cases, greedy_tie_rows, make_rows

from lockstep import _core
from lockstep.runtime.sampler import sample, uniform
from lockstep.runtime.sampling_params import SamplingParams


def runtime_sampler(logits, temperature, top_k, top_p, min_p, seeds, positions, branches,
                    banned=None) -> tuple[torch.Tensor, torch.Tensor]:
    """runtime.sampler.sample on the harness's batch: one SamplingParams and key per row."""
    params = [SamplingParams(temperature=float(t), top_k=int(k), top_p=float(p), min_p=float(m))
              for t, k, p, m in zip(temperature.tolist(), top_k.tolist(), top_p.tolist(), min_p.tolist())]
    keys = [(s & (2**64 - 1), p, b) for s, p, b in zip(seeds.tolist(), positions.tolist(), branches.tolist())]
    result = sample(logits, params, keys, banned)
    return torch.tensor(result.token_ids, dtype=torch.int64), torch.tensor(result.logprobs, dtype=torch.float32)


def test_philox_uniform_is_bitwise_the_python_one() -> None:
    rng = np.random.default_rng(0)
    seeds = [int(s) for s in rng.integers(0, 2**64 - 1, 500, dtype=np.uint64)] + [0, 1, 2**32 - 1, 2**32, 2**64 - 1]
    positions = [int(p) for p in rng.integers(0, 2**40, len(seeds))]
    branches = [int(b) for b in rng.integers(0, 2**32, len(seeds))]
    for s, p, b in zip(seeds, positions, branches):
        assert _core.philox_uniform(s, p, b) == uniform(s, p, b), (s, p, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_greedy_is_the_first_argmax(dtype: torch.dtype) -> None:
    batch, expected = greedy_tie_rows(dtype)
    tokens, _ = check_against_reference(runtime_sampler, batch, exact=True)
    assert tokens.tolist() == expected


@pytest.mark.parametrize("dtype, vocab, rows, ties", [
    (torch.float32, 1000, 96, False),
    (torch.float16, 1000, 64, False),
    (torch.float16, 1000, 64, True),
    (torch.float32, 4099, 32, False),
    (torch.float32, 49152, 12, False),  # the default model's vocabulary
])
def test_matches_the_reference_with_mixed_params(dtype: torch.dtype, vocab: int, rows: int, ties: bool) -> None:
    check_against_reference(runtime_sampler, make_rows(rows, vocab, dtype, seed=vocab + rows + ties))


def test_flat_rows_keep_and_pick_deep_in_the_order() -> None:
    """Near-uniform rows with top_p near 1 and no top-k: the top-p cut and the pick lie thousands of
    tokens into the order, so each weighted quickselect runs many partition rounds before its sort."""
    batch = make_rows(8, 20000, torch.float32, seed=11)
    batch["logits"] = batch["logits"] * 0.01
    batch.update(temperature=torch.full((8,), 1.0), top_k=torch.zeros(8, dtype=torch.int32),
                 top_p=torch.tensor([1.0, 0.999, 0.99, 0.9, 0.75, 0.5, 1.0, 0.97]), min_p=torch.zeros(8))
    tokens, _ = check_against_reference(runtime_sampler, batch)
    # The picks are spread over the vocabulary, not stuck in the first sorted prefix.
    order = torch.sort(batch["logits"].float(), dim=-1, descending=True, stable=True).indices
    ranks = [int((order[r] == tokens[r]).nonzero()) for r in range(8)]
    assert max(ranks) > 256, ranks


def test_filters_at_their_edges() -> None:
    """top_k = 1 and = V - 1 and > V, top_p just under 1, min_p = 1, -inf logits, a one-token vocabulary."""
    vocab = 300
    batch = make_rows(6, vocab, torch.float32, seed=4)
    batch["logits"][3, ::3] = float("-inf")
    batch.update(temperature=torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 0.5]),
                 top_k=torch.tensor([1, vocab - 1, vocab + 5, 0, 0, 0], dtype=torch.int32),
                 top_p=torch.tensor([1.0, 0.999, 1.0, 0.95, 1.0, 1.0]),
                 min_p=torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
    tokens, _ = check_against_reference(runtime_sampler, batch)
    assert tokens[3] % 3 != 0
    tokens, _ = check_against_reference(runtime_sampler, make_rows(3, 1, torch.float32, seed=5))
    assert tokens.tolist() == [0, 0, 0]


def test_exact_boundaries_and_ties() -> None:
    batch, expected = exact_boundary_cases()
    tokens, _ = check_against_reference(runtime_sampler, batch, exact=True)
    assert tokens.tolist() == expected


def test_nan_logits_are_never_chosen() -> None:
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 500, generator=gen) * 3
    nan_ids = torch.randperm(500, generator=gen)[:250]
    logits[:, nan_ids] = float("nan")
    batch = dict(logits=logits, temperature=torch.tensor([0.0, 1.0, 1.0, 2.0]),
                 top_k=torch.tensor([0, 0, 10, 0]), top_p=torch.tensor([1.0, 1.0, 0.9, 0.5]),
                 min_p=torch.tensor([0.0, 0.0, 0.0, 0.1]), seeds=torch.arange(4), positions=torch.arange(4) * 7,
                 branches=torch.zeros(4, dtype=torch.int64))
    for position in range(20):
        batch["positions"] = torch.arange(4) * 7 + position
        tokens, _ = runtime_sampler(**batch)
        assert not torch.isnan(logits[torch.arange(4), tokens]).any(), tokens


def test_logprobs_out_is_the_raw_log_softmax_with_nan_as_minus_inf() -> None:
    """The chosen token's logprob, made beside the token in C++, against torch's log_softmax of
    the raw row (no temperature or filter), NaN taken as -inf; for greedy and sampled rows, rows
    with -inf and NaN logits, a row whose every other logit is -inf, and a one-token vocabulary."""
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(6, 3001, generator=gen) * 4
    logits[1, ::7] = float("-inf")
    logits[2, torch.randperm(3001, generator=gen)[:900]] = float("nan")
    logits[3] = float("-inf")
    logits[3, 1234] = 0.5
    temperature = np.array([0.0, 0.7, 0.0, 1.3, 1.0, 2.0], np.float32)
    tokens, logprobs = np.empty(6, np.int64), np.full(6, np.nan, np.float32)
    _core.sample_tokens(logits.numpy(), temperature=temperature, top_k=np.zeros(6, np.int64),
                        top_p=np.full(6, 0.95, np.float32), min_p=np.zeros(6, np.float32),
                        seeds=np.arange(6, dtype=np.uint64), positions=np.arange(6, dtype=np.int64) * 3,
                        branches=np.zeros(6, np.int64), tokens_out=tokens, logprobs_out=logprobs)
    raw = torch.log_softmax(torch.nan_to_num(logits, nan=float("-inf")), -1)
    expected = raw.gather(1, torch.from_numpy(tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.from_numpy(logprobs), expected, atol=2e-5, rtol=1e-5)
    assert tokens[3] == 1234 and logprobs[3] == 0.0
    one, one_lp = np.empty(1, np.int64), np.empty(1, np.float32)
    _core.sample_tokens(np.array([[3.0]], np.float32), temperature=np.ones(1, np.float32), top_k=np.zeros(1, np.int64),
                        top_p=np.ones(1, np.float32), min_p=np.zeros(1, np.float32), seeds=np.zeros(1, np.uint64),
                        positions=np.zeros(1, np.int64), branches=np.zeros(1, np.int64), tokens_out=one,
                        logprobs_out=one_lp)
    assert one[0] == 0 and one_lp[0] == 0.0


def test_log_softmax_is_the_samplers_rule_bit_for_bit() -> None:
    """lockstep._core.log_softmax against torch's (float64, NaN as -inf) on fresh random rows with
    -inf and NaN logits, a row of one +inf and a strided view; and at each row's chosen token the
    same float32 as sample_tokens' logprobs_out, for greedy and sampled rows."""
    gen = torch.Generator().manual_seed(33)
    logits = torch.randn(5, 4000, generator=gen) * 5
    logits[1, ::3] = float("-inf")
    logits[2, torch.randperm(4000, generator=gen)[:1000]] = float("nan")
    logits[4, 77] = float("inf")
    rows = logits[:, :3001]  # a row stride of 4000
    out = np.empty((5, 3001), np.float32)
    _core.log_softmax(rows.numpy(), out)
    finite = torch.where(rows.isnan(), torch.tensor(float("-inf")), rows)
    reference = torch.log_softmax(finite[:4].double(), -1).float()
    torch.testing.assert_close(torch.from_numpy(out[:4]), reference, atol=2e-5, rtol=1e-5)
    assert out[4, 77] == 0.0 and np.isneginf(np.delete(out[4], 77)).all()
    assert np.isneginf(out[1, ::3]).all() and np.isneginf(out[2][rows[2].isnan().numpy()]).all()
    temperature = np.array([0.0, 0.9, 1.3, 0.0, 0.0], np.float32)
    tokens, logprobs = np.empty(5, np.int64), np.empty(5, np.float32)
    _core.sample_tokens(rows.numpy(), temperature=temperature, top_k=np.zeros(5, np.int64), top_p=np.ones(5, np.float32),
                        min_p=np.zeros(5, np.float32), seeds=np.arange(5, dtype=np.uint64),
                        positions=np.arange(5, dtype=np.int64), branches=np.zeros(5, np.int64),
                        tokens_out=tokens, logprobs_out=logprobs)
    assert (logprobs == out[np.arange(5), tokens]).all()
    with pytest.raises(ValueError, match="out"):
        _core.log_softmax(rows.numpy(), np.empty((5, 3000), np.float32))


def test_rows_do_not_depend_on_the_batch_the_thread_count_or_the_row_stride() -> None:
    batch = make_rows(24, 3000, torch.float32, seed=6)
    batch.update(temperature=batch["temperature"].clamp(min=0.5))  # all sampled
    tokens, logprobs = runtime_sampler(**batch)
    wide = torch.randn(24, 3200)
    wide[:, 100:3100] = batch["logits"]
    strided = dict(batch, logits=wide[:, 100:3100])
    assert not strided["logits"].is_contiguous()
    assert torch.equal(runtime_sampler(**strided)[0], tokens)
    for r in (0, 13, 23):
        alone = {k: v[r:r + 1] for k, v in batch.items()}
        tokens_r, logprobs_r = runtime_sampler(**alone)
        assert torch.equal(tokens_r, tokens[r:r + 1]) and torch.equal(logprobs_r, logprobs[r:r + 1])
    threads = _core.get_num_threads()
    try:
        for n in (1, 3):
            _core.set_num_threads(n)
            assert torch.equal(runtime_sampler(**batch)[0], tokens), f"{n} threads"
    finally:
        _core.set_num_threads(threads)


def test_banned_tokens_are_never_chosen_and_leave_other_rows_alone() -> None:
    batch = make_rows(6, 400, torch.float32, seed=13)
    batch.update(temperature=torch.tensor([0.0, 1.0, 1.0, 0.0, 1.3, 0.7]), top_k=torch.zeros(6, dtype=torch.int32),
                 top_p=torch.ones(6), min_p=torch.zeros(6))
    tokens, logprobs = runtime_sampler(**batch)
    banned = [frozenset({int(tokens[0])}), frozenset(), frozenset({int(tokens[2]), 5}), frozenset(),
              frozenset(range(0, 400, 2)), frozenset()]
    tokens_b, logprobs_b = runtime_sampler(**batch, banned=banned)
    for r, ids in enumerate(banned):
        assert int(tokens_b[r]) not in ids
        if not ids:
            assert tokens_b[r] == tokens[r] and logprobs_b[r] == logprobs[r], f"row {r} changed by another's ban"
    # A banned row's logprob is under the model's own distribution.
    raw = torch.log_softmax(batch["logits"], -1)
    torch.testing.assert_close(logprobs_b, raw.gather(1, tokens_b[:, None])[:, 0])


def _core_args(rows: int = 3, vocab: int = 50) -> dict:
    f32 = lambda v: np.full(rows, v, dtype=np.float32)  # noqa: E731
    i64 = lambda v: np.full(rows, v, dtype=np.int64)  # noqa: E731
    return dict(logits=np.random.default_rng(0).standard_normal((rows, vocab)).astype(np.float32),
                temperature=f32(1.0), top_k=i64(0), top_p=f32(0.9), min_p=f32(0.0),
                seeds=np.arange(rows, dtype=np.uint64), positions=i64(3), branches=i64(0),
                tokens_out=np.zeros(rows, dtype=np.int64))


@pytest.mark.parametrize("name, change, message", [
    ("logits", lambda a: a.update(logits=a["logits"].astype(np.float64)), "expected dtype float32"),
    ("logits", lambda a: a.update(logits=a["logits"][0]), "expected a 2-D array"),
    ("logits", lambda a: a.update(logits=a["logits"][:, ::2]), "each row must be C-contiguous"),
    ("logits", lambda a: a.update(logits=a["logits"][:, :0]), "vocabulary must have 1"),
    ("logits", lambda a: a.update(logits=torch.zeros(3, 50)), "expected a numpy.ndarray"),
    ("temperature", lambda a: a.update(temperature=a["temperature"].astype(np.float64)), "expected dtype float32"),
    ("top_k", lambda a: a.update(top_k=a["top_k"].astype(np.int32)), "expected dtype int64"),
    ("top_p", lambda a: a.update(top_p=a["top_p"][:2]), "expected shape"),
    ("seeds", lambda a: a.update(seeds=a["seeds"].astype(np.int64)), "expected dtype uint64"),
    ("tokens_out", lambda a: a["tokens_out"].setflags(write=False), "is read-only"),
    ("logprobs_out", lambda a: a.update(logprobs_out=np.empty(3, np.float64)), "expected dtype float32"),
    ("logprobs_out", lambda a: a.update(logprobs_out=np.empty(2, np.float32)), "expected shape"),
])
def test_bad_arguments_raise_value_error_naming_them(name: str, change, message: str) -> None:
    args = _core_args()
    change(args)
    with pytest.raises(ValueError, match=message) as err:
        _core.sample_tokens(**args)
    assert name in str(err.value)
