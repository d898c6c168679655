// AVX-512 (F, BW, VL) + FMA + F16C kernels, built with -mavx512f -mavx512bw -mavx512vl -mfma
// -mf16c and called only after cpu_features() has found all of them (and AVX2, whose kernels
// this file hands the M > 2 loops to). They evaluate the reduction order of quant_matmul.cpp
// exactly: an output's 32 lanes live in two zmm accumulators (acc[0] = lanes 0..15 = v0|v1,
// acc[1] = lanes 16..31 = v2|v3), a decoded block is two zmm vectors laid out the same way,
// blocks are added in k order, and the final tree is (v0 + v1) + (v2 + v3), then 8 -> 1 as
// in the AVX2 file.
//
// Only M <= 2 (decode) has its own loop here; it is instruction-bound under AVX2 (Q4_1 ~23
// vector uops a block). Here a nibble block costs one table of the 16 possible weights,
// fmaf(d, q, bias) for q = 0..15 (the same single rounding the format defines), and two
// vpermps that look each nibble up in it: vpermps reads only the low 4 bits of each index,
// so the low nibbles need no mask. M > 2 runs the AVX2 kernels, which are near the FMA peak
// already and give the same bits.
#include "quant_kernels.h"

#if LOCKSTEP_CPU_X86

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__FMA__) || !defined(__F16C__)
#error "quant_matmul_avx512.cpp must be built with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c (see CMakeLists.txt)"
#endif

#include <immintrin.h>

namespace lockstep::cpu::avx512 {

namespace {

// One block of 32 weights as two lane vectors: lanes 0..15 and 16..31.
using Block = __m512[2];

// Own copies of quant_kernels.h's load_u16/load_u32, in this file's anonymous namespace on
// purpose: an inline function shared through the header and compiled here with -mavx512f could
// be the copy the linker keeps for the whole module, and then run on a CPU without AVX-512.
inline std::uint16_t u16_at(const std::uint8_t* p) {
  std::uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline std::uint32_t u32_at(const std::uint8_t* p) {
  std::uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

struct F32 {
  static constexpr std::int64_t kBytes = 128;
  static constexpr bool kTail = true;
  static void decode(const std::uint8_t* b, Block w) {
    w[0] = _mm512_loadu_ps(b);
    w[1] = _mm512_loadu_ps(b + 64);
  }
  static void decode_tail(const std::uint8_t* b, std::int64_t count, Block w) {
    alignas(64) float buf[32] = {};
    std::memcpy(buf, b, static_cast<std::size_t>(count) * 4);
    decode(reinterpret_cast<const std::uint8_t*>(buf), w);
  }
};

struct F16 {
  static constexpr std::int64_t kBytes = 64;
  static constexpr bool kTail = true;
  static void decode(const std::uint8_t* b, Block w) {
    w[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    w[1] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
  }
  static void decode_tail(const std::uint8_t* b, std::int64_t count, Block w) {
    alignas(64) std::uint8_t buf[64] = {};
    std::memcpy(buf, b, static_cast<std::size_t>(count) * 2);
    decode(buf, w);
  }
};

// 0, 1, ..., 15 as floats: the nibble values.
inline __m512 nibble_values() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// 16 bytes of nibbles -> weights table[q], in block order: low nibbles of bytes 0..15 are
// weights 0..15, high nibbles weights 16..31. table[q] = fmaf(d, q, bias).
inline void decode_nibbles(const std::uint8_t* q, __m512 table, Block w) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  w[0] = _mm512_permutexvar_ps(bytes, table);  // index bits 3..0: the low nibble
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
}

struct Q8_0 {
  static constexpr std::int64_t kBytes = 34;
  static constexpr bool kTail = false;
  static void decode(const std::uint8_t* b, Block w) {
    const __m512 d = _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(u16_at(b))));
    for (int j = 0; j < 2; ++j) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * j));
      w[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
    }
  }
};

