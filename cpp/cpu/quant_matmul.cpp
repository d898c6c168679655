// Weight-only quantized matmul on the CPU: validation, the reduction order, dispatch to an
// instruction set, and the split over threads.
//
// The reduction order
// -------------------
// Every output element out[m, n] = sum_k x[m, k] * w[n, k] is computed by exactly this
// sequence of fp32 operations, whatever M, the thread count, the tiling or the instruction
// set. Nothing else is allowed to change its bits.
//
//   1. Each weight is decoded exactly as its format defines it, with at most one rounding:
//        F32   w = the stored value
//        F16   w = the stored value, converted exactly
//        Q8_0  w = d * q                  (exact: 11-bit d times an 8-bit q fits in fp32)
//        Q4_0  w = fmaf(d, q, d * -8)     (exact: equals d * (q - 8), but is +0 when q = 8)
//        Q4_1  w = fmaf(d, q, m)          (d * q is exact, so this is d * q + m, rounded once)
//   2. The K positions are dealt to 32 lanes, lane = k mod 32. Each lane starts at +0.0f and
//      accumulates acc = fmaf(x[k], w[k], acc) over its k in increasing order. If K is not a
//      multiple of 32 (F32/F16 only) the row is padded with zeros to the next multiple: the
//      padding adds fmaf(0, 0, acc) to the lanes it covers. (That is not quite "skip": it
//      turns a lane's -0.0 into +0.0, so both paths pad rather than skip.)
//   3. The 32 lanes, viewed as four vectors v0..v3 of 8 (v_j = lanes 8j..8j+7), are summed
//      in a fixed tree: s = (v0 + v1) + (v2 + v3) lane-wise; then t_i = s_i + s_{i+4}
//      (i < 4); u_i = t_i + t_{i+2} (i < 2); out = u_0 + u_1.
//
// The AVX2 kernels keep the four lane vectors of an output in four ymm accumulators and add
// blocks in k order; the AVX-512 kernels keep them in two zmm accumulators (v0|v1, v2|v3); the scalar kernels keep a float[32] and call std::fmaf. Both evaluate
// exactly the operations above, so they all agree bit for bit. This relies on no compiler
// contracting a * b + c into an fma the code does not spell out: every file here is built
// with -ffp-contract=off (CMakeLists.txt), and without -ffast-math.
//
// Why the result cannot depend on the batch or the threads: each output element is computed
// whole by one thread, from its own x row and weight row, in the order above. Threads claim
// contiguous chunks of n; the M tiling only decides how often a weight row is decoded (once
// per tile of x rows), and decoding is exact and deterministic.
#include "quant_matmul.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "quant_kernels.h"
#include "thread_pool.h"

