#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "fast_exp.h"
#include "thread_pool.h"

// The passes over a row are built twice, for AVX2 and baseline x86-64, and picked when the
// module loads (GCC's target_clones), as cpu_ops.cpp does; elsewhere (ARM, clang) once. The
// file builds with -ffp-contract=off, so every clone rounds every operation alike.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOCKSTEP_CLONE_AVX2 __attribute__((target_clones("avx2", "default")))
#else
#define LOCKSTEP_CLONE_AVX2
#endif

namespace lockstep::cpu {

namespace {

constexpr std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr std::uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

// A token in the order every filter cuts (x descending, ties by id), packed so that order is
// one integer comparison: key = (x's bits mapped to descending unsigned order) << 32 | id,
// smaller key first. Its unnormalized probability e rides along, so a partition pass reads
// one array front to back instead of gathering x and e by id.
struct Token {
  std::uint64_t key;
  float e;
  std::int32_t id() const { return static_cast<std::int32_t>(key & 0xFFFFFFFFu); }
};

inline std::uint64_t order_key(float x, std::int32_t id) {
  x += 0.0f;  // -0 becomes +0: they are equal, so only the id may order them
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  // Ascending unsigned order of floats: flip all bits of negatives, the sign bit of the rest.
  const std::uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (std::uint64_t{~ascending} << 32) | static_cast<std::uint32_t>(id);
}

inline bool key_before(const Token& a, const Token& b) { return a.key < b.key; }

// The sum of e over tokens[0, n) in double, in eight interleaved partial sums (then pairwise):
// a single running sum is a chain of dependent adds, 4 cycles each, and was most of a row's
// time. The order is fixed by n, so the sum is too (in every clone alike).
LOCKSTEP_CLONE_AVX2
double mass_of(const Token* tokens, std::int64_t n) {
  double part[8] = {};
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] += tokens[i + j].e;
  }
  for (int j = 0; i < n; ++i, ++j) part[j] += tokens[i].e;
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Quickselect by mass (first_prefix_reaching) and by count (keep_first) share these rounds.
constexpr std::int64_t kSortBelow = 32;  // >= 3: a median of three then leaves both sides non-empty
constexpr int kMostRounds = 128;  // then sort what is left (adversarial pivots), as introselect

std::uint64_t median_of_three(const Token* tokens, std::int64_t lo, std::int64_t hi) {
  const std::uint64_t a = tokens[lo].key, b = tokens[lo + (hi - lo) / 2].key, c = tokens[hi - 1].key;
  return std::max(std::min(a, b), std::min(std::max(a, b), c));
}

// Moves the tokens of [lo, hi) with key <= pivot to the front (in no order); returns how many.
// Each token goes to the left or right end of `spare` without a branch: the comparison is a
// coin flip for the branch predictor, which std::partition pays for on every token.
std::int64_t partition_at(Token* tokens, std::int64_t lo, std::int64_t hi, std::uint64_t pivot,
                          Token* spare) {
  std::int64_t left = 0, right = hi - lo - 1;
  for (std::int64_t i = lo; i < hi; ++i) {
    const Token t = tokens[i];
    const bool is_left = t.key <= pivot;
    spare[left] = t;
    spare[right] = t;
    left += is_left;
    right -= !is_left;
  }
  std::copy(spare, spare + (hi - lo), tokens + lo);
  return left;
}

// Rearranges tokens so that tokens[0, k) are the first k of the order (in no order), 0 < k < size.
void keep_first(std::vector<Token>& tokens, std::int64_t k, Token* spare) {
  std::int64_t lo = 0, hi = static_cast<std::int64_t>(tokens.size());  // the k-th token is in [lo, hi)
  for (int rounds = 0; hi - lo >= kSortBelow && rounds < kMostRounds; ++rounds) {
    const std::int64_t split = lo + partition_at(tokens.data(), lo, hi, median_of_three(tokens.data(), lo, hi), spare);
    if (split == k) return;
    (split > k ? hi : lo) = split;
  }
  std::sort(tokens.begin() + lo, tokens.begin() + hi, key_before);
}

// Where a prefix of the order first reaches a mass: `length` tokens, the last of them `last`.
struct Reach {
  std::int64_t length;
  std::int32_t last;
};

// The shortest prefix of the order over tokens[0, n) whose mass (sum of e) reaches
// `threshold` (> it if `strict`, else >= it), found by a quickselect that weighs instead of
// counting: partition around a pivot, and go on into the side where the running mass
// crosses. Expected O(n); only the last few dozen tokens are sorted. It leaves
// tokens[0, length) holding that prefix, in no order. If no prefix reaches (the whole mass
// falls short by rounding), length is n and last the order's last token. Masses are summed
// in double, in an order fixed by the row's contents.
Reach first_prefix_reaching(Token* tokens, std::int64_t n, Token* spare, double threshold,
                            bool strict) {
  const auto reaches = [&](double mass) { return strict ? mass > threshold : mass >= threshold; };
  std::int64_t lo = 0, hi = n;  // the answer's last token is in tokens[lo, hi)
  double before_lo = 0.0;       // the mass of tokens[0, lo), all of it earlier in the order
  for (int rounds = 0; hi - lo >= kSortBelow && rounds < kMostRounds; ++rounds) {
    const std::int64_t left = partition_at(tokens, lo, hi, median_of_three(tokens, lo, hi), spare);
    const double mass = before_lo + mass_of(tokens + lo, left);
    if (reaches(mass)) {
      hi = lo + left;
    } else {
      before_lo = mass;
      lo += left;
    }
  }
  std::sort(tokens + lo, tokens + hi, key_before);
  double mass = before_lo;
  for (std::int64_t j = lo; j < hi; ++j) {
    mass += tokens[j].e;
    if (reaches(mass)) return {j + 1, tokens[j].id()};
  }
  return {n, std::max_element(tokens, tokens + n, key_before)->id()};
}

// Reused across rows and calls: a row's scratch is vocabulary-sized arrays.
struct Scratch {
  std::vector<float> x, e;
  std::vector<Token> tokens, spare;
};

// The largest logit, NaN skipped (-inf if there is none). Eight running maxima: the compiler
// may not reorder one float max chain, but it vectorizes eight independent ones.
LOCKSTEP_CLONE_AVX2
float row_max(const float* x, std::int64_t V) {
  float lane_max[8];
  std::fill(lane_max, lane_max + 8, -std::numeric_limits<float>::infinity());
  std::int64_t tail = 0;
  for (; tail + 8 <= V; tail += 8) {
    for (int j = 0; j < 8; ++j) lane_max[j] = x[tail + j] > lane_max[j] ? x[tail + j] : lane_max[j];  // NaN: false
  }
  for (; tail < V; ++tail) lane_max[0] = x[tail] > lane_max[0] ? x[tail] : lane_max[0];
  return *std::max_element(lane_max, lane_max + 8);
}

// The first index of the largest logit; 0 if every logit is NaN.
std::int64_t greedy_row(const float* logits, std::int64_t V, float max_x) {
  for (std::int64_t i = 0; i < V; ++i) {
    if (logits[i] == max_x) return i;
  }
  return 0;
}

LOCKSTEP_CLONE_AVX2  // its passes over the row (scale, exp, keys) vectorize twice as wide
std::int64_t sample_row(const float* logits, std::int64_t V, float temperature, std::int64_t top_k,
                        float top_p, float min_p, double u, Scratch& s) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  s.x.resize(V);
  s.e.resize(V);
  float* x = s.x.data();
  float* e = s.e.data();
  for (std::int64_t i = 0; i < V; ++i) {
    const float v = logits[i] / temperature;
    x[i] = std::isnan(v) ? kNegInf : v;
  }
  const float max_x = row_max(x, V);
  if (max_x == kNegInf) return 0;  // nothing can be chosen: the first token of the order
  if (max_x == -kNegInf) {
    for (std::int64_t i = 0; i < V; ++i) e[i] = x[i] == max_x ? 1.0f : 0.0f;  // +inf - +inf is NaN
  } else {
    for (std::int64_t i = 0; i < V; ++i) e[i] = exp_nonpositive(x[i] - max_x);
  }

