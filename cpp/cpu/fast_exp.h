// exp for the softmax-style uses of the CPU kernels (the sampler, attention), where every
// argument is x - max(x) <= 0. Internal to cpp/cpu.
//
// Files that use it in a loop build with -fno-trapping-math (CMakeLists.txt): the final select
// vectorizes only when the compiler may evaluate both of its sides. Include it only from
// files built with baseline flags: an inline function compiled with -mavx2 could become the
// copy the linker keeps for the whole module (see quant_kernels.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace lockstep::cpu {

// exp(x) for x <= 0 in plain arithmetic that the compiler vectorizes (std::exp is a libm call
// per element, ~12 ns: most of a sampled row's time at 49152 tokens). x = n ln2 + r with
// |r| <= ln2 / 2; exp(r) by its Taylor series to r^7, whose truncation (< 1e-8 relative) is
// below float rounding; then scaled by 2^n through the exponent bits. Below -87 (where
// exp leaves float's normal range) it gives 0, as does -inf. Within 2 ulp of std::exp.
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  // Round to nearest by the 1.5 * 2^23 trick: exact for |t| < 2^22, and no libm call.
  constexpr float kRound = 12582912.0f;
  const float n = (clamped * 1.44269504f + kRound) - kRound;
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 hi + lo
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float result = p * scale;  // computed either way, so the select below needs no branch
  return x < -87.0f ? 0.0f : result;
}

}  // namespace lockstep::cpu
