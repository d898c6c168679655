// AVX-512 (F, BW, VL) + FMA + F16C kernels, built with -mavx512f -mavx512bw -mavx512vl -mfma
// -mf16c and called only after cpu_features() has found all of them (and AVX2, which
// avx512_usable() requires as well). They evaluate the reduction order of quant_matmul.cpp
// exactly: an output's 32 lanes live in two zmm accumulators (acc[0] = lanes 0..15 = v0|v1,
// acc[1] = lanes 16..31 = v2|v3), a decoded block is two zmm vectors laid out the same way,
// blocks are added in k order, and the final tree is (v0 + v1) + (v2 + v3), then 8 -> 1 as
// in the AVX2 file.
//
// M <= 2 (decode) is instruction-bound under AVX2 (Q4_1 ~23 vector uops a block). Here a
// nibble block costs one table of the 16 possible weights, fmaf(d, q, bias) for q = 0..15
// (the same single rounding the format defines), and two vpermps that look each nibble up in
// it: vpermps reads only the low 4 bits of each index, so the low nibbles need no mask.
// M > 2 is FMA-bound: the AVX2 kernel ran at ~57% of a core's 256-bit FMA peak, and on a CPU
// with full-width AVX-512 units (Zen 5: 372 against 188 GFLOP/s a core, measured) the same
// register tiles in zmm do twice the work per instruction, with the same bits.
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

// Columns of k a tile runs for one half of the lanes before the other, at most: each half
// reads only every other 64-byte line, so the tile's x and weight rows over a chunk (10 rows
// x 3 KiB) must stay in the 48 KiB L1 for the second half. Unchunked, K = 1536 (the MLP down
// projection) ran from L2 at 0.8x the AVX2 kernel's speed; a row is cut into equal chunks,
// since a short last chunk pays the accumulators' reload for little work.
constexpr std::int64_t kMostChunk = 768;

inline std::int64_t chunk_of(std::int64_t kpad) {
  const std::int64_t chunks = (kpad + kMostChunk - 1) / kMostChunk;
  return (kpad / chunks + kLanes - 1) / kLanes * kLanes;
}

// Not std::min: a std:: template instantiated here, with -mavx512f, could become the copy the
// linker keeps for the whole module (see quant_kernels.h on thread_scratch).
inline std::int64_t smaller(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

// One weight row decoded into kpad floats (zero past K), for the M > 2 tiles.
template <class F>
void decode_row(const std::uint8_t* row, std::int64_t K, float* w) {
  const std::int64_t blocks = K / kLanes;
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::uint8_t* block = row + b * F::kBytes;
    prefetch_ahead(block);
    Block v;
    F::decode(block, v);
    _mm512_storeu_ps(w + b * kLanes, v[0]);
    _mm512_storeu_ps(w + b * kLanes + 16, v[1]);
  }
  if constexpr (F::kTail) {
    if (const std::int64_t tail = K - blocks * kLanes; tail > 0) {
      Block v;
      F::decode_tail(row + blocks * F::kBytes, tail, v);
      _mm512_storeu_ps(w + blocks * kLanes, v[0]);
      _mm512_storeu_ps(w + blocks * kLanes + 16, v[1]);
    }
  }
}

// out[r * ldo + c] = x row r (rows ldx apart) dotted with decoded weight row c (rows kpad
// apart), for an MR x NR tile. As in the AVX2 file, all of k runs for one half of the lanes
// (j = 0: lanes 0..15, j = 1: lanes 16..31) before the other: each lane still adds its k in
// increasing order, and only MR * NR accumulators are live, so an x load feeds NR FMAs and a
// weight load MR of them. With 32 zmm registers a 6 x 4 tile keeps 24 accumulators, 6 x
// vectors and a weight vector in registers (measured against 4 x 4 on the default model's
// shapes at M = 100: the Q8_0 head 31 against 42 ms, gate_up 1.9 against 2.0 ms).
// The k loop of one half of the lanes (j) over columns [k_begin, k_end), into acc.
template <int MR, int NR>
inline void dot_half(const float* x, std::int64_t ldx, const float* w, std::int64_t kpad, int j,
                     std::int64_t k_begin, std::int64_t k_end, __m512 (&acc)[MR][NR]) {
  for (std::int64_t k = k_begin + 16 * j; k < k_end; k += kLanes) {
    __m512 xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm512_loadu_ps(x + r * ldx + k);
    for (int c = 0; c < NR; ++c) {
      const __m512 wv = _mm512_loadu_ps(w + c * kpad + k);
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
}

template <int MR, int NR>
inline void dot_tile(const float* x, std::int64_t ldx, const float* w, std::int64_t kpad,
                     float* out, std::int64_t ldo) {
  Block lanes[MR][NR];
  const std::int64_t chunk = chunk_of(kpad);
  for (std::int64_t k0 = 0; k0 < kpad; k0 += chunk) {
    const std::int64_t k1 = smaller(kpad, k0 + chunk);
    for (int j = 0; j < 2; ++j) {
      __m512 acc[MR][NR];
      for (int r = 0; r < MR; ++r) {
        for (int c = 0; c < NR; ++c) acc[r][c] = k0 == 0 ? _mm512_setzero_ps() : lanes[r][c][j];
      }
      if (chunk == kpad) {
        dot_half<MR, NR>(x, ldx, w, kpad, j, 0, kpad, acc);  // one chunk, kept apart: its loop
      } else {                                              // measured ~10% faster so
        dot_half<MR, NR>(x, ldx, w, kpad, j, k0, k1, acc);
      }
      for (int r = 0; r < MR; ++r) {
        for (int c = 0; c < NR; ++c) lanes[r][c][j] = acc[r][c];
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) out[r * ldo + c] = reduce(lanes[r][c]);
  }
}

constexpr int kTileM = 6;
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

// M > 2: kTileN weight rows decoded once into this thread's scratch, then reused by every x
// row of an M tile (m_tile_rows keeps that tile in L2) through the register tiles above.
template <class F>
void gemm(const Problem& p, std::int64_t n_begin, std::int64_t n_end) {
  float* w = thread_scratch(static_cast<std::size_t>(kTileN * p.kpad));
  const std::int64_t tile = m_tile_rows(p.kpad);
  for (std::int64_t m0 = 0; m0 < p.M; m0 += tile) {
    const std::int64_t m1 = smaller(p.M, m0 + tile);
    for (std::int64_t n = n_begin; n < n_end; n += kTileN) {
      const int nr = static_cast<int>(smaller(kTileN, n_end - n));
      for (int c = 0; c < nr; ++c) {
        decode_row<F>(p.w + (n + c) * p.row_bytes, p.K, w + c * p.kpad);
      }
      for (std::int64_t m = m0; m < m1; m += kTileM) {
        const float* x = p.x + m * p.ldx;
        float* out = p.out + m * p.N + n;
        switch (smaller(kTileM, m1 - m)) {
          case 6: dot_tile_n<6>(nr, x, p.ldx, w, p.kpad, out, p.N); break;
          case 5: dot_tile_n<5>(nr, x, p.ldx, w, p.kpad, out, p.N); break;
          case 4: dot_tile_n<4>(nr, x, p.ldx, w, p.kpad, out, p.N); break;
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

}  // namespace lockstep::cpu::avx512

#endif  // LOCKSTEP_CPU_X86