struct Q4_0 {
  static constexpr std::int64_t kBytes = 18;
  static constexpr bool kTail = false;
  static void decode(const std::uint8_t* b, Block w) {
    const __m512 d = _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(u16_at(b))));
    const __m512 table = _mm512_fmadd_ps(d, nibble_values(), _mm512_mul_ps(d, _mm512_set1_ps(-8.0f)));
    decode_nibbles(b + 2, table, w);
  }
};

struct Q4_1 {
  static constexpr std::int64_t kBytes = 20;
  static constexpr bool kTail = false;
  static void decode(const std::uint8_t* b, Block w) {
    // d and m are adjacent: one 4-byte load converts both.
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(u32_at(b))));
    const __m512 table = _mm512_fmadd_ps(_mm512_broadcastss_ps(dm), nibble_values(),
                                         _mm512_broadcastss_ps(_mm_movehdup_ps(dm)));
    decode_nibbles(b + 4, table, w);
  }
};

// The fixed tree: (v0 + v1) + (v2 + v3), then lanes i + i+4, i + i+2, i + i+1.
inline float reduce(const Block acc) {
  const __m256 v01 = _mm256_add_ps(_mm512_castps512_ps256(acc[0]),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[0]), 1)));
  const __m256 v23 = _mm256_add_ps(_mm512_castps512_ps256(acc[1]),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[1]), 1)));
  const __m256 s = _mm256_add_ps(v01, v23);
  const __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 u = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
}

// As in the AVX2 file (measured alike there).
constexpr std::int64_t kPrefetchBytes = 2048;

inline void prefetch_ahead(const std::uint8_t* p) {
  // Past the last row this points outside w: harmless, as a prefetch never faults.
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p) + kPrefetchBytes),
               _MM_HINT_T0);
}

// One weight row dotted with MR (1 or 2) x rows, ldx apart, into out[0], out[ldo]. For M = 1
// a block now costs about as long as one FMA's latency on each of its two chains, so this
// runs at ~17-18 GB/s for Q4_1 on the Zen 5 EPYC it was measured on (AVX2: ~11.5). Two
// weight rows interleaved (independent chains) were measured too: no faster for K = 576, and
// for K = 1536 and the Q8_0 head much slower, as with AVX2 (the two streams defeat the
// prefetch).
template <class F, int MR>
inline void decode_dot(const float* x, std::int64_t ldx, const std::uint8_t* row, std::int64_t K,
                       float* out, std::int64_t ldo) {
  Block acc[MR];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < 2; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  const std::int64_t blocks = K / kLanes;
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::uint8_t* block = row + b * F::kBytes;
    prefetch_ahead(block);
    Block w;
    F::decode(block, w);
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < 2; ++j) {
        acc[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + b * kLanes + 16 * j), w[j], acc[r][j]);
      }
    }
  }
  if constexpr (F::kTail) {
    if (const std::int64_t tail = K - blocks * kLanes; tail > 0) {
      Block w;
      F::decode_tail(row + blocks * F::kBytes, tail, w);
      for (int r = 0; r < MR; ++r) {
        for (int j = 0; j < 2; ++j) {  // x is zero-padded by the caller
          const __m512 xv = _mm512_loadu_ps(x + r * ldx + blocks * kLanes + 16 * j);
          acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) out[r * ldo] = reduce(acc[r]);
}

template <class F, int MR>
void gemv(const Problem& p, std::int64_t n_begin, std::int64_t n_end) {
  for (std::int64_t n = n_begin; n < n_end; ++n) {
    decode_dot<F, MR>(p.x, p.ldx, p.w + n * p.row_bytes, p.K, p.out + n, p.N);
  }
}

template <class F>
void run(const Problem& p, std::int64_t n_begin, std::int64_t n_end) {
  switch (p.M) {
    case 1: return gemv<F, 1>(p, n_begin, n_end);
    case 2: return gemv<F, 2>(p, n_begin, n_end);
    default: return avx2::matmul_rows(p, n_begin, n_end);
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

}  // namespace lockstep::cpu::avx512

#endif  // LOCKSTEP_CPU_X86
