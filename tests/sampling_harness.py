"""Shared pieces of the sampler tests: random rows and parameters, and the comparison with the
reference sampler (runtime.sampler.sample_row) that forgives only rows near a boundary.

Two samplers are checked against the reference: the Triton kernel (tests/test_kernel_sampling.py)
and the C++ CPU sampler (tests/test_cpu_sampling.py). Both sum probability masses in another
order than the reference's sorted float32 cumsum, so a token may differ from the reference's
only where a decision sits within rounding of a boundary between two tokens: every mismatch is
checked to be such a row, and there should basically be none.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from lockstep.kernels.sampling import sample_tokens_reference
from lockstep.runtime.sampler import uniform

# Relative distance to a decision boundary under which a sampler and the reference may disagree:
# float32 masses summed in another order differ in the last bits (~1e-7), far below this.
BOUNDARY_TOL = 1e-5

TEMPERATURES = (0.0, 0.7, 1.3)
TOP_KS = (0, 1, 5, 50)
TOP_PS = (1.0, 0.9, 0.5)
MIN_PS = (0.0, 0.05, 0.2)

# Positions whose uniform (seed 0, branch 0) is exactly k / 8, so u * (kept mass) can land exactly
# on a boundary between equal-probability tokens: u = 0, 1/8, 2/8, ..., 7/8.
EXACT_EIGHTHS = (14883995, 11864871, 630968, 9826421, 9297664, 3852722, 150078, 2641009)

# A sampler under test: the batch's tensors in, (tokens int64 [R], logprobs float32 [R]) out.
Sampler = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def make_rows(rows: int, vocab: int, dtype: torch.dtype, seed: int, ties: bool = False) -> dict:
    """Random logits (flat to peaked rows) and per-row parameters drawn from the sets above."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 5.0])[torch.randint(0, 3, (rows, 1), generator=gen)]
    logits = torch.randn(rows, vocab, generator=gen) * scale
    if ties:  # a coarse grid: many exactly equal logits, so tie groups straddle every cut
        logits = (logits * 2).round() / 2

    def pick(values, dtype):
        return torch.tensor(values, dtype=dtype)[torch.randint(0, len(values), (rows,), generator=gen)]

    return dict(logits=logits.to(dtype), temperature=pick(TEMPERATURES, torch.float32),
                top_k=pick(TOP_KS, torch.int32), top_p=pick(TOP_PS, torch.float32), min_p=pick(MIN_PS, torch.float32),
                seeds=torch.randint(-2**63, 2**63 - 1, (rows,), generator=gen),
                positions=torch.randint(0, 2**40, (rows,), generator=gen),
                branches=torch.randint(0, 8, (rows,), generator=gen))


def near_boundary(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
                  u: float) -> bool:
    """Whether any decision of the sampler for this row is within BOUNDARY_TOL of flipping (float64)."""
    values, _ = torch.sort(logits.float() / temperature, descending=True, stable=True)
    if 0 < top_k < values.numel():
        values = values[:top_k]
    p = torch.softmax(values.double(), 0)
    before = torch.cumsum(p, 0) - p
    near = False
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_p < 1.0:
        near |= bool(((before[1:] - top_p).abs() < BOUNDARY_TOL).any())
        keep &= before < top_p
    if min_p > 0.0:
        near |= bool(((p[1:] / p[0] - min_p).abs() < BOUNDARY_TOL * min_p).any())
        keep &= p >= min_p * p[0]
    keep[0] = True
    cdf = torch.cumsum(p[keep], 0)
    cdf /= cdf[-1].clone()
    return near or bool(((cdf[:-1] - u).abs() < BOUNDARY_TOL).any())