  std::vector<Token>& tokens = s.tokens;
  tokens.resize(V);
  for (std::int64_t i = 0; i < V; ++i) {
    tokens[i] = {order_key(x[i], static_cast<std::int32_t>(i)), e[i]};
  }
  s.spare.resize(V);
  if (top_k > 0 && top_k < V) {
    keep_first(tokens, top_k, s.spare.data());
    tokens.resize(top_k);
  }
  const double z = mass_of(tokens.data(), static_cast<std::int64_t>(tokens.size()));  // top-p's denominator
  if (min_p > 0.0f) {
    // e = p / max p; the max token has e = 1 >= min_p, so it stays.
    tokens.erase(std::remove_if(tokens.begin(), tokens.end(), [&](const Token& t) { return t.e < min_p; }),
                 tokens.end());
  }
  double kept_mass = mass_of(tokens.data(), static_cast<std::int64_t>(tokens.size()));

  std::int64_t kept = static_cast<std::int64_t>(tokens.size());
  if (top_p < 1.0f) {
    // A token stays while the mass before it is < top_p * z: the kept prefix is the shortest
    // whose mass reaches it (>=), and the first token stays in any case.
    const Reach cut = first_prefix_reaching(tokens.data(), kept, s.spare.data(),
                                            static_cast<double>(top_p) * z, /*strict=*/false);
    if (cut.length < kept) {
      kept = cut.length;
      kept_mass = mass_of(tokens.data(), kept);
    }
  }
  // The first kept token whose inclusive mass exceeds u * (kept mass).
  return first_prefix_reaching(tokens.data(), kept, s.spare.data(), u * kept_mass, /*strict=*/true).last;
}

