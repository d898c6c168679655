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

from .sampler_buffers import SamplerBuffers
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
    token_array: np.ndarray | None = None  # token_ids as the sampler wrote them (int64)

    def ready(self) -> SampleResult:
        """Already on the host (DeferredSample's is not yet)."""
        return self


class DeferredSample:
    """A sampling kernel's result before the host has it (overlap mode on CUDA): its tokens are
    on the device, where the next step's forward reads them, and on their way to pinned host
    memory; ready() waits for that copy alone, not for whatever was queued after it."""

    def __init__(self, buffers: SamplerBuffers, rows: int, top: list[list[tuple[int, float]]]) -> None:
        self.token_array = buffers.tokens[:rows]  # on the device: the next step's input tokens
        self._buffers, self._rows, self._top = buffers, rows, top
        buffers.start_read(rows)

    def ready(self) -> SampleResult:
        tokens, logprobs = self._buffers.finish_read(self._rows)
        return SampleResult(tokens.tolist(), logprobs.tolist(), self._top, tokens)


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
    if banned_rows:
        # A banned row's logprob is under the model's own distribution, not the masked one: the
        # same number the row would give that token unbanned.
        picked = torch.from_numpy(tokens[banned_rows])[:, None]
        chosen[banned_rows] = log_softmax_rows(raw[torch.tensor(banned_rows)]).gather(1, picked)[:, 0].numpy()
    return SampleResult(tokens.tolist(), chosen.tolist(), _top_logprobs(raw, params), tokens)


def log_softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's log-softmax [R, V], float32. On the CPU by the C++ sampler's own rule and sums
    (lockstep._core.log_softmax), so a token's value here is bit for bit the logprob `sample`
    gives it: a chosen token's logprob is one number whether it came with top logprobs, a ban or
    prompt scoring. Elsewhere torch's log_softmax."""
    raw = logits.float()
    if raw.device.type != "cpu":
        return torch.log_softmax(raw, dim=-1)
    if raw.stride(-1) != 1:
        raw = raw.contiguous()
    out = torch.empty(raw.shape, dtype=torch.float32)
    _core.log_softmax(raw.numpy(), out.numpy())
    return out


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


_NO_TOP_LOGPROBS: list[tuple[int, float]] = []  # shared by every row that asks for none: never mutated


def _top_logprobs(raw: torch.Tensor, params: list[SamplingParams]) -> list[list[tuple[int, float]]]:
    """Per row, the params.logprobs most likely tokens and their logprobs under the raw logits
    (each row's own log-softmax: batch-invariant); [] for rows that ask for none."""
    wanted = [r for r, p in enumerate(params) if p.logprobs]
    tops: list[list[tuple[int, float]]] = [_NO_TOP_LOGPROBS] * len(params)
    if wanted:
        rows = log_softmax_rows(raw[torch.tensor(wanted, device=raw.device)])
        for row, r in zip(rows, wanted):
            vals, ids = torch.topk(row, params[r].logprobs)
            tops[r] = list(zip(ids.tolist(), vals.tolist()))
    return tops


def sample_with_kernel(logits: torch.Tensor, params: list[SamplingParams], keys: list[tuple[int, int, int]],
                       banned: list[frozenset[int]] | None = None,
                       buffers: SamplerBuffers | None = None, defer: bool = False) -> SampleResult | DeferredSample:
    """The choice `sample` makes, made where the logits are by kernels/sampling.py: one launch for
    every row, no sort, and only the tokens and logprobs cross to the host. With `buffers` (the
    engine's, placed at start-up) it allocates nothing on the device; without, it makes its
    columns and outputs as tensors (tests, benchmarks). The kernel reads fp16/bf16/fp32 logits
    and computes in fp32, so it takes the forward's own dtype. With `defer` (and `buffers`) the
    host does not wait for the tokens: a DeferredSample, whose ready() does."""
    from lockstep.kernels.sampling import sample_tokens

    device = logits.device
    banned_rows = _banned_rows(banned)
    wants_top = any(p.logprobs for p in params)
    # A float copy only where the rows are changed or scored here: bans, top logprobs.
    raw = logits.float() if banned_rows or wants_top else logits
    rows = _without_banned(raw, banned, banned_rows)
    if buffers is not None:
        tokens_out, logprobs_out = buffers.outputs(len(params))
        tokens, chosen = sample_tokens(rows, **buffers.columns(params, keys, raw.shape[-1]), tokens_out=tokens_out,
                                       logprobs_out=logprobs_out)
    else:
        tokens, chosen = sample_tokens(rows, **_kernel_columns(params, keys, raw.shape[-1], device))
    if banned_rows:
        # A banned row's logprob is under the model's own distribution, not the masked one. Only
        # those rows are recomputed, so a row's logprob never depends on its neighbours' bans.
        idx = torch.tensor(banned_rows, device=device)
        chosen[idx] = log_softmax_rows(raw[idx]).gather(1, tokens[idx, None]).squeeze(1)
    top = _top_logprobs(raw, params)
    if buffers is not None:
        pending = DeferredSample(buffers, len(params), top)
        return pending if defer else pending.ready()
    token_array = tokens.cpu().numpy()
    return SampleResult(token_array.tolist(), chosen.tolist(), top, token_array)


def _kernel_columns(params: list[SamplingParams], keys: list[tuple[int, int, int]], vocab: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """The kernel's seven columns as new tensors on the device (SamplerBuffers.columns places them)."""
    column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
    # Seeds are 64-bit unsigned; the kernel takes their two's-complement int64 bits.
    seeds = [seed - (1 << 64) if seed >= 1 << 63 else seed for seed, _, _ in keys]
    return {"temperature": column([0.0 if p.greedy else p.temperature for p in params], torch.float32),
            "top_k": column([p.top_k if 0 < p.top_k < vocab else 0 for p in params], torch.int32),  # k >= vocab: off
            "top_p": column([p.top_p for p in params], torch.float32),
            "min_p": column([p.min_p for p in params], torch.float32),
            "seeds": column(seeds, torch.int64),
            "positions": column([k[1] for k in keys], torch.int64),
            "branches": column([k[2] for k in keys], torch.int64)}
