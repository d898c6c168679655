"""The sampling kernel (kernels/sampling.py) against the reference sampler (runtime.sampler.sample_row),
under the interpreter.

Philox and greedy must match bit for bit. Sampled tokens must equal the reference's, except where
its decision sits within float rounding of a boundary (the kernel sums masses in another order):
every mismatch is checked to be such a row (tests/sampling_harness.py), and there should basically
be none.
"""
from __future__ import annotations

import math

import pytest
import torch
import sampling_harness
from kernel_harness import GPU_ARCHS, TEST_DTYPES, assert_no_spills, compile_many, poisoned
from sampling_harness import exact_boundary_cases, greedy_tie_rows, make_rows, near_boundary

from lockstep.kernels.sampling import (
    _launch_config,
    _philox_uniform_kernel,
    _sample_kernel,
    philox_uniform,
    sample_tokens,
)
from lockstep.runtime.sampler import filtered_distribution, sample, sample_with_kernel, uniform
from lockstep.runtime.sampling_params import SamplingParams


def kernel_sampler(**batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel writing into given, poisoned outputs (it must fill every row)."""
    rows = batch["logits"].shape[0]
    tokens_out, logprobs_out = torch.full((rows,), -1, dtype=torch.int64), poisoned((rows,), torch.float32)
    tokens, logprobs = sample_tokens(**batch, tokens_out=tokens_out, logprobs_out=logprobs_out)
    assert tokens is tokens_out and logprobs is logprobs_out
    return tokens, logprobs


def check_against_reference(batch: dict, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return sampling_harness.check_against_reference(kernel_sampler, batch, exact)


def test_philox_uniform_is_bitwise_the_samplers() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 1000
    seeds = torch.cat([torch.randint(-2**63, 2**63 - 1, (n - 8,), generator=gen),
                       torch.tensor([0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, -2**63, -1])])
    positions = torch.cat([torch.randint(0, 2**33, (n - 4,), generator=gen), torch.tensor([0, 2**32 - 1, 2**32, 7])])
    branches = torch.randint(0, 2**32, (n,), generator=gen)
    out = poisoned((n,), torch.float32)
    got = philox_uniform(seeds, positions, branches, out=out)
    assert got is out
    expected = torch.tensor([uniform(s & (2**64 - 1), p, b) for s, p, b in
                             zip(seeds.tolist(), positions.tolist(), branches.tolist())], dtype=torch.float64)
    assert torch.equal(got.double(), expected)  # the uniforms are exact in float32


@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
def test_greedy_is_the_first_argmax(dtype: torch.dtype) -> None:
    batch, expected = greedy_tie_rows(dtype)
    tokens, _ = check_against_reference(batch)
    assert tokens.tolist() == expected
    assert torch.equal(tokens, torch.argmax(batch["logits"].float(), -1))


@pytest.mark.parametrize("dtype, vocab, rows, ties", [
    (torch.float32, 1000, 48, False),
    (torch.float16, 1000, 32, False),
    (torch.float16, 1000, 32, True),
    (torch.float32, 4099, 16, False),
])
def test_matches_sampler_with_mixed_params(dtype: torch.dtype, vocab: int, rows: int, ties: bool) -> None:
    check_against_reference(make_rows(rows, vocab, dtype, seed=vocab + rows + ties))


def test_full_vocabulary_row() -> None:
    """V = 49152 (the default model's), 48 chunks: a sampled row with every filter on, and a greedy row."""
    batch = make_rows(2, 49152, torch.float32, seed=3)
    batch.update(temperature=torch.tensor([0.8, 0.0]), top_k=torch.tensor([40, 0], dtype=torch.int32),
                 top_p=torch.tensor([0.9, 1.0]), min_p=torch.tensor([0.01, 0.0]))
    check_against_reference(batch)


def test_filters_at_their_edges() -> None:
    """top_k = 1 and = V - 1 and > V, top_p just under 1, min_p = 1, -inf logits, and a one-token vocabulary."""
    vocab = 300
    batch = make_rows(6, vocab, torch.float32, seed=4)
    batch["logits"][3, ::3] = float("-inf")  # banned tokens: never picked
    batch.update(temperature=torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 0.5]),
                 top_k=torch.tensor([1, vocab - 1, vocab + 5, 0, 0, 0], dtype=torch.int32),
                 top_p=torch.tensor([1.0, 0.999, 1.0, 0.95, 1.0, 1.0]),
                 min_p=torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
    tokens, _ = check_against_reference(batch)
    assert tokens[3] % 3 != 0
    one = make_rows(3, 1, torch.float32, seed=5)
    tokens, _ = check_against_reference(one)
    assert tokens.tolist() == [0, 0, 0]


def test_exact_boundaries_and_ties() -> None:
    """Rows whose probabilities are exact in float, so every boundary is hit exactly and both sides
    agree to the bit: the strict / non-strict comparisons and the tie order must all be the sampler's."""
    batch, expected = exact_boundary_cases()
    tokens, _ = check_against_reference(batch, exact=True)
    assert tokens.tolist() == expected
    # The tolerance used elsewhere does flag such rows (and not an ordinary one).
    flat = torch.full((8,), 1.5)
    assert near_boundary(flat, 1.0, 0, 1.0, 0.0, 3 / 8) and not near_boundary(flat, 1.0, 0, 1.0, 0.0, 0.3)


def test_rows_are_batch_invariant_and_rows_may_be_strided() -> None:
    """A row gives the same bits alone, beside others, or as a strided view of a wider buffer."""
    batch = make_rows(6, 700, torch.float16, seed=6)
    tokens, logprobs = sample_tokens(**batch)
    wide = torch.randn(6, 800).half()
    wide[:, 50:750] = batch["logits"]
    strided = dict(batch, logits=wide[:, 50:750])
    assert not strided["logits"].is_contiguous()
    tokens_s, logprobs_s = sample_tokens(**strided)
    assert torch.equal(tokens_s, tokens) and torch.equal(logprobs_s, logprobs)
    for r in (0, 4):
        alone = {k: v[r:r + 1] for k, v in batch.items()}
        tokens_r, logprobs_r = sample_tokens(**alone)
        assert torch.equal(tokens_r, tokens[r:r + 1]) and torch.equal(logprobs_r, logprobs[r:r + 1])


def test_sampled_frequencies_follow_the_filtered_distribution() -> None:
    """Chi-square over 160 positions of one row (broadcast, row stride 0) against filtered_distribution."""
    gen = torch.Generator().manual_seed(7)
    vocab, draws = 12, 160
    row = torch.randn(vocab, generator=gen) * 1.5
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.9, min_p=0.02)
    ids, probs = filtered_distribution(row, params)
    assert 2 <= ids.numel() < 8  # top-p or min-p cut inside the top-k set
    batch = dict(logits=row.expand(draws, vocab), temperature=torch.full((draws,), 0.9),
                 top_k=torch.full((draws,), 8, dtype=torch.int32), top_p=torch.full((draws,), 0.9),
                 min_p=torch.full((draws,), 0.02), seeds=torch.full((draws,), 12345, dtype=torch.int64),
                 positions=torch.arange(draws), branches=torch.zeros(draws, dtype=torch.int64))
    tokens, _ = sample_tokens(**batch)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts.sum() == counts[ids].sum(), "a token outside the filtered set was drawn"
    observed, expected = counts[ids], probs.double() * draws
    # Pool the rare tokens so every bin expects at least 5 draws.
    big = expected >= 5
    observed = torch.cat([observed[big], observed[~big].sum(0, keepdim=True)])
    expected = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = len(expected) - 1
    # The 99.9% quantile of chi-square(dof), by Wilson-Hilferty.
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < critical, (chi2, critical, observed.tolist(), expected.tolist())


