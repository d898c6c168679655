// What the matmul kernels of each instruction set share: the validated problem they are
// handed, the tiling helper and the GGUF field readers. Internal to cpp/cpu.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "quant_matmul.h"

#if defined(__x86_64__) || defined(__i386__)
#define LOCKSTEP_CPU_X86 1
#else
#define LOCKSTEP_CPU_X86 0
#endif

namespace lockstep::cpu {

// Lanes of the fixed reduction (see quant_matmul.cpp); also the weights in a Q block.
constexpr std::int64_t kLanes = 32;

// One matmul, validated. x is padded: columns K..kpad-1 of each row are zero, so kernels
// read whole 32-lane blocks; weight rows are not padded (a kernel zero-fills the tail of the
// last F32/F16 block itself).
struct Problem {
  const float* x;  // [M, ldx], ldx >= kpad
  std::int64_t ldx;
  std::int64_t M;
  std::int64_t K;
  std::int64_t kpad;  // K rounded up to a multiple of kLanes
  const std::uint8_t* w;  // [N, row_bytes]
  std::int64_t row_bytes;
  std::int64_t N;
  QType qtype;
  float* out;  // [M, N]
};

// Rows of x that one decoded weight row is reused for before the next is decoded: as many as
// keep the x tile within about half of a 2 MiB L2. Changes speed only, never results.
std::int64_t m_tile_rows(std::int64_t kpad);

// This thread's scratch of at least `floats` floats, reused across calls. It lives here, in a
// file built with baseline flags, so that no std:: template is instantiated inside the
// ISA-specific files: the linker keeps one copy of such an inline function for the whole
// module, and a copy compiled with -mavx2 would then run on CPUs without AVX2.
float* thread_scratch(std::size_t floats);

// Each writes out[:, n_begin:n_end].
namespace scalar {
void matmul_rows(const Problem& p, std::int64_t n_begin, std::int64_t n_end);
// Decodes weight row `row` of p.w into p.kpad floats at w (zero past p.K).
void decode_weight_row(const Problem& p, std::int64_t row, float* w);
}
#if LOCKSTEP_CPU_X86
namespace avx2 {
void matmul_rows(const Problem& p, std::int64_t n_begin, std::int64_t n_end);
}
namespace avx512 {
void matmul_rows(const Problem& p, std::int64_t n_begin, std::int64_t n_end);
}
#endif

// GGUF is little-endian, and so is every host this builds for.
inline std::uint16_t load_u16(const std::uint8_t* p) {
  std::uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline std::uint32_t load_u32(const std::uint8_t* p) {
  std::uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// IEEE fp16 -> fp32, exact (every fp16 value, subnormals included, is an fp32 value). A
// signalling NaN comes back quiet, as F16C's conversion returns it.
inline float fp16_to_fp32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x00400000u : 0u);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else {
    // Zero or subnormal: mantissa * 2^-24, exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    std::memcpy(&bits, &magnitude, sizeof bits);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace lockstep::cpu
