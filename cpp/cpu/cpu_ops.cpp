// RMSNorm, RoPE + cache write and paged attention on the CPU: the orders of operations that
// make their results batch- and thread-invariant, then the ops.
//
// The reduction orders
// --------------------
// Every reduction over a vector of n floats (a sum of squares, a dot product) is `dot8`: the
// elements are dealt to 8 lanes, lane = i mod 8, each lane starts at +0.0f and adds a[i] * b[i]
// (product rounded, then sum rounded: no fma) in increasing i; the lanes are then summed in a
// fixed tree ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). The compiler may put the lanes
// in SIMD registers, but it may not reorder them: no -ffast-math, and -ffp-contract=off
// (CMakeLists.txt).
//
// Attention, per (sequence, query, head), with n visible keys:
//   1. s_j = dot8(q, k_j) * scale, j = 0..n-1;
//   2. m = max_j s_j;  p_j = exp(s_j - m) by fast_exp.h's exp_nonpositive (within 2 ulp of
//      expf, and the same on every CPU);  l = p_0 + p_1 + ... + p_{n-1}, left to right;
//   3. acc = 0; acc[d] += p_j * v_j[d] for j = 0..n-1 in order;  out[d] = acc[d] / l.
// It reads only that sequence's query and context, so a sequence's output does not depend on
// the others in the step. Threads split the work by whole (sequence, head) pairs, so the thread
// count decides only who computes an output, never how.
#include "cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "fast_exp.h"
#include "thread_pool.h"

namespace lockstep::cpu {

namespace {

constexpr int kLanes = 8;

// Eight and sixteen fp32 lanes as one GCC/Clang vector: on baseline x86-64 the compiler runs
// them as two or four SSE registers (NEON on Arm), in attend()'s AVX2 and AVX-512 clones as
// one ymm or zmm. Lane-wise + and * are exactly the scalar ops, one lane each (no contraction:
// -ffp-contract=off), so they only spell out the order above, and every clone gives the same
// bits.
typedef float Lanes8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Lanes16 __attribute__((vector_size(16 * sizeof(float))));

template <class V>
[[gnu::always_inline]] inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[r] = dot8(a, b[r], n) for R vectors b[r] at once: R independent chains keep the adder
// busy where one short dot product would wait on its own latency. Each out[r] is exactly dot8.
template <int R>
[[gnu::always_inline]] inline void dot8_rows(const float* a, const float* const* b, std::int64_t n,
                                             float* out) {
  Lanes8 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = Lanes8{};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Lanes8 x = load<Lanes8>(a + i);
    for (int r = 0; r < R; ++r) acc[r] += x * load<Lanes8>(b[r] + i);
  }
  for (int j = 0; i < n; ++i, ++j) {
    for (int r = 0; r < R; ++r) acc[r][j] += a[i] * b[r][i];
  }
  for (int r = 0; r < R; ++r) {
    const Lanes8 v = acc[r];
    out[r] = ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
  }
}

float dot8(const float* a, const float* b, std::int64_t n) {
  float out;
  dot8_rows<1>(a, &b, n, &out);
  return out;
}

// o[d] = (p[0] v_0[d] + p[1] v_1[d] + ... + p[n-1] v_{n-1}[d]) / l, adding from +0.0f in
// increasing j, where v_j = v + slots[j] * row. Sixteen d at a time stay in registers through
// the whole sum; the order per d is the same.
[[gnu::always_inline]] inline void weighted_values(const float* p, std::int64_t n, const float* v,
                                                   const std::int64_t* slots, std::int64_t row,
                                                   std::int64_t D, float l, float* o) {
  std::int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    Lanes16 a{};
    for (std::int64_t j = 0; j < n; ++j) a += (Lanes16{} + p[j]) * load<Lanes16>(v + slots[j] * row + d);
    const Lanes16 r = a / l;
    std::memcpy(o + d, &r, sizeof r);
  }
  for (; d < D; ++d) {
    float a = 0.0f;
    for (std::int64_t j = 0; j < n; ++j) a += p[j] * v[slots[j] * row + d];
    o[d] = a / l;
  }
}

void normalize_row(const float* x, std::int64_t H, const float* weight, float eps, float* out) {
  const float variance = dot8(x, x, H) / static_cast<float>(H);
  const float r = 1.0f / std::sqrt(variance + eps);
  for (std::int64_t h = 0; h < H; ++h) out[h] = weight[h] * (x[h] * r);
}

void check_dims(std::int64_t T, std::int64_t H) {
  if (T < 0 || H < 1) throw std::invalid_argument("x: needs at least one column");
}

