"""Token selection: greedy, or temperature / top-k / top-p / min-p with counter-based randomness.

Each sampled token draws one uniform number from Philox4x32-10 keyed by the request's seed,
with the counter (position, branch, 0, 0). No global RNG state exists, so a token depends only
on its own logits and key: the same under any load, batch or bucket (DESIGN.md, batch
invariance). The uniform picks a token by inverse CDF over the kept tokens in a fixed order
(probability descending, ties by token id).

`filtered_distribution` and `sample_row` state that rule in plain torch, sorting the whole
vocabulary (4 ms a row at 49152 tokens on the dev CPU). They are the reference: the engine
samples with `sample` on the CPU (the C++ sampler, cpp/cpu/sampling.h, which finds the cuts
and the pick by quickselect) and `sample_with_kernel` on CUDA (kernels/sampling.py), and both
are tested against `sample_row`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lockstep import _core

from .sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int], rounds: int = 10) -> tuple[int, ...]:
    """Philox4x32 (Salmon et al., SC'11, the Random123 constants; the same as triton's tl.philox)."""
    c0, c1, c2, c3 = (c & _MASK32 for c in counter)
    k0, k1 = (k & _MASK32 for k in key)
    for _ in range(rounds):
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _MASK32, p1 & _MASK32, ((p0 >> 32) ^ c3 ^ k1) & _MASK32, p0 & _MASK32
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def uniform(seed: int, position: int, branch: int = 0) -> float:
    """A uniform number in [0, 1) for (seed, position, branch): 24 random bits, exact in float32."""
    r = philox4x32((position, branch, 0, 0), (seed & _MASK32, seed >> 32))[0]
    return (r >> 8) * (1.0 / (1 << 24))


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # of the chosen token under the model's raw distribution
    top_logprobs: list[list[tuple[int, float]]]  # per row, the N most likely (N = params.logprobs)


def filtered_distribution(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and probabilities left after temperature, top-k, top-p and min-p.

    Returned in the fixed sampling order: probability descending, ties by token id.
    """
    values, ids = torch.sort(logits.float() / params.temperature, descending=True, stable=True)
    if 0 < params.top_k < values.numel():
        values, ids = values[:params.top_k], ids[:params.top_k]
    probs = torch.softmax(values, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep &= (torch.cumsum(probs, 0) - probs) < params.top_p
    if params.min_p > 0.0:
        keep &= probs >= params.min_p * probs[0]
    keep[0] = True
    return ids[keep], probs[keep]


def sample_row(logits: torch.Tensor, params: SamplingParams, seed: int, position: int, branch: int) -> int:
    if params.greedy:
        return int(torch.argmax(logits))
    ids, probs = filtered_distribution(logits, params)
    cdf = torch.cumsum(probs, 0)
    target = uniform(seed, position, branch) * float(cdf[-1])
    pick = int(torch.searchsorted(cdf, torch.tensor([target]), right=True)[0])
    return int(ids[min(pick, ids.numel() - 1)])


def sample(logits: torch.Tensor, params: list[SamplingParams], keys: list[tuple[int, int, int]],
           banned: list[frozenset[int]] | None = None) -> SampleResult:
    """Picks one token per row of CPU logits [R, vocab] with the C++ sampler. keys[r] = (seed, position, branch).

    `banned[r]` are token ids that may not be chosen (stop tokens before min_tokens).
    """
    raw = logits.float()
    rows = len(params)
    tokens = np.empty(rows, dtype=np.int64)
    chosen = np.empty(rows, dtype=np.float32)
    seeds, positions, branches = zip(*keys) if keys else ((), (), ())
    banned_rows = _banned_rows(banned)
    _core.sample_tokens(
        _without_banned(raw, banned, banned_rows).numpy(),
        temperature=np.array([p.temperature for p in params], np.float32),
        top_k=np.array([p.top_k for p in params], np.int64),
        top_p=np.array([p.top_p for p in params], np.float32),
        min_p=np.array([p.min_p for p in params], np.float32),
        seeds=np.array(seeds, np.uint64),
        positions=np.array(positions, np.int64),
        branches=np.array(branches, np.int64),
        tokens_out=tokens,
        logprobs_out=chosen,  # under the rows the C++ sampler saw: a banned row's is redone below
    )
    logprobs = chosen.tolist()
    tops = _top_logprobs(raw, params, tokens, logprobs)
    for r in banned_rows:
        if not params[r].logprobs:  # (with top logprobs, _top_logprobs has set it already)
            logprobs[r] = float(torch.log_softmax(raw[r], -1)[int(tokens[r])])
    return SampleResult(tokens.tolist(), logprobs, tops)


def _banned_rows(banned: list[frozenset[int]] | None) -> list[int]:
    return [r for r, ids in enumerate(banned or []) if ids]


def _without_banned(rows: torch.Tensor, banned: list[frozenset[int]] | None, banned_rows: list[int]) -> torch.Tensor:
    """rows, or a copy with each banned row's ids at -inf (so neighbours' bans never touch a row)."""
    if not banned_rows:
        return rows
    rows = rows.clone()
    for r in banned_rows:
        rows[r, list(banned[r])] = float("-inf")
    return rows


def _top_logprobs(raw: torch.Tensor, params: list[SamplingParams], tokens, logprobs: list[float]
                  ) -> list[list[tuple[int, float]]]:
    """Per row, the params.logprobs most likely tokens under the raw logits (log_softmax of that
    row alone: batch-invariant). Such a row's chosen logprob is set from the same log_softmax,
    so the chosen token and its entry in the list always agree to the bit."""
    if not any(p.logprobs for p in params):
        return [[] for _ in params]
    tops = []
    for r, p in enumerate(params):
        if p.logprobs:
            row = torch.log_softmax(raw[r], dim=-1)
            vals, ids = torch.topk(row, p.logprobs)
            tops.append(list(zip(ids.tolist(), vals.tolist())))
            logprobs[r] = float(row[int(tokens[r])])
        else:
            tops.append([])
    return tops


def sample_with_kernel(logits: torch.Tensor, params: list[SamplingParams], keys: list[tuple[int, int, int]],
                       banned: list[frozenset[int]] | None = None) -> SampleResult:
    """The choice `sample` makes, made where the logits are by kernels/sampling.py: one launch for
    every row, no sort, and only the tokens and logprobs cross to the host."""
    from lockstep.kernels.sampling import sample_tokens

    device = logits.device
    raw = logits.float()
    vocab = raw.shape[-1]
    banned_rows = _banned_rows(banned)
    rows = _without_banned(raw, banned, banned_rows)
    column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
    # Seeds are 64-bit unsigned; the kernel takes their two's-complement int64 bits.
    seeds = [seed - (1 << 64) if seed >= 1 << 63 else seed for seed, _, _ in keys]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]  # k >= vocab keeps every token: off
    tokens, chosen = sample_tokens(
        rows,
        temperature=column([0.0 if p.greedy else p.temperature for p in params], torch.float32),
        top_k=column(top_k, torch.int32),
        top_p=column([p.top_p for p in params], torch.float32),
        min_p=column([p.min_p for p in params], torch.float32),
        seeds=column(seeds, torch.int64),
        positions=column([k[1] for k in keys], torch.int64),
        branches=column([k[2] for k in keys], torch.int64),
    )
    if banned_rows:
        # A banned row's logprob is under the model's own distribution, not the masked one. Only
        # those rows are recomputed, so a row's logprob never depends on its neighbours' bans.
        idx = torch.tensor(banned_rows, device=device)
        chosen[idx] = torch.log_softmax(raw[idx], dim=-1).gather(1, tokens[idx, None]).squeeze(1)
    token_list, logprobs = tokens.tolist(), chosen.tolist()
    return SampleResult(token_list, logprobs, _top_logprobs(raw, params, token_list, logprobs))
