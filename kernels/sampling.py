"""Token sampling on the GPU, bit-compatible with the reference sampler (runtime.sampler.sample_row).

Row r of logits [R, V] gives one token and its logprob:

    greedy (temperature <= 0):  token = argmax(logits[r])  (the first index of the max)
    otherwise:  x = logits[r].float() / temperature  (IEEE division, as torch does)
                order: x descending, ties by token id  (the sampler's fixed order)
                top-k: the first k tokens of the order (k = 0 or k >= V: all)
                p = softmax(x) over those;  top-p: token s stays if the mass before it < top_p
                min-p: token stays if p >= min_p * max(p);  the first token always stays
                u = uniform(seed, position, branch)  (Philox4x32-10, 24 bits)
                token = the first kept token whose cumulative kept mass > u * (kept mass)
    logprob = log_softmax(logits[r].float())[token]  (the model's raw distribution)

Every filter keeps a prefix of the order, so the kept set is a prefix too, and the pick is a
position in it. A position is named by a cutoff (v, j): the tokens with x > v, or x == v and
id <= j. The kernel never sorts. One program owns one row and makes passes over it in BLOCK
chunks (the row stays in L2; nothing is written back):
  1. the raw max and its first index (the greedy token); then sum exp(logits - max) (logprob).
  2. top-k cutoff: a search (below) for the first token whose inclusive count reaches k.
  3. one pass: Z = sum exp(x - max x) over the top-k set, and the min-p cutoff, the smallest x
     with exp(x - max x) >= min_p (ties share a probability, so min-p cuts between values).
  4. top-p cutoff: the first token, within the top-k set, whose inclusive mass reaches top_p * Z.
  5. the kept cutoff is the earliest of the three; one pass sums its mass Zc.
  6. the pick: the first kept token whose inclusive mass exceeds u * Zc.
A search is a bisection on the value, not a sort. Each float x has a 32-bit order-preserving key
(its bit pattern, the negative half flipped); a pass counts the tokens (or sums the mass) at or
above PIVOTS keys at once and keeps the bracket where the running total crosses the threshold,
so the key range shrinks PIVOTS + 1 times a pass: exact after at most 8 passes at 16 pivots.
That gives the crossing value v and the weight above it; tokens tied at v weigh the same, so
the crossing rank inside the tie group is arithmetic, and one last pass finds that member by id.

Masses are summed in a different order from the reference's sorted cumsum, so they differ in
the last bits: a token can differ only where the reference's target (or a top-p / min-p
threshold) lies within rounding of a boundary between two tokens. Temperature division is
IEEE (div_rn), so the order, ties included, is exactly the sampler's, and counts are exact.
Cost: at most 32 passes over the row with every filter on (3 searches of 8 + 1), 2 for greedy.

Batch invariance: the chunking depends on V only and each row is its own program, so a row's
token and logprob do not depend on the batch. The launcher reads no tensor values (no
device->host sync): per-row parameters live in device tensors and are trusted (SamplingParams
validates them); top_k <= 0 or >= V, top_p >= 1 and min_p <= 0 turn a filter off.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor

# Philox4x32-10 constants (Random123; runtime/sampler.py).
_PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
_PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
_PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
_PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox_uniform(seed, position, branch):
    """uniform(seed, position, branch) of runtime/sampler.py, elementwise on int64 tensors.

    (philox4x32_10(counter=(position, branch, 0, 0), key=(seed lo32, seed hi32))[0] >> 8) * 2**-24.
    The rounds are spelled out in uint32 (umulhi for the high half of the 64-bit product) rather
    than using tl.philox, so the bits are those of runtime.sampler.uniform by construction.
    """
    c0 = position.to(tl.uint32)  # int64 -> uint32 keeps the low 32 bits, like `& 0xFFFFFFFF`
    c1 = branch.to(tl.uint32)
    c2 = tl.full(c0.shape, 0, tl.uint32)  # not tl.zeros_like: a @jit helper, slow when interpreted
    c3 = c2
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)  # bits 32..63, also for a seed >= 2**63 (stored negative)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)  # 24 bits: exact in float32


@triton.jit
def _philox_uniform_kernel(seed_ptr, position_ptr, branch_ptr, out_ptr, R, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < R
    seed = tl.load(seed_ptr + offs, mask=mask, other=0)
    position = tl.load(position_ptr + offs, mask=mask, other=0)
    branch = tl.load(branch_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, _philox_uniform(seed, position, branch), mask=mask)


@triton.jit
def _order_key(x):
    """An int64 that orders like the float32 x: the bits, with the negative half flipped.

    -0.0 gets the key of +0.0, since the two compare equal (one tie group in the sampler's sort).
    """
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(key == -1, 0, key)
    return key.to(tl.int64)


@triton.jit
def _key_value(key):
    """The float32 whose _order_key is `key` (key in int32 range)."""
    k = key.to(tl.int32)
    return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


@triton.jit
def _search(row_ptr, V, temperature, x_max, cut_v, cut_j, thr,
            COUNT: tl.constexpr, STRICT: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr):
    """The cutoff (v, j) of the first token, in sampling order within the set cut(cut_v, cut_j),
    whose inclusive weight exceeds thr (STRICT) or reaches it; weight is 1 per token (COUNT) or
    exp(x - x_max). Falls back to the set's last token if the total never gets there.

    A PIVOTS-way bisection over order keys in [key(cut_v), key(x_max)] finds the largest value v
    with W(x >= v) past thr. Invariant: key lo passes, key hi + 1 fails and w_above = W there,
    i.e. W(x > value(hi)). Each pass weighs the row at PIVOTS evenly spaced keys at once and
    keeps the bracket between the last pivot that passes and the first that fails, so the range
    shrinks PIVOTS + 1 times a pass: 32-bit keys take at most 8 passes at 16 pivots. Every pivot
    is above cut_v, so no set test is needed there, and W is monotone in the pivot even in float
    (sums of non-negative terms, in one order). At the end w_above = W(x > v). Within the tie
    group x == v every token weighs the same, so the crossing rank comes from arithmetic, and
    one more pass finds that member by id.
    """
    lo = _order_key(cut_v)
    hi = _order_key(x_max)
    w_above = tl.full([], 0.0, tl.float32)  # W(x > value(hi)): nothing lies above x_max
    ranks = (tl.arange(0, PIVOTS) + 1).to(tl.int64)
    while lo < hi:
        step = (hi - lo + PIVOTS) // (PIVOTS + 1)  # ceil((hi - lo + 1) / (PIVOTS + 1)) >= 1
        keys = tl.minimum(lo + step * ranks, hi)
        k32 = keys.to(tl.int32)  # _key_value, inlined: the interpreter pays per helper call
        pivots = tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32).to(tl.float32, bitcast=True)
        w = tl.full([PIVOTS], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            logits = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            x = tl.math.div_rn(logits, temperature)
            above = x[:, None] >= pivots[None, :]
            if COUNT:
                w += tl.sum(above.to(tl.float32), axis=0)
            else:
                w += tl.sum(tl.where(above, tl.exp(x - x_max)[:, None], 0.0), axis=0)
        if STRICT:
            ok = w > thr
        else:
            ok = w >= thr
        # W falls as the pivot rises, so the passing pivots come first, and the first failing one
        # (the next pivot after the last passing one) has the largest W of those that fail.
        w_fail = tl.max(tl.where(ok, -1.0, w), axis=0)  # -1: none failed
        lo_next = tl.max(tl.where(ok, keys, lo), axis=0)
        hi = tl.where(w_fail >= 0, tl.minimum(lo_next + step, hi) - 1, hi)
        w_above = tl.where(w_fail >= 0, w_fail, w_above)
        lo = lo_next
    v = _key_value(lo)
    if COUNT:
        unit = tl.full([], 1.0, tl.float32)
    else:
        unit = tl.exp(v - x_max)
    q = tl.where(unit > 0, (thr - w_above) / unit, 0.0)
    if STRICT:
        rank = tl.floor(q)  # the first r with w_above + (r + 1) * unit > thr
    else:
        rank = tl.ceil(q) - 1.0  # ... >= thr
    rank = tl.minimum(tl.maximum(rank, 0.0), V * 1.0).to(tl.int32)
    # The rank-th (0-based) member of the tie group by id; a rank past the group (rounding) or an
    # empty search (no crossing) ends on the group's last member.
    seen = tl.full([], 0, tl.int32)
    found = tl.full([], 0, tl.int32) + V
    last = tl.full([], 0, tl.int32) - 1
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        logits = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        x = tl.math.div_rn(logits, temperature)
        member = (offs < V) & (x == v) & ((x > cut_v) | (offs <= cut_j))
        ones = member.to(tl.int32)
        before = tl.cumsum(ones, axis=0) + seen  # members up to and including this lane
        found = tl.minimum(found, tl.min(tl.where(member & (before == rank + 1), offs, V), axis=0))
        last = tl.maximum(last, tl.max(tl.where(member, offs, -1), axis=0))
        seen += tl.sum(ones, axis=0)
    return v, tl.where(found < V, found, last)


@triton.jit
def _set_mass(row_ptr, V, temperature, x_max, cut_v, cut_j, BLOCK: tl.constexpr):
    """sum exp(x - x_max) over the set cut(cut_v, cut_j)."""
    z = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        logits = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        x = tl.math.div_rn(logits, temperature)
        in_set = (x > cut_v) | ((x == cut_v) & (offs <= cut_j) & (offs < V))
        z += tl.sum(tl.where(in_set, tl.exp(x - x_max), 0.0), axis=0)
    return z


@triton.jit
def _sample_kernel(logits_ptr, stride_row, V, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                   seed_ptr, position_ptr, branch_ptr, tokens_ptr, logprobs_ptr, BLOCK: tl.constexpr,
                   PIVOTS: tl.constexpr):
    r = tl.program_id(0)
    row_ptr = logits_ptr + r.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + r)

    # Pass 1: the raw max and its first index (the greedy token).
    l_max = tl.full([], float("-inf"), tl.float32)
    argmax = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        logits = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        c_max, c_arg = tl.max(logits, axis=0, return_indices=True, return_indices_tie_break_left=True)
        argmax = tl.where(c_max > l_max, start + c_arg, argmax)  # strict: an earlier chunk wins a tie
        l_max = tl.maximum(l_max, c_max)
    # Pass 2: the raw softmax denominator, for the logprob.
    sum_exp = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        logits = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        sum_exp += tl.sum(tl.exp(logits - l_max), axis=0)

    token = argmax
    if temperature > 0:
        # Correctly rounded division is monotone, so this is the max of x exactly.
        x_max = tl.math.div_rn(l_max, temperature)
        cut_v = tl.full([], float("-inf"), tl.float32)  # the whole row: x >= -inf, every id
        cut_j = tl.full([], 0, tl.int32) + V - 1
        top_k = tl.load(top_k_ptr + r)
        if (top_k > 0) & (top_k < V):
            cut_v, cut_j = _search(row_ptr, V, temperature, x_max, cut_v, cut_j, (top_k - 1).to(tl.float32),
                                   COUNT=True, STRICT=True, BLOCK=BLOCK, PIVOTS=PIVOTS)
        # The top-k softmax denominator, and min-p's smallest kept value: p >= min_p * p_max is
        # exp(x - x_max) >= min_p, and ties share a probability, so min-p cuts between values.
        min_p = tl.load(min_p_ptr + r)
        z = tl.full([], 0.0, tl.float32)
        min_p_v = x_max
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            logits = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            x = tl.math.div_rn(logits, temperature)
            e = tl.exp(x - x_max)
            in_set = (x > cut_v) | ((x == cut_v) & (offs <= cut_j) & (offs < V))
            z += tl.sum(tl.where(in_set, e, 0.0), axis=0)
            min_p_v = tl.minimum(min_p_v, tl.min(tl.where((offs < V) & (e >= min_p), x, float("inf")), axis=0))
        top_p = tl.load(top_p_ptr + r)
        if top_p < 1.0:
            # The last kept token is the first whose inclusive mass reaches top_p: the mass
            # before it is < top_p, and the mass before the next one is not.
            cut_v, cut_j = _search(row_ptr, V, temperature, x_max, cut_v, cut_j, top_p * z,
                                   COUNT=False, STRICT=False, BLOCK=BLOCK, PIVOTS=PIVOTS)
        kept_mass = z
        if (top_p < 1.0) | (min_p_v > cut_v):
            if min_p_v > cut_v:  # min-p ends earlier: keep the whole tie group at min_p_v
                cut_v = min_p_v
                cut_j = tl.full([], 0, tl.int32) + V - 1
            kept_mass = _set_mass(row_ptr, V, temperature, x_max, cut_v, cut_j, BLOCK=BLOCK)
        seed = tl.load(seed_ptr + r)
        position = tl.load(position_ptr + r)
        branch = tl.load(branch_ptr + r)
        target = _philox_uniform(seed, position, branch) * kept_mass
        _, token = _search(row_ptr, V, temperature, x_max, cut_v, cut_j, target,
                           COUNT=False, STRICT=True, BLOCK=BLOCK, PIVOTS=PIVOTS)
    # Only a row with NaN or all -inf could get here out of range; keep the load in bounds.
    token = tl.minimum(tl.maximum(token, 0), V - 1)
    chosen = tl.load(row_ptr + token).to(tl.float32)
    tl.store(tokens_ptr + r, token.to(tl.int64))
    tl.store(logprobs_ptr + r, chosen - l_max - tl.log(sum_exp))


# Chunk width, pivots per search pass and warps: functions of V alone (batch invariance). A pass
# over a 1024-token chunk tests 16 pivots: a [1024, 16] tile, 64 values a thread at 8 warps.
# Smaller vocabularies (tests) spend the same tile on more pivots, hence fewer passes.
MAX_BLOCK = 1024
TILE = 16384


def _launch_config(vocab: int) -> tuple[int, int, int]:
    """(BLOCK, PIVOTS, num_warps) for a vocabulary size."""
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    pivots = min(256, TILE // block)
    return block, pivots, max(1, min(8, block // 128))


def _check_rows(name: str, t: object, dtype: torch.dtype, rows: int, device: torch.device) -> None:
    check_tensor(name, t, dtype=dtype, shape=(rows,), device=device, contiguous=True)


def philox_uniform(seeds: torch.Tensor, positions: torch.Tensor, branches: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """uniform(seed, position, branch) of runtime/sampler.py for each row: fp32 [R] in [0, 1).

    seeds, positions, branches are int64 [R]; a seed >= 2**63 is passed as its two's complement.
    """
    check_tensor("seeds", seeds, dtype=torch.int64, ndim=1, contiguous=True)
    rows, device = seeds.shape[0], seeds.device
    _check_rows("positions", positions, torch.int64, rows, device)
    _check_rows("branches", branches, torch.int64, rows, device)
    if out is None:
        out = torch.empty(rows, dtype=torch.float32, device=device)
    _check_rows("out", out, torch.float32, rows, device)
    if rows:
        block = 128
        _philox_uniform_kernel[(triton.cdiv(rows, block),)](seeds, positions, branches, out, rows, BLOCK=block,
                                                            num_warps=4)
    return out


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, branches: torch.Tensor,
                  tokens_out: torch.Tensor | None = None,
                  logprobs_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of logits [R, V] (fp32/fp16/bf16, contiguous last dim), as runtime/sampler.py.

    temperature, top_p, min_p: fp32 [R]; top_k: int32 [R]; seeds, positions, branches: int64 [R].
    temperature 0 is greedy. Returns (tokens int64 [R], logprobs fp32 [R]), the logprob taken under
    log_softmax of the raw logits.
    """
    check_tensor("logits", logits, dtype=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    rows, vocab = logits.shape
    device = logits.device
    if vocab < 1:
        raise ValueError(f"logits must have at least one column, got shape {tuple(logits.shape)}")
    for name, t, dtype in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int32),
                           ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32),
                           ("seeds", seeds, torch.int64), ("positions", positions, torch.int64),
                           ("branches", branches, torch.int64)):
        _check_rows(name, t, dtype, rows, device)
    if tokens_out is None:
        tokens_out = torch.empty(rows, dtype=torch.int64, device=device)
    if logprobs_out is None:
        logprobs_out = torch.empty(rows, dtype=torch.float32, device=device)
    _check_rows("tokens_out", tokens_out, torch.int64, rows, device)
    _check_rows("logprobs_out", logprobs_out, torch.float32, rows, device)
    if rows:
        block, pivots, num_warps = _launch_config(vocab)
        _sample_kernel[(rows,)](logits, logits.stride(0), vocab, temperature, top_k, top_p, min_p, seeds, positions,
                                branches, tokens_out, logprobs_out, BLOCK=block, PIVOTS=pivots, num_warps=num_warps)
    return tokens_out, logprobs_out


def sample_tokens_reference(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                            top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                            branches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """runtime.sampler.sample_row for each row, and log_softmax(logits.float())[token]."""
    from lockstep.runtime.sampler import sample_row
    from lockstep.runtime.sampling_params import SamplingParams

    logits = logits.cpu()
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    tokens = []
    for r in range(logits.shape[0]):
        params = SamplingParams(temperature=float(temperature[r]), top_k=max(0, int(top_k[r])),
                                top_p=min(1.0, float(top_p[r])), min_p=max(0.0, float(min_p[r])))
        seed = int(seeds[r]) & 0xFFFFFFFFFFFFFFFF
        tokens.append(sample_row(logits[r], params, seed, int(positions[r]), int(branches[r])))
    tokens_t = torch.tensor(tokens, dtype=torch.int64)
    return tokens_t, logprobs[torch.arange(len(tokens)), tokens_t]
