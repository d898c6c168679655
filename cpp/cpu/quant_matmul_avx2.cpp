// AVX2 + FMA + F16C kernels, built with -mavx2 -mfma -mf16c and called only after
// cpu_features() has found all three. They evaluate the reduction order of quant_matmul.cpp
// exactly: an output's 32 lanes live in four ymm accumulators (acc[j] = lanes 8j..8j+7), a
// decoded block is four ymm vectors laid out the same way, and blocks are added in k order.
//
// Two shapes of loop:
//   M <= 2 (decode) decode_dot: a weight row is decoded in registers, used at once for each
//                   x row, and prefetched ahead in software. Decoding bounds it: Q4_1 takes
//                   ~23 vector uops a block, about 6 cycles, so ~12 GB/s of weights a core.
//   M > 2 (prefill) four weight rows at a time are decoded into an L1 buffer (once per tile
//                   of x rows), then dotted with the x rows in 3 x 4 register tiles
//                   (dot_tile), which runs near the AVX2 FMA peak.
#include "quant_kernels.h"

#if LOCKSTEP_CPU_X86

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "quant_matmul_avx2.cpp must be built with -mavx2 -mfma -mf16c (see CMakeLists.txt)"
#endif

#include <immintrin.h>

#include <algorithm>

namespace lockstep::cpu::avx2 {

namespace {

// One block of 32 weights as four lane vectors.
using Block = __m256[4];

// Formats: F::decode(block bytes) -> its 32 weights. kTail says K can end mid-block (F32,
// F16); decode_tail(bytes, count) then reads only `count` weights and zero-fills the rest.

struct F32 {
  static constexpr std::int64_t kBytes = 128;
  static constexpr bool kTail = true;
  static void decode(const std::uint8_t* b, Block w) {
    for (int j = 0; j < 4; ++j) w[j] = _mm256_loadu_ps(reinterpret_cast<const float*>(b) + 8 * j);
  }
  static void decode_tail(const std::uint8_t* b, std::int64_t count, Block w) {
    alignas(32) float buf[32] = {};
    std::memcpy(buf, b, static_cast<std::size_t>(count) * 4);
    decode(reinterpret_cast<const std::uint8_t*>(buf), w);
  }
};

struct F16 {
  static constexpr std::int64_t kBytes = 64;
  static constexpr bool kTail = true;
  static void decode(const std::uint8_t* b, Block w) {
    for (int j = 0; j < 4; ++j) {
      w[j] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * j)));
    }
  }
  static void decode_tail(const std::uint8_t* b, std::int64_t count, Block w) {
    alignas(32) std::uint8_t buf[64] = {};
    std::memcpy(buf, b, static_cast<std::size_t>(count) * 2);
    decode(buf, w);
  }
};

inline __m256 broadcast_fp16(const std::uint8_t* p) {
  return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(load_u16(p))));
}

inline __m256i load8_u8_as_i32(const std::uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// 16 bytes of nibbles -> weights fmaf(d, q, bias), in block order: low nibbles of bytes 0..15
// are weights 0..15, high nibbles weights 16..31.
inline void decode_nibbles(const std::uint8_t* q, __m256 d, __m256 bias, Block w) {
  const __m256i bytes_lo = load8_u8_as_i32(q);      // bytes 0..7, one per 32-bit lane
  const __m256i bytes_hi = load8_u8_as_i32(q + 8);  // bytes 8..15
  const __m256i low4 = _mm256_set1_epi32(0x0f);
  w[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(bytes_lo, low4)), bias);
  w[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(bytes_hi, low4)), bias);
  w[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes_lo, 4)), bias);
  w[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes_hi, 4)), bias);
}

struct Q8_0 {
  static constexpr std::int64_t kBytes = 34;
  static constexpr bool kTail = false;
  static void decode(const std::uint8_t* b, Block w) {
    const __m256 d = broadcast_fp16(b);
    for (int j = 0; j < 4; ++j) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * j));
      w[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
  }
};

struct Q4_0 {
  static constexpr std::int64_t kBytes = 18;
  static constexpr bool kTail = false;
  static void decode(const std::uint8_t* b, Block w) {
    const __m256 d = broadcast_fp16(b);
    decode_nibbles(b + 2, d, _mm256_mul_ps(d, _mm256_set1_ps(-8.0f)), w);
  }
};

