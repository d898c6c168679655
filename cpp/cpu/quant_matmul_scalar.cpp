// Portable kernels: the reduction order of quant_matmul.cpp written out one lane at a time.
// They run on any CPU and are the reference the AVX2 kernels must match bit for bit.
#include <cmath>
#include <cstring>
#include <vector>

#include "quant_kernels.h"

namespace lockstep::cpu::scalar {

namespace {

// Decodes one weight row into kpad floats, zero past K.
void decode_row(const Problem& p, const std::uint8_t* row, float* w) {
  const std::int64_t K = p.K;
  switch (p.qtype) {
    case QType::F32:
      std::memcpy(w, row, static_cast<std::size_t>(K) * 4);
      break;
    case QType::F16:
      for (std::int64_t k = 0; k < K; ++k) w[k] = fp16_to_fp32(load_u16(row + 2 * k));
      break;
    case QType::Q8_0:
      for (std::int64_t b = 0; b < K / kLanes; ++b, row += 34, w += kLanes) {
        const float d = fp16_to_fp32(load_u16(row));
        for (int i = 0; i < 32; ++i) {
          w[i] = d * static_cast<float>(static_cast<std::int8_t>(row[2 + i]));
        }
      }
      return;
    case QType::Q4_0:
      for (std::int64_t b = 0; b < K / kLanes; ++b, row += 18, w += kLanes) {
        const float d = fp16_to_fp32(load_u16(row));
        const float bias = d * -8.0f;
        for (int i = 0; i < 16; ++i) {
          w[i] = std::fmaf(d, static_cast<float>(row[2 + i] & 0x0f), bias);
          w[i + 16] = std::fmaf(d, static_cast<float>(row[2 + i] >> 4), bias);
        }
      }
      return;
    case QType::Q4_1:
      for (std::int64_t b = 0; b < K / kLanes; ++b, row += 20, w += kLanes) {
        const float d = fp16_to_fp32(load_u16(row));
        const float m = fp16_to_fp32(load_u16(row + 2));
        for (int i = 0; i < 16; ++i) {
          w[i] = std::fmaf(d, static_cast<float>(row[4 + i] & 0x0f), m);
          w[i + 16] = std::fmaf(d, static_cast<float>(row[4 + i] >> 4), m);
        }
      }
      return;
  }
  for (std::int64_t k = K; k < p.kpad; ++k) w[k] = 0.0f;  // F32/F16 tail
}

float dot_lanes(const float* x, const float* w, std::int64_t kpad) {
  float acc[kLanes] = {};
  for (std::int64_t k = 0; k < kpad; k += kLanes) {
    for (int i = 0; i < kLanes; ++i) acc[i] = std::fmaf(x[k + i], w[k + i], acc[i]);
  }
  float s[8];
  for (int i = 0; i < 8; ++i) s[i] = (acc[i] + acc[8 + i]) + (acc[16 + i] + acc[24 + i]);
  float t[4];
  for (int i = 0; i < 4; ++i) t[i] = s[i] + s[i + 4];
  const float u0 = t[0] + t[2];
  const float u1 = t[1] + t[3];
  return u0 + u1;
}

}  // namespace

void decode_weight_row(const Problem& p, std::int64_t row, float* w) {
  decode_row(p, p.w + row * p.row_bytes, w);
}

void matmul_rows(const Problem& p, std::int64_t n_begin, std::int64_t n_end) {
  thread_local std::vector<float> w;
  w.resize(static_cast<std::size_t>(p.kpad));
  for (std::int64_t n = n_begin; n < n_end; ++n) {
    decode_row(p, p.w + n * p.row_bytes, w.data());
    for (std::int64_t m = 0; m < p.M; ++m) {
      p.out[m * p.N + n] = dot_lanes(p.x + m * p.ldx, w.data(), p.kpad);
    }
  }
}

}  // namespace lockstep::cpu::scalar