// Attention jobs with fewer multiply-adds than this (about 100 us on one core) leave sleeping
// pool workers asleep: a woken worker would arrive after the job is done. Workers still spinning
// from the step's last matmul join regardless.
constexpr double kWakeWork = 1 << 18;

[[noreturn]] void out_of_range(const std::string& where, std::int64_t value, std::int64_t limit,
                               const char* what) {
  throw std::invalid_argument(where + " is " + std::to_string(value) + ", outside [0, " +
                              std::to_string(limit) + ") " + what);
}

void check_index(const char* name, std::int64_t i, std::int64_t value, std::int64_t limit,
                 const char* what) {
  if (value < 0 || value >= limit) {
    out_of_range(std::string(name) + ": entry " + std::to_string(i), value, limit, what);
  }
}

// The cache slots of a sequence's first `ctx` positions, read off its block table row.
void expand_slots(const std::int32_t* table, std::int64_t block_size, std::int64_t ctx,
                  std::vector<std::int64_t>& slots) {
  slots.resize(static_cast<std::size_t>(ctx));
  for (std::int64_t j = 0; j < ctx; j += block_size) {
    const std::int64_t base = static_cast<std::int64_t>(table[j / block_size]) * block_size;
    const std::int64_t end = std::min(ctx, j + block_size);
    for (std::int64_t p = j; p < end; ++p) slots[p] = base + (p - j);
  }
}

// One (sequence, head): every query of the sequence, its keys and values from kv head `g`.
// Query rows [start, start + len), context positions at slots[0..ctx). Built three times, for
// AVX-512, AVX2 and baseline x86-64, and picked when the module loads (GCC's target_clones):
// the lane vectors above are then one register wide, and the bits are the same in each.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void attend(const Heads& q, const float* k_cache, const float* v_cache, std::int64_t kv_heads,
            std::int64_t start, std::int64_t len, std::int64_t ctx, const std::int64_t* slots,
            std::int64_t h, float scale, float* out, std::vector<float>& scores) {
  const std::int64_t D = q.head_dim;
  const std::int64_t g = h / (q.heads / kv_heads);
  const std::int64_t out_stride = q.heads * D;
  scores.resize(static_cast<std::size_t>(ctx));
  for (std::int64_t i = 0; i < len; ++i) {
    const float* qi = q.data + (start + i) * q.row_stride + h * D;
    const std::int64_t n = ctx - len + i + 1;
    float m = -INFINITY;
    constexpr int kKeys = 4;
    std::int64_t j = 0;
    for (; j + kKeys <= n; j += kKeys) {
      const float* keys[kKeys];
      for (int r = 0; r < kKeys; ++r) keys[r] = k_cache + (slots[j + r] * kv_heads + g) * D;
      dot8_rows<kKeys>(qi, keys, D, &scores[j]);
    }
    for (; j < n; ++j) scores[j] = dot8(qi, k_cache + (slots[j] * kv_heads + g) * D, D);
    for (j = 0; j < n; ++j) {
      scores[j] *= scale;
      m = std::max(m, scores[j]);
    }
    // The exps in a loop of their own, which vectorizes (std::exp is a libm call per score,
    // ~10 ns: about a third of a decode step's attention at a few hundred tokens); the sum
    // stays one running total in key order.
    for (std::int64_t j = 0; j < n; ++j) scores[j] = exp_nonpositive(scores[j] - m);
    float l = 0.0f;
    for (std::int64_t j = 0; j < n; ++j) l += scores[j];
    weighted_values(scores.data(), n, v_cache + g * D, slots, kv_heads * D, D, l,
                    out + (start + i) * out_stride + h * D);
  }
}

}  // namespace

void rms_norm(const float* x, std::int64_t T, std::int64_t H, const float* weight, float eps,
              float* out) {
  check_dims(T, H);
  for (std::int64_t t = 0; t < T; ++t) normalize_row(x + t * H, H, weight, eps, out + t * H);
}

void add_rms_norm(const float* x, float* residual, std::int64_t T, std::int64_t H,
                  const float* weight, float eps, float* out) {
  check_dims(T, H);
  for (std::int64_t t = 0; t < T; ++t) {
    float* r = residual + t * H;
    const float* xt = x + t * H;
    for (std::int64_t h = 0; h < H; ++h) r[h] += xt[h];
    normalize_row(r, H, weight, eps, out + t * H);
  }
}