def _good(rows: int = 3, vocab: int = 50) -> dict:
    return make_rows(rows, vocab, torch.float32, seed=8)


@pytest.mark.parametrize("name, change, message", [
    ("logits", lambda b: b.update(logits=b["logits"].double()), "logits must have dtype"),
    ("logits", lambda b: b.update(logits=b["logits"][0]), "logits must have 2 dimensions"),
    ("logits", lambda b: b.update(logits=b["logits"][:, ::2]), "logits must have a contiguous last dimension"),
    ("logits", lambda b: b.update(logits=b["logits"][:, :0]), "logits must have at least one column"),
    ("temperature", lambda b: b.update(temperature=b["temperature"].double()), "temperature must have dtype"),
    ("top_k", lambda b: b.update(top_k=b["top_k"].long()), "top_k must have dtype"),
    ("top_p", lambda b: b.update(top_p=b["top_p"][:2]), "top_p must have shape"),
    ("min_p", lambda b: b.update(min_p=torch.zeros(6)[::2]), "min_p must be contiguous"),
    ("seeds", lambda b: b.update(seeds=b["seeds"].int()), "seeds must have dtype"),
    ("positions", lambda b: b.update(positions=b["positions"].to("meta")), "positions is on meta"),
    ("branches", lambda b: b.update(branches=[0, 0, 0]), "branches must be a torch.Tensor"),
    ("tokens_out", lambda b: b.update(tokens_out=torch.empty(3, dtype=torch.int32)), "tokens_out must have dtype"),
    ("logprobs_out", lambda b: b.update(logprobs_out=torch.empty(4)), "logprobs_out must have shape"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(name: str, change, message: str) -> None:
    batch = _good()
    change(batch)
    with pytest.raises(ValueError, match=message) as err:
        sample_tokens(**batch)
    assert name in str(err.value)


@pytest.mark.parametrize("name, kwargs, message", [
    ("seeds", dict(seeds=torch.zeros(3)), "seeds must have dtype"),
    ("positions", dict(positions=torch.zeros(2, dtype=torch.int64)), "positions must have shape"),
    ("out", dict(out=torch.empty(3, dtype=torch.float64)), "out must have dtype"),
])
def test_philox_bad_inputs_raise_value_error(name: str, kwargs: dict, message: str) -> None:
    args = dict(seeds=torch.zeros(3, dtype=torch.int64), positions=torch.zeros(3, dtype=torch.int64),
                branches=torch.zeros(3, dtype=torch.int64))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as err:
        philox_uniform(**args)
    assert name in str(err.value)


def test_compiles_for_gpus_without_spills() -> None:
    """At the default model's vocabulary (the widest tile and most pivots), for each logits dtype."""
    block, pivots, num_warps = _launch_config(49152)
    jobs, labels = [], []
    for ty in ("fp32", "fp16", "bf16"):
        signature = {"logits_ptr": f"*{ty}", "stride_row": "i32", "V": "i32", "temperature_ptr": "*fp32",
                     "top_k_ptr": "*i32", "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "seed_ptr": "*i64",
                     "position_ptr": "*i64", "branch_ptr": "*i64", "tokens_ptr": "*i64", "logprobs_ptr": "*fp32",
                     "BLOCK": "constexpr", "PIVOTS": "constexpr"}
        for arch in GPU_ARCHS:
            jobs.append(dict(signature=signature, constexprs=dict(BLOCK=block, PIVOTS=pivots), arch=arch,
                             num_warps=num_warps))
            labels.append((f"sample_tokens {ty} V49152", arch))
    for (label, arch), usage in zip(labels, compile_many(_sample_kernel, jobs)):
        assert_no_spills(label, arch, usage)
    signature = {"seed_ptr": "*i64", "position_ptr": "*i64", "branch_ptr": "*i64", "out_ptr": "*fp32", "R": "i32",
                 "BLOCK": "constexpr"}
    jobs = [dict(signature=signature, constexprs=dict(BLOCK=128), arch=arch, num_warps=4) for arch in GPU_ARCHS]
    for arch, usage in zip(GPU_ARCHS, compile_many(_philox_uniform_kernel, jobs)):
        assert_no_spills("philox_uniform", arch, usage)


def test_sample_with_kernel_matches_the_cpu_sampler_on_a_mixed_batch() -> None:
    """runtime.sampler.sample_with_kernel (the engine's sampler on CUDA) against runtime.sampler.sample
    (the C++ one) on one batch of greedy and sampled rows, rows with top logprobs, a row with a
    ban (stop tokens below min_tokens) and its unbanned twin: the same tokens; logprobs close
    (summed in another order); top lists of the same tokens; a banned row's logprob under its
    unmasked logits, as its twin has it."""
    gen = torch.Generator().manual_seed(41)
    logits = torch.randn(6, 700, generator=gen) * 3
    logits[5] = logits[4]  # the twin of the banned row
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.9, logprobs=3),
              SamplingParams(temperature=0.0, logprobs=5), SamplingParams(temperature=1.2, top_k=20, min_p=0.02),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.0)]
    keys = [(9, 100 + r, r % 2) for r in range(6)]
    top_token = int(logits[4].argmax())
    banned = [frozenset()] * 4 + [frozenset({top_token}), frozenset()]
    cpu, kernel = sample(logits, params, keys, banned), sample_with_kernel(logits, params, keys, banned)
    assert kernel.token_ids == cpu.token_ids and cpu.token_ids[4] != top_token == cpu.token_ids[5]
    assert kernel.logprobs == pytest.approx(cpu.logprobs, abs=2e-5)
    raw = torch.log_softmax(logits.double(), -1)
    assert cpu.logprobs[4] == pytest.approx(float(raw[4, cpu.token_ids[4]]), abs=2e-5)
    for got, want in zip(kernel.top_logprobs, cpu.top_logprobs):
        assert [t for t, _ in got] == [t for t, _ in want]
        assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=2e-5)
    assert [len(t) for t in cpu.top_logprobs] == [0, 3, 5, 0, 0, 0]