namespace lockstep::cpu {

namespace {

struct Format {
  std::int64_t block_bytes;   // bytes per block
  std::int64_t block_values;  // weights per block
};

Format format_of(QType qtype) {
  switch (qtype) {
    case QType::F32: return {4, 1};
    case QType::F16: return {2, 1};
    case QType::Q8_0: return {34, 32};
    case QType::Q4_0: return {18, 32};
    case QType::Q4_1: return {20, 32};
  }
  throw std::logic_error("unknown QType");
}

// The N output columns are cut into contiguous chunks of whole steps of kRowsPerStep rows
// (so no two threads write one 64-byte line of a row of out), which the pool's threads claim
// as they come free. kChunksPerThread > 1 lets the caller take over the chunks of a worker
// that is slow to wake; a chunk gets at least kMinWorkPerChunk of weight bytes times rows
// of x, below which waking a worker costs about what it saves. Changes speed only, never
// results: each output element is computed whole by whichever thread owns its chunk.
constexpr std::int64_t kRowsPerStep = 16;
constexpr std::int64_t kChunksPerThread = 4;
constexpr std::int64_t kMinWorkPerChunk = 32 * 1024;

// Jobs with less work than this (about 90 us on one core at 12 GB/s) leave sleeping workers
// asleep: on a VM a woken worker takes longer than that to arrive, and waking it costs the
// caller ~8 us. Workers still spinning from a recent job help regardless.
constexpr std::int64_t kWakeWork = 1 << 20;

struct Split {
  int chunks;
  std::int64_t rows_per_chunk;
  bool wake;
};

Split split_rows(std::int64_t M, std::int64_t N, std::int64_t row_bytes, int threads) {
  const std::int64_t steps = (N + kRowsPerStep - 1) / kRowsPerStep;
  // In double: the product of three sizes can pass int64 for absurd shapes.
  const double work = static_cast<double>(N) * static_cast<double>(std::max<std::int64_t>(row_bytes, 1)) *
                      static_cast<double>(M);
  const double wanted = threads == 1 ? 1 : threads * kChunksPerThread;
  const auto chunks = static_cast<std::int64_t>(
      std::max(1.0, std::min({wanted, static_cast<double>(steps), work / kMinWorkPerChunk})));
  const std::int64_t rows = (steps + chunks - 1) / chunks * kRowsPerStep;
  return {static_cast<int>((N + rows - 1) / rows), rows, work >= kWakeWork};
}

bool x86_built() { return LOCKSTEP_CPU_X86 != 0; }

bool avx2_usable() {
  static const bool ok = [] {
    const CpuFeatures f = cpu_features();
    return x86_built() && f.avx2 && f.fma && f.f16c;
  }();
  return ok;
}

// AVX-512 is taken only along with AVX2, FMA and F16C (which the AVX-512 file is built with too).
bool avx512_usable() {
  static const bool ok = avx2_usable() && cpu_features().avx512;
  return ok;
}

}  // namespace

float* thread_scratch(std::size_t floats) {
  thread_local std::vector<float> scratch;
  if (scratch.size() < floats) scratch.resize(floats);
  return scratch.data();
}

std::int64_t m_tile_rows(std::int64_t kpad) {
  constexpr std::int64_t kTileBytes = 1 << 20;
  return std::max<std::int64_t>(1, kTileBytes / (std::max<std::int64_t>(kpad, kLanes) * 4));
}

QType parse_qtype(const std::string& name) {
  for (QType q : {QType::F32, QType::F16, QType::Q8_0, QType::Q4_0, QType::Q4_1}) {
    if (name == qtype_name(q)) return q;
  }
  throw std::invalid_argument("qtype: unknown weight type '" + name +
                              "'; expected one of F32, F16, Q8_0, Q4_0, Q4_1");
}

Isa parse_isa(const std::string& name) {
  for (Isa i : {Isa::Auto, Isa::Avx512, Isa::Avx2, Isa::Scalar}) {
    if (name == isa_name(i)) return i;
  }
  throw std::invalid_argument("isa: unknown instruction set '" + name +
                              "'; expected one of auto, avx512, avx2, scalar");
}

const char* qtype_name(QType qtype) {
  switch (qtype) {
    case QType::F32: return "F32";
    case QType::F16: return "F16";
    case QType::Q8_0: return "Q8_0";
    case QType::Q4_0: return "Q4_0";
    case QType::Q4_1: return "Q4_1";
  }
  return "?";
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Auto: return "auto";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Scalar: return "scalar";
  }
  return "?";
}

CpuFeatures cpu_features() {
  CpuFeatures f;
#if LOCKSTEP_CPU_X86 && (defined(__GNUC__) || defined(__clang__))
  // libgcc's checks include the OS side: AVX counts only if the OS saves ymm state.
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  // Like AVX, AVX-512 counts only if the OS saves the zmm and mask state; libgcc checks XCR0.
  f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
#endif
  return f;
}

Isa auto_isa() {
  static const Isa isa = avx512_usable() ? Isa::Avx512 : avx2_usable() ? Isa::Avx2 : Isa::Scalar;
  return isa;
}

std::int64_t row_elements(QType qtype, std::int64_t row_bytes) {
  const Format f = format_of(qtype);
  if (row_bytes % f.block_bytes != 0) {
    const std::string unit = f.block_values == 1 ? "element" : "block";
    throw std::invalid_argument(
        std::string("w: ") + qtype_name(qtype) + " rows must be a whole number of " +
        std::to_string(f.block_bytes) + "-byte " + unit + "s, got rows of " +
        std::to_string(row_bytes) + " bytes");
  }
  return row_bytes / f.block_bytes * f.block_values;
}

