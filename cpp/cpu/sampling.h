// Token sampling on the CPU: the rule of runtime/sampler.py's reference (sample_row) without
// its full sort of the vocabulary, one row per thread.
//
// Row r of logits [R, V] gives one token:
//   greedy (temperature <= 0): the first index of the largest logit.
//   otherwise: x = logit / temperature (float32, IEEE), e = exp(x - max x). Tokens are
//   ordered by x descending, ties by id. top-k keeps the first k of the order (k <= 0 or
//   k >= V: all), Z = sum of e over them; min-p keeps tokens with e >= min_p (p >= min_p *
//   max p); top-p keeps a token if the mass before it in the order is < top_p * Z; the first
//   token always stays. Every filter keeps a prefix of the order, so the kept set is one.
//   With u = uniform(seed, position, branch) and Zc the kept mass, the token is the first
//   kept one whose inclusive mass exceeds u * Zc.
//
// Nothing is sorted but a few dozen tokens: top-k is a selection, and the top-p cut and the
// pick are each found by a quickselect that weighs tokens by mass instead of counting them,
// expected O(V) where the reference sorts all V. Masses are summed in double, in an order
// that depends on the row alone; they differ from the reference's float32 sums in the last
// bits, so a token can differ from the reference's only where a threshold lies within
// rounding of a boundary between tokens.
//
// Batch invariance: each row is computed whole by one thread from its own logits and key,
// so its token does not depend on the other rows, the batch size or the thread count. NaN
// logits order as -inf (never chosen while any other token is finite).
#pragma once

#include <array>
#include <cstdint>

namespace lockstep::cpu {

// Philox4x32-10 (Salmon et al., SC'11; the Random123 constants).
std::array<std::uint32_t, 4> philox4x32_10(std::array<std::uint32_t, 4> counter,
                                           std::array<std::uint32_t, 2> key);

// (philox4x32_10((position, branch, 0, 0) mod 2^32, (seed lo, seed hi))[0] >> 8) * 2^-24:
// runtime/sampler.py's uniform(), a number in [0, 1) with 24 random bits.
double philox_uniform(std::uint64_t seed, std::int64_t position, std::int64_t branch);

struct SamplingBatch {
  const float* logits;  // row r at logits + r * row_stride, V contiguous floats
  std::int64_t rows;
  std::int64_t vocab;
  std::int64_t row_stride;
  const float* temperature;     // [rows]; <= 0 is greedy
  const std::int64_t* top_k;    // [rows]; <= 0 or >= vocab: off
  const float* top_p;           // [rows]; >= 1: off
  const float* min_p;           // [rows]; <= 0: off
  const std::uint64_t* seeds;   // [rows]
  const std::int64_t* positions;  // [rows]
  const std::int64_t* branches;   // [rows]
};

// tokens_out[r] for each row, the rows spread over the thread pool; with logprobs_out (may be
// null), also the chosen token's log-probability under the row's raw logits (no temperature or
// filter): x[t] - max x - log(sum exp(x - max x)), the sum in double in the row's own order,
// so it too depends on the row alone. NaN logits count as -inf there as well (torch's
// log_softmax would make the whole row NaN). Throws std::invalid_argument if vocab < 1 or
// vocab does not fit int32.
void sample_tokens(const SamplingBatch& batch, std::int64_t* tokens_out, float* logprobs_out = nullptr);

// out[r, i] = log softmax of row r at i (out: [rows, vocab], contiguous), by the same rule and
// the same sums as sample_tokens' logprobs_out, so out[r, token] is bit for bit the logprob it
// gives that token. Each row in one thread. Throws std::invalid_argument if vocab < 1.
void log_softmax_rows(const float* logits, std::int64_t rows, std::int64_t vocab, std::int64_t row_stride,
                      float* out);

}  // namespace lockstep::cpu