def test_sample_with_kernel_through_the_planned_buffers_gives_what_it_gives_alone() -> None:
    """The engine's SamplerBuffers (columns staged and copied up once, outputs read back through
    them) against sample_with_kernel making its own tensors: the same tokens and logprobs, bit for
    bit, over calls of different sizes that reuse the buffers (a stale row would show), with a
    seed above 2**63 (its two's-complement bits), a ban, top logprobs, and fp16 logits read as
    they are."""
    from lockstep.runtime.sampler_buffers import SamplerBuffers

    buffers = SamplerBuffers(8, torch.device("cpu"))
    gen = torch.Generator().manual_seed(42)
    for rows, dtype in ((6, torch.float32), (3, torch.float16), (8, torch.float32)):
        logits = (torch.randn(rows, 500, generator=gen) * 3).to(dtype)
        params = [SamplingParams(temperature=0.0 if r % 3 == 0 else 0.8, top_p=0.9, top_k=[0, 40, 900][r % 3],
                                 min_p=0.01 * (r % 2), logprobs=2 if r == 1 else 0) for r in range(rows)]
        keys = [((1 << 64) - 1 - r if r % 2 else 7 + r, 50 + r, r % 3) for r in range(rows)]
        banned = [frozenset({int(logits[0].float().argmax())})] + [frozenset()] * (rows - 1)
        alone, planned = sample_with_kernel(logits, params, keys, banned), \
            sample_with_kernel(logits, params, keys, banned, buffers)
        assert planned.token_ids == alone.token_ids and planned.logprobs == alone.logprobs
        assert planned.top_logprobs == alone.top_logprobs
        assert planned.token_array.tolist() == alone.token_ids
        # Deferred (overlap mode): the tokens stay where the kernel wrote them, the next step's
        # input, until ready() brings them to the host; then it is the same result.
        deferred = sample_with_kernel(logits, params, keys, banned, buffers, defer=True)
        assert deferred.token_array.data_ptr() == buffers.tokens.data_ptr()
        assert deferred.token_array.tolist() == alone.token_ids
        done = deferred.ready()
        assert (done.token_ids, done.logprobs, done.top_logprobs) == (alone.token_ids, alone.logprobs, alone.top_logprobs)
    with pytest.raises(ValueError, match="hold 8"):
        sample_with_kernel(torch.randn(9, 500), [SamplingParams()] * 9, [(1, 1, 0)] * 9, None, buffers)