void dequantize_rows(const std::uint8_t* w, std::int64_t N, std::int64_t row_bytes, QType qtype,
                     const std::int64_t* ids, std::int64_t M, float* out) {
  const std::int64_t K = row_elements(qtype, row_bytes);
  for (std::int64_t m = 0; m < M; ++m) {
    if (ids[m] < 0 || ids[m] >= N) {
      throw std::invalid_argument("ids: id " + std::to_string(ids[m]) + " at index " +
                                  std::to_string(m) + " is outside the " + std::to_string(N) +
                                  " rows of w");
    }
  }
  const std::int64_t kpad = (K + kLanes - 1) / kLanes * kLanes;
  Problem p{};
  p.w = w;
  p.row_bytes = row_bytes;
  p.N = N;
  p.K = K;
  p.kpad = kpad;
  p.qtype = qtype;
  // A decoded row is kpad floats; out's rows are K apart, so a row with a ragged tail (F32/F16
  // only: Q rows are whole blocks) goes through scratch. A few rows a step: no threads.
  float* scratch = kpad == K ? nullptr : thread_scratch(static_cast<std::size_t>(kpad));
  for (std::int64_t m = 0; m < M; ++m) {
    float* dst = out + m * K;
    scalar::decode_weight_row(p, ids[m], scratch ? scratch : dst);
    if (scratch) std::memcpy(dst, scratch, static_cast<std::size_t>(K) * sizeof(float));
  }
}

void quant_matmul(const float* x, std::int64_t M, std::int64_t K, const std::uint8_t* w,
                  std::int64_t N, std::int64_t row_bytes, QType qtype, float* out, Isa isa) {
  if (M < 0 || K < 0 || N < 0 || row_bytes < 0) {
    throw std::invalid_argument("negative dimension");
  }
  const std::int64_t k_w = row_elements(qtype, row_bytes);
  if (k_w != K) {
    throw std::invalid_argument(
        "x: has K=" + std::to_string(K) + " columns, but w's " + qtype_name(qtype) +
        " rows of " + std::to_string(row_bytes) + " bytes hold " + std::to_string(k_w) +
        " weights");
  }
  if (isa == Isa::Auto) isa = auto_isa();
  if (isa == Isa::Avx2 && !avx2_usable()) {
    throw std::invalid_argument(
        x86_built() ? "isa: 'avx2' needs AVX2, FMA and F16C, and this CPU lacks at least one"
                    : "isa: 'avx2' is not built into this module (not an x86 build)");
  }
  if (isa == Isa::Avx512 && !avx512_usable()) {
    throw std::invalid_argument(
        x86_built() ? "isa: 'avx512' needs AVX-512 F, BW and VL, AVX2, FMA and F16C, and this CPU "
                      "lacks at least one"
                    : "isa: 'avx512' is not built into this module (not an x86 build)");
  }
  if (M == 0 || N == 0) return;

  Problem p{x, K, M, K, (K + kLanes - 1) / kLanes * kLanes, w, row_bytes, N, qtype, out};
  std::vector<float> padded;
  if (p.kpad != K) {
    // Only F32/F16 rows can end mid-block; give the kernels whole, zero-padded blocks of x.
    padded.assign(static_cast<std::size_t>(M * p.kpad), 0.0f);
    for (std::int64_t m = 0; m < M; ++m) {
      std::memcpy(padded.data() + m * p.kpad, x + m * K, static_cast<std::size_t>(K) * 4);
    }
    p.x = padded.data();
    p.ldx = p.kpad;
  }

  auto rows = &scalar::matmul_rows;
#if LOCKSTEP_CPU_X86
  if (isa == Isa::Avx2) rows = &avx2::matmul_rows;
  if (isa == Isa::Avx512) rows = &avx512::matmul_rows;
#endif
  ThreadPool& pool = ThreadPool::instance();
  const Split split = split_rows(M, N, row_bytes, pool.num_threads());
  pool.run(split.chunks, [&](int chunk) {
    const std::int64_t begin = chunk * split.rows_per_chunk;
    rows(p, begin, std::min(N, begin + split.rows_per_chunk));
  }, split.wake);
}

}  // namespace lockstep::cpu