// log(sum of exp(x - max_x)) over a row whose max max_x is finite. The exps are summed in float
// over chunks of kChunk tokens (eight lanes, so the compiler vectorizes) and the chunks' sums in
// double: float lanes alone would lose ~1e-5 of a 49152-token row's mass. The order depends on
// the row alone. NaN counts as -inf.
LOCKSTEP_CLONE_AVX2
double log_mass(const float* logits, std::int64_t V, float max_x) {
  constexpr std::int64_t kChunk = 256;
  double sum = 0.0;
  for (std::int64_t start = 0; start < V; start += kChunk) {
    const std::int64_t end = std::min(V, start + kChunk);
    float lane_sum[8] = {};
    std::int64_t i = start;
    for (; i + 8 <= end; i += 8) {
      for (int j = 0; j < 8; ++j) {
        const float v = logits[i + j];
        const float e = exp_nonpositive(v - max_x);
        lane_sum[j] += v == v ? e : 0.0f;
      }
    }
    for (; i < end; ++i) {
      const float v = logits[i];
      lane_sum[0] += v == v ? exp_nonpositive(v - max_x) : 0.0f;
    }
    float chunk = 0.0f;
    for (float lane : lane_sum) chunk += lane;
    sum += chunk;
  }
  return std::log(sum);
}

// A logit's log-probability given its row's max and log_mass (unused unless max_x is finite).
// The one formula of both the sampler's chosen logprob and log_softmax_rows, so a token's
// logprob is the same number whichever of them gave it.
inline float logprob_of(float x, float max_x, double row_log_mass) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  if (std::isnan(x) || x == -kInf) return -kInf;
  if (max_x == kInf) return x == kInf ? 0.0f : -kInf;  // all the mass on the +inf logits
  return static_cast<float>(static_cast<double>(x) - max_x - row_log_mass);
}