def check_against_reference(sampler: Sampler, batch: dict, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens equal to the reference's (all of them if exact, else but for rows near a boundary), logprobs close."""
    rows = batch["logits"].shape[0]
    tokens, logprobs = sampler(**batch)
    ref_tokens, ref_logprobs = sample_tokens_reference(**batch)
    assert ((tokens >= 0) & (tokens < batch["logits"].shape[1])).all()
    mismatched = (tokens != ref_tokens).nonzero().flatten().tolist()
    for r in mismatched:
        t = float(batch["temperature"][r])
        assert t > 0 and not exact, f"row {r}: token {int(tokens[r])} != the reference's {int(ref_tokens[r])}"
        u = uniform(int(batch["seeds"][r]) & (2**64 - 1), int(batch["positions"][r]), int(batch["branches"][r]))
        args = (t, int(batch["top_k"][r]), float(batch["top_p"][r]), float(batch["min_p"][r]), u)
        assert near_boundary(batch["logits"][r], *args), (
            f"row {r} {args}: token {int(tokens[r])}, the reference's {int(ref_tokens[r])}, not near a boundary; "
            f"{len(mismatched)} of {rows} rows differ: {mismatched}")
    assert not mismatched, f"{len(mismatched)} of {rows} rows differ (all near a boundary): {mismatched}"
    # The logprob of the sampler's own token under the raw log_softmax.
    expected = torch.log_softmax(batch["logits"].float(), -1).gather(1, tokens[:, None])[:, 0]
    assert not torch.isnan(logprobs).any()
    torch.testing.assert_close(logprobs, expected, atol=2e-5, rtol=1e-5)
    same = tokens == ref_tokens
    torch.testing.assert_close(logprobs[same], ref_logprobs[same], atol=2e-5, rtol=1e-5)
    return tokens, logprobs


def exact_boundary_cases() -> tuple[dict, list[int]]:
    """Rows whose probabilities are exact in float, so every boundary is hit exactly and any
    sampler agrees with the reference to the bit; and the reference's tokens for them."""
    assert [uniform(0, p, 0) * 8 for p in EXACT_EIGHTHS] == list(range(8))
    flat = torch.full((8,), 1.5)
    grouped = torch.full((8,), float("-inf"))
    grouped[[1, 3, 4, 6]] = 2.0
    max_tie = torch.randn(8, generator=torch.Generator().manual_seed(9))
    max_tie[[2, 5]] = 4.0
    straddle = torch.tensor([3.0, 1.0, 3.0, 1.0, 1.0, 3.0, 1.0, 1.0])
    # (logits, temperature, top_k, top_p, min_p, u in eighths, the sampler's token)
    cases = [(flat, 1.0, 0, 1.0, 0.0, k, k) for k in range(8)]  # the target on every cdf step
    cases += [
        (flat, 1.0, 0, 0.5, 0.0, 7, 3),  # top-p: the mass before token 4 is exactly 0.5, so 4 kept
        (flat, 0.7, 3, 1.0, 0.0, 6, 2),  # top-k inside one tie group: the lowest ids
        (grouped, 1.0, 0, 1.0, 0.0, 4, 4),  # -inf tokens; target 2 of 4 equal: the third member, id 4
        (max_tie, 1.0, 0, 1.0, 1.0, 4, 5),  # min-p = 1 keeps the tied max; target on their boundary
        (straddle, 100.0, 4, 1.0, 0.0, 7, 1),  # top-k cuts the tie group at 1.0 after its first id
    ]
    rows = len(cases)
    batch = dict(logits=torch.stack([c[0] for c in cases]), temperature=torch.tensor([c[1] for c in cases]),
                 top_k=torch.tensor([c[2] for c in cases], dtype=torch.int32),
                 top_p=torch.tensor([c[3] for c in cases]), min_p=torch.tensor([c[4] for c in cases]),
                 seeds=torch.zeros(rows, dtype=torch.int64),
                 positions=torch.tensor([EXACT_EIGHTHS[c[5]] for c in cases]),
                 branches=torch.zeros(rows, dtype=torch.int64))
    return batch, [c[6] for c in cases]


def greedy_tie_rows(dtype: torch.dtype) -> tuple[dict, list[int]]:
    """Greedy rows whose maximum is tied inside a chunk, across chunks and at the last index, V not
    a multiple of any chunk; and the first index of each row's maximum."""
    gen = torch.Generator().manual_seed(1)
    rows, vocab = 5, 2053
    logits = torch.randn(rows, vocab, generator=gen).to(dtype)
    top = logits.float().max() + 1
    for r, ids in enumerate([[3, 7], [5, 1500], [1023, 1024], [vocab - 1], [2052, 2050, 2000]]):
        logits[r, ids] = top.to(dtype)
    zeros = torch.zeros(rows)
    batch = dict(logits=logits, temperature=zeros, top_k=torch.full((rows,), 5, dtype=torch.int32),
                 top_p=torch.full((rows,), 0.5), min_p=zeros, seeds=torch.arange(rows), positions=torch.arange(rows),
                 branches=torch.zeros(rows, dtype=torch.int64))
    return batch, [3, 5, 1023, vocab - 1, 2000]