struct Q4_1 {
  static constexpr std::int64_t kBytes = 20;
  static constexpr bool kTail = false;
  static void decode(const std::uint8_t* b, Block w) {
    // d and m are adjacent: one 4-byte load converts both.
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(load_u32(b))));
    decode_nibbles(b + 4, _mm256_broadcastss_ps(dm), _mm256_broadcastss_ps(_mm_movehdup_ps(dm)), w);
  }
};

// The fixed tree: (v0 + v1) + (v2 + v3), then lanes i + i+4, i + i+2, i + i+1.
inline float reduce(const Block acc) {
  const __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  const __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 u = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
}

// Software prefetch distance, in bytes ahead of the weight row being read (1-4 KiB measured
// alike). A thread reads its rows as one linear stream, which the hardware prefetcher of the
// EPYC this was tuned on followed too late once rows passed ~700 bytes (K >= 1152 for
// Q4_1): 6 GB/s a core instead of 12.
constexpr std::int64_t kPrefetchBytes = 2048;

inline void prefetch_ahead(const std::uint8_t* p) {
  // Past the last row this points outside w: harmless, as a prefetch never faults.
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p) + kPrefetchBytes),
               _MM_HINT_T0);
}

// One weight row dotted with MR (1 or 2) x rows, ldx apart, into out[0], out[ldo]: the
// kernel for M <= 2, decode above all. The row is decoded in registers and used at once.
// For M = 1 its four accumulator chains, and the next row's, which out-of-order execution
// overlaps with them, hide the FMA latency, since decoding a block takes longer than four
// dependent FMAs (measured: two weight rows interleaved were no faster, and their two
// streams defeated the prefetch).
template <class F, int MR>
inline void decode_dot(const float* x, std::int64_t ldx, const std::uint8_t* row, std::int64_t K,
                       float* out, std::int64_t ldo) {
  Block acc[MR];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  }
  const std::int64_t blocks = K / kLanes;
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::uint8_t* block = row + b * F::kBytes;
    prefetch_ahead(block);
    Block w;
    F::decode(block, w);
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < 4; ++j) {
        acc[r][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + b * kLanes + 8 * j), w[j], acc[r][j]);
      }
    }
  }
  if constexpr (F::kTail) {
    if (const std::int64_t tail = K - blocks * kLanes; tail > 0) {
      Block w;
      F::decode_tail(row + blocks * F::kBytes, tail, w);
      for (int r = 0; r < MR; ++r) {
        for (int j = 0; j < 4; ++j) {  // x is zero-padded by the caller
          const __m256 xv = _mm256_loadu_ps(x + r * ldx + blocks * kLanes + 8 * j);
          acc[r][j] = _mm256_fmadd_ps(xv, w[j], acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) out[r * ldo] = reduce(acc[r]);
}

// One weight row decoded into kpad floats (zero past K).
template <class F>
void decode_row(const std::uint8_t* row, std::int64_t K, float* w) {
  const std::int64_t blocks = K / kLanes;
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::uint8_t* block = row + b * F::kBytes;
    prefetch_ahead(block);
    Block v;
    F::decode(block, v);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(w + b * kLanes + 8 * j, v[j]);
  }
  if constexpr (F::kTail) {
    if (const std::int64_t tail = K - blocks * kLanes; tail > 0) {
      Block v;
      F::decode_tail(row + blocks * F::kBytes, tail, v);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(w + blocks * kLanes + 8 * j, v[j]);
    }
  }
}

// out[r * ldo + c] = x row r (rows ldx apart) dotted with decoded weight row c (rows kpad
// apart), for an MR x NR tile. The lanes are independent, so the kernel runs all of k for
// lane vector j before moving to j + 1: each lane still adds its k in increasing order, and
// only MR * NR accumulators are live at once, so an x load feeds NR FMAs and a weight load
// MR of them.
template <int MR, int NR>
inline void dot_tile(const float* x, std::int64_t ldx, const float* w, std::int64_t kpad,
                     float* out, std::int64_t ldo) {
  Block lanes[MR][NR];
  for (int j = 0; j < 4; ++j) {
    __m256 acc[MR][NR];
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm256_setzero_ps();
    }
    for (std::int64_t k = 8 * j; k < kpad; k += kLanes) {
      __m256 xv[MR];
      for (int r = 0; r < MR; ++r) xv[r] = _mm256_loadu_ps(x + r * ldx + k);
      for (int c = 0; c < NR; ++c) {
        const __m256 wv = _mm256_loadu_ps(w + c * kpad + k);
        for (int r = 0; r < MR; ++r) acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < NR; ++c) lanes[r][c][j] = acc[r][c];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) out[r * ldo + c] = reduce(lanes[r][c]);
  }
}

// Tile shape of the M > 1 kernel: 3 x rows by 4 weight rows, 12 accumulators.
constexpr int kTileM = 3;
constexpr int kTileN = 4;

template <int MR>
inline void dot_tile_n(int nr, const float* x, std::int64_t ldx, const float* w,
                       std::int64_t kpad, float* out, std::int64_t ldo) {
  switch (nr) {
    case 4: return dot_tile<MR, 4>(x, ldx, w, kpad, out, ldo);
    case 3: return dot_tile<MR, 3>(x, ldx, w, kpad, out, ldo);
    case 2: return dot_tile<MR, 2>(x, ldx, w, kpad, out, ldo);
    default: return dot_tile<MR, 1>(x, ldx, w, kpad, out, ldo);
  }
}

template <class F, int MR>
void gemv(const Problem& p, std::int64_t n_begin, std::int64_t n_end) {
  for (std::int64_t n = n_begin; n < n_end; ++n) {
    decode_dot<F, MR>(p.x, p.ldx, p.w + n * p.row_bytes, p.K, p.out + n, p.N);
  }
}

template <class F>
void gemm(const Problem& p, std::int64_t n_begin, std::int64_t n_end) {
  float* w = thread_scratch(static_cast<std::size_t>(kTileN * p.kpad));
  const std::int64_t tile = m_tile_rows(p.kpad);
  for (std::int64_t m0 = 0; m0 < p.M; m0 += tile) {
    const std::int64_t m1 = std::min(p.M, m0 + tile);
    for (std::int64_t n = n_begin; n < n_end; n += kTileN) {
      const int nr = static_cast<int>(std::min<std::int64_t>(kTileN, n_end - n));
      for (int c = 0; c < nr; ++c) {
        decode_row<F>(p.w + (n + c) * p.row_bytes, p.K, w + c * p.kpad);
      }
      for (std::int64_t m = m0; m < m1; m += kTileM) {
        const float* x = p.x + m * p.ldx;
        float* out = p.out + m * p.N + n;
        switch (std::min<std::int64_t>(kTileM, m1 - m)) {
          case 3: dot_tile_n<3>(nr, x, p.ldx, w, p.kpad, out, p.N); break;
          case 2: dot_tile_n<2>(nr, x, p.ldx, w, p.kpad, out, p.N); break;
          default: dot_tile_n<1>(nr, x, p.ldx, w, p.kpad, out, p.N); break;
        }
      }
    }
  }
}

template <class F>
void run(const Problem& p, std::int64_t n_begin, std::int64_t n_end) {
  // For one or two rows decoding dominates, and a block is best used straight from
  // registers (M = 2: 1.6x faster than through the buffer); from three rows on, decoding once
  // into the buffer for the register tiles is as fast or faster (measured on the default
  // model's shapes).
  switch (p.M) {
    case 1: return gemv<F, 1>(p, n_begin, n_end);
    case 2: return gemv<F, 2>(p, n_begin, n_end);
    default: return gemm<F>(p, n_begin, n_end);
  }
}

}  // namespace

void matmul_rows(const Problem& p, std::int64_t n_begin, std::int64_t n_end) {
  switch (p.qtype) {
    case QType::F32: return run<F32>(p, n_begin, n_end);
    case QType::F16: return run<F16>(p, n_begin, n_end);
    case QType::Q8_0: return run<Q8_0>(p, n_begin, n_end);
    case QType::Q4_0: return run<Q4_0>(p, n_begin, n_end);
    case QType::Q4_1: return run<Q4_1>(p, n_begin, n_end);
  }
}

}  // namespace lockstep::cpu::avx2

#endif  // LOCKSTEP_CPU_X86