void rope_and_cache(Heads q, Heads k, Heads v, const float* cos, const float* sin,
                    std::int64_t P, const std::int64_t* positions, const std::int64_t* slots,
                    float* k_cache, float* v_cache, std::int64_t num_slots) {
  const std::int64_t T = q.rows, D = q.head_dim, half = D / 2;
  if (D % 2 != 0) throw std::invalid_argument("q: head_dim must be even, got " + std::to_string(D));
  for (std::int64_t t = 0; t < T; ++t) {
    check_index("positions", t, positions[t], P, "(rows of cos and sin)");
    check_index("slots", t, slots[t], num_slots, "(slots of k_cache)");
  }
  auto rotate = [&](const Heads& x, std::int64_t t) {
    const float* c = cos + positions[t] * half;
    const float* s = sin + positions[t] * half;
    for (std::int64_t h = 0; h < x.heads; ++h) {
      float* x1 = x.data + t * x.row_stride + h * D;
      float* x2 = x1 + half;
      for (std::int64_t d = 0; d < half; ++d) {
        const float a = x1[d], b = x2[d];
        x1[d] = a * c[d] - b * s[d];
        x2[d] = b * c[d] + a * s[d];
      }
    }
  };
  const std::int64_t kv_row = k.heads * D;
  for (std::int64_t t = 0; t < T; ++t) {
    rotate(q, t);
    rotate(k, t);
    std::copy_n(k.data + t * k.row_stride, kv_row, k_cache + slots[t] * kv_row);
    std::copy_n(v.data + t * v.row_stride, kv_row, v_cache + slots[t] * kv_row);
  }
}

void paged_attention(Heads q, const float* k_cache, const float* v_cache,
                     std::int64_t num_slots, std::int64_t kv_heads, const PagedBatch& batch,
                     float scale, float* out) {
  if (kv_heads < 1 || q.heads % kv_heads != 0) {
    throw std::invalid_argument("k_cache: " + std::to_string(kv_heads) +
                                " kv heads do not divide q's " + std::to_string(q.heads) +
                                " heads");
  }
  const std::int64_t S = batch.S, W = batch.W, bs = batch.block_size;
  if (bs < 1) throw std::invalid_argument("block_size: must be >= 1, got " + std::to_string(bs));
  const std::int32_t* qs = batch.query_start;
  if (qs[0] < 0) {
    throw std::invalid_argument("query_start: entry 0 is " + std::to_string(qs[0]) +
                                ", a row before q's first");
  }
  // Every sequence's rows, length and blocks, checked before any work.
  const std::int64_t cache_blocks = num_slots / bs;
  double work = 0;
  for (std::int64_t s = 0; s < S; ++s) {
    const std::int64_t len = std::int64_t{qs[s + 1]} - qs[s], ctx = batch.seq_lens[s];
    if (len < 0) {
      throw std::invalid_argument("query_start: entry " + std::to_string(s + 1) + " is " +
                                  std::to_string(qs[s + 1]) + ", less than entry " +
                                  std::to_string(s) + " (" + std::to_string(qs[s]) + ")");
    }
    if (qs[s + 1] > q.rows) {
      throw std::invalid_argument("query_start: entry " + std::to_string(s + 1) + " is " +
                                  std::to_string(qs[s + 1]) + ", past q's " +
                                  std::to_string(q.rows) + " rows");
    }
    if (ctx < len || ctx > W * bs) {
      throw std::invalid_argument("seq_lens: entry " + std::to_string(s) + " is " +
                                  std::to_string(ctx) + ", outside [query_len " +
                                  std::to_string(len) + ", " + std::to_string(W * bs) +
                                  " = block_tables' columns * block_size]");
    }
    const std::int32_t* row = batch.block_tables + s * W;
    for (std::int64_t b = 0; len > 0 && b * bs < ctx; ++b) {
      if (row[b] < 0 || row[b] >= cache_blocks) {
        out_of_range("block_tables: row " + std::to_string(s) + ", entry " + std::to_string(b),
                     row[b], cache_blocks, "(blocks of k_cache)");
      }
    }
    work += static_cast<double>(len) * ctx * q.heads * q.head_dim;
  }
  if (S == 0) return;

  const std::int64_t heads = q.heads;
  ThreadPool::instance().run(static_cast<int>(S * heads), [&](int chunk) {
    thread_local std::vector<float> scores;
    thread_local std::vector<std::int64_t> slots;
    const std::int64_t s = chunk / heads, h = chunk % heads;
    const std::int64_t start = qs[s], len = qs[s + 1] - start, ctx = batch.seq_lens[s];
    if (len == 0) return;
    expand_slots(batch.block_tables + s * W, bs, ctx, slots);
    attend(q, k_cache, v_cache, kv_heads, start, len, ctx, slots.data(), h, scale, out, scores);
  }, work >= kWakeWork);
}

}  // namespace lockstep::cpu
