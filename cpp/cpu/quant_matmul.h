// Weight-only quantized matmul on the CPU: out[m, n] = sum_k x[m, k] * W[n, k], reading the
// GGUF blocks of W as they are stored (no dequantized copy), with fp32 activations.
//
// Every output element is reduced in one fixed order whatever M, the thread count, the
// tiling or the instruction set, so its bits never depend on what else is in the batch.
// quant_matmul.cpp writes that order down.
#pragma once

#include <cstdint>
#include <string>

namespace lockstep::cpu {

// Weight formats, each as GGUF stores a row of K weights.
//   F32   K float32                                      (any K)
//   F16   K float16                                      (any K)
//   Q8_0  K/32 blocks of 34 B: fp16 d, 32 int8 q;        w = d * q
//   Q4_0  K/32 blocks of 18 B: fp16 d, 16 B of nibbles;  w = d * (q - 8)
//   Q4_1  K/32 blocks of 20 B: fp16 d, fp16 m, nibbles;  w = d * q + m
// In the nibble formats weight i of a block is the low nibble of byte i, weight i + 16 the
// high nibble of byte i.
enum class QType { F32, F16, Q8_0, Q4_0, Q4_1 };

enum class Isa { Auto, Avx512, Avx2, Scalar };

// Parse the Python-facing names; throw std::invalid_argument naming the argument.
QType parse_qtype(const std::string& name);
Isa parse_isa(const std::string& name);
const char* qtype_name(QType qtype);
const char* isa_name(Isa isa);

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512 = false;  // AVX-512 F, BW and VL, all three
};

CpuFeatures cpu_features();
// What Isa::Auto runs: Avx512 when the CPU has AVX-512 F/BW/VL, AVX2, FMA and F16C; else Avx2
// when it has AVX2, FMA and F16C; Scalar otherwise.
Isa auto_isa();

// Weights in a row of `row_bytes` bytes of `qtype`. Throws std::invalid_argument (naming
// `w`) unless the row is a whole number of elements (F32/F16) or blocks (Q types).
std::int64_t row_elements(QType qtype, std::int64_t row_bytes);

// out[M, N] = x[M, K] @ W[N, K]^T. x, w and out are C-contiguous; W is N rows of
// row_bytes bytes. Throws std::invalid_argument (a ValueError in Python) if the shapes do
// not fit together or `isa` is not available, before touching `out`.
void quant_matmul(const float* x, std::int64_t M, std::int64_t K, const std::uint8_t* w,
                  std::int64_t N, std::int64_t row_bytes, QType qtype, float* out,
                  Isa isa = Isa::Auto);

// out[m, :] = row ids[m] of W decoded to floats: the embedding lookup on GGUF blocks, with
// exactly the values the matmul kernels multiply by (so a tied head and its embedding agree).
// out is [M, K] with K = row_elements(qtype, row_bytes), C-contiguous. Every id is checked
// against [0, N) before anything is written; throws std::invalid_argument naming `ids`.
void dequantize_rows(const std::uint8_t* w, std::int64_t N, std::int64_t row_bytes, QType qtype,
                     const std::int64_t* ids, std::int64_t M, float* out);

}  // namespace lockstep::cpu
