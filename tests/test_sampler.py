"""The sampler against independent references: Random123's known answers for Philox, and a
numpy re-statement of temperature / top-k / top-p / min-p for the sampled distribution."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lockstep.runtime.errors import InvalidRequestError
from lockstep.runtime.sampler import philox4x32, sample, uniform
from lockstep.runtime.sampling_params import SamplingParams

# Known-answer tests for Philox4x32-10 from the Random123 distribution (kat_vectors).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected) -> None:
    assert philox4x32(counter, key) == expected


def test_uniform_is_keyed_by_seed_position_and_branch() -> None:
    draws = {(s, p, b): uniform(s, p, b) for s in (0, 1, 2**40 + 3) for p in range(50) for b in range(3)}
    values = np.array(list(draws.values()))
    assert ((values >= 0) & (values < 1)).all()
    assert len(set(values.tolist())) == len(values)  # 24 random bits: collisions here would mean a broken key
    assert all(uniform(*k) == v for k, v in list(draws.items())[:20])  # pure function of the key
    # Roughly uniform: 450 draws, Kolmogorov-Smirnov distance well inside the 0.1% critical value.
    ks = np.max(np.abs(np.sort(values) - (np.arange(1, len(values) + 1) / len(values))))
    assert ks < 1.95 / np.sqrt(len(values))


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                           min_p: float) -> np.ndarray:
    """Probability of each token after the filters, written from their definitions."""
    z = logits.astype(np.float64) / temperature
    order = np.lexsort((np.arange(len(z)), -z))  # descending, ties by id
    keep = np.zeros(len(z), dtype=bool)
    keep[order[:top_k] if top_k else order] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    mass_before = 0.0
    for rank, t in enumerate(order):
        if not keep[t]:
            continue
        if rank > 0 and mass_before >= top_p:
            keep[t] = False
        mass_before += p[t]
    keep &= p >= min_p * p.max()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.9, 8, 0.9, 0.02),
])
def test_sampled_frequencies_match_reference(temperature, top_k, top_p, min_p) -> None:
    rng = np.random.default_rng(1234)
    logits = rng.standard_normal(12).astype(np.float32) * 2
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    n = 3000
    row = torch.from_numpy(logits)[None]
    counts = np.zeros(len(logits))
    for i in range(n):
        counts[sample(row, [params], [(99, i, 0)]).token_ids[0]] += 1
    expected = reference_distribution(logits, temperature, top_k, top_p, min_p)
    assert counts[expected == 0].sum() == 0, "sampled a token the filters remove"
    live = expected > 0
    chi2 = float((((counts - n * expected) ** 2)[live] / (n * expected[live])).sum())
    # 99.9% quantile of chi-square with <= 11 degrees of freedom is 31.3.
    assert chi2 < 31.3, (chi2, counts, expected * n)


def test_greedy_and_logprobs() -> None:
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.standard_normal((4, 50)).astype(np.float32))
    params = [SamplingParams(temperature=0.0, logprobs=3)] * 4
    result = sample(logits, params, [(0, 0, 0)] * 4)
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert result.token_ids == logits.argmax(-1).tolist()
    for r in range(4):
        assert abs(result.logprobs[r] - float(reference[r, result.token_ids[r]])) < 1e-5
        top_ids = [t for t, _ in result.top_logprobs[r]]
        assert top_ids == reference[r].topk(3).indices.tolist()


def test_banned_tokens_are_never_chosen() -> None:
    logits = torch.tensor([[5.0, 4.0, -1.0, 0.0]])
    result = sample(logits, [SamplingParams(temperature=0.0)], [(0, 0, 0)], [frozenset({0, 1})])
    assert result.token_ids == [3]


@pytest.mark.parametrize("bad", [
    {"temperature": -0.5}, {"top_p": 1.5}, {"top_p": 0.0}, {"top_k": -3}, {"min_p": 2.0},
    {"max_tokens": -1}, {"seed": -1}, {"logprobs": 99}, {"stop": [""]}, {"min_tokens": 5, "max_tokens": 2},
])
def test_invalid_params_name_the_field(bad) -> None:
    with pytest.raises(InvalidRequestError, match=next(iter(bad)) if "min_tokens" not in bad else "min_tokens"):
        SamplingParams(**bad)