// log p(token) under the raw logits, given their max.
float raw_logprob(const float* logits, std::int64_t V, std::int64_t token, float max_x) {
  const bool finite = std::isfinite(max_x);
  return logprob_of(logits[token], max_x, finite ? log_mass(logits, V, max_x) : 0.0);
}

LOCKSTEP_CLONE_AVX2
void log_softmax_row(const float* logits, std::int64_t V, float* out) {
  const float max_x = row_max(logits, V);
  const double mass = std::isfinite(max_x) ? log_mass(logits, V, max_x) : 0.0;
  for (std::int64_t i = 0; i < V; ++i) out[i] = logprob_of(logits[i], max_x, mass);
}

}  // namespace

std::array<std::uint32_t, 4> philox4x32_10(std::array<std::uint32_t, 4> c,
                                           std::array<std::uint32_t, 2> k) {
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = std::uint64_t{kM0} * c[0];
    const std::uint64_t p1 = std::uint64_t{kM1} * c[2];
    c = {static_cast<std::uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<std::uint32_t>(p1),
         static_cast<std::uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<std::uint32_t>(p0)};
    k = {k[0] + kW0, k[1] + kW1};
  }
  return c;
}

double philox_uniform(std::uint64_t seed, std::int64_t position, std::int64_t branch) {
  const auto r = philox4x32_10(
      {static_cast<std::uint32_t>(position), static_cast<std::uint32_t>(branch), 0u, 0u},
      {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)});
  return static_cast<double>(r[0] >> 8) * (1.0 / (1 << 24));
}

void sample_tokens(const SamplingBatch& b, std::int64_t* tokens_out, float* logprobs_out) {
  if (b.vocab < 1 || b.vocab > std::numeric_limits<std::int32_t>::max()) {
    throw std::invalid_argument("logits: the vocabulary must have 1 to 2^31 - 1 tokens, got " +
                                std::to_string(b.vocab));
  }
  // Greedy rows are a scan; sampled ones an exp per token and a partial sort, as is a logprob
  // (an exp per token): worth waking sleeping workers once there are a few vocabularies' worth
  // of exps to share.
  bool any_sampled = false;
  for (std::int64_t r = 0; r < b.rows; ++r) any_sampled = any_sampled || b.temperature[r] > 0.0f;
  const std::int64_t work = b.rows * b.vocab;
  const bool wake = b.rows > 1 && (any_sampled || work >= (logprobs_out != nullptr ? (1 << 18) : (1 << 20)));
  ThreadPool::instance().run(static_cast<int>(b.rows), [&](int r) {
    const float* row = b.logits + r * b.row_stride;
    const bool greedy = !(b.temperature[r] > 0.0f);
    // The raw logits' max: greedy's answer, and the logprob's offset (a sampled row scans its
    // tempered logits for their own max).
    const float max_x = greedy || logprobs_out != nullptr ? row_max(row, b.vocab) : 0.0f;
    std::int64_t token;
    if (greedy) {
      token = greedy_row(row, b.vocab, max_x);
    } else {
      thread_local Scratch scratch;
      const double u = philox_uniform(b.seeds[r], b.positions[r], b.branches[r]);
      token = sample_row(row, b.vocab, b.temperature[r], b.top_k[r], b.top_p[r], b.min_p[r], u, scratch);
    }
    tokens_out[r] = token;
    if (logprobs_out != nullptr) logprobs_out[r] = raw_logprob(row, b.vocab, token, max_x);
  }, wake);
}

void log_softmax_rows(const float* logits, std::int64_t rows, std::int64_t vocab, std::int64_t row_stride,
                      float* out) {
  if (vocab < 1) throw std::invalid_argument("logits: the vocabulary must have at least 1 token");
  ThreadPool::instance().run(static_cast<int>(rows), [&](int r) {
    log_softmax_row(logits + r * row_stride, vocab, out + r * vocab);
  }, rows > 1 && rows * vocab >= (1 << 18));
}

}  // namespace lockstep::cpu
