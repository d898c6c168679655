// The non-matmul work of a CPU forward step: RMSNorm (with the residual add fused), RoPE with
// the K/V cache write, and causal GQA attention over the paged KV cache. fp32 throughout.
//
// Like quant_matmul, every output element is computed by one thread in one fixed order that
// depends only on its own row (RMSNorm, RoPE) or its own sequence (attention), so its bits do
// not depend on the batch around it or on the thread count. cpu_ops.cpp writes the orders down.
#pragma once

#include <cstdint>

namespace lockstep::cpu {

// out[t, :] = weight * (x[t, :] * 1 / sqrt(mean_h x[t, h]^2 + eps)) for each of T rows of H.
// x, weight and out are C-contiguous; out may be x.
void rms_norm(const float* x, std::int64_t T, std::int64_t H, const float* weight, float eps,
              float* out);

// residual += x, then out = rms_norm(residual): the residual-stream update and the next norm
// in one pass. out must not overlap x or residual.
void add_rms_norm(const float* x, float* residual, std::int64_t T, std::int64_t H,
                  const float* weight, float eps, float* out);

// `rows` rows of `heads` x `head_dim` floats: element (t, h, d) at data[t * row_stride +
// h * head_dim + d]. row_stride >= heads * head_dim lets q, k and v be column slices of one
// fused qkv matmul output.
struct Heads {
  float* data;
  std::int64_t rows;
  std::int64_t heads;
  std::int64_t head_dim;
  std::int64_t row_stride;
};

// Rotate-half RoPE of q and k in place, at angle table row positions[t] (cos/sin [P, D/2]):
//   (x1, x2) -> (x1 * cos - x2 * sin, x2 * cos + x1 * sin),  x1 = x[:D/2], x2 = x[D/2:]
// then k_cache[slots[t]] = k[t] and v_cache[slots[t]] = v[t] (caches [num_slots, Hkv, D],
// C-contiguous). All positions and slots are checked before anything is written; throws
// std::invalid_argument naming the argument.
void rope_and_cache(Heads q, Heads k, Heads v, const float* cos, const float* sin,
                    std::int64_t P, const std::int64_t* positions, const std::int64_t* slots,
                    float* k_cache, float* v_cache, std::int64_t num_slots);

// A step's sequences as the step planner lays them out (cpp/step_planner.h): sequence s owns
// query rows [query_start[s], query_start[s + 1]) and its context is its first seq_lens[s]
// positions, position j at cache slot block_tables[s * W + j / block_size] * block_size +
// j % block_size. Entries of a row past the blocks its seq_len needs are never read.
struct PagedBatch {
  const std::int32_t* block_tables;  // [S, W]
  const std::int32_t* query_start;   // [S + 1]
  const std::int32_t* seq_lens;      // [S]
  std::int64_t S;
  std::int64_t W;
  std::int64_t block_size;
};

// Causal GQA attention of each sequence's new queries over its context in the paged cache.
// Query i of a sequence with query_len = query_start[s + 1] - query_start[s] sits at position
// seq_len - query_len + i and attends to positions 0..that one:
//   out[t, h*D:(h+1)*D] = sum_j softmax_j(scale * q[t, h] . k[j, h / (Hq / Hkv)]) v[j, h / ...]
// out is [T, Hq * D], C-contiguous; rows outside every sequence are not written, and a
// sequence with query_len 0 contributes nothing. Throws std::invalid_argument, before any
// work, if an index is out of range.
void paged_attention(Heads q, const float* k_cache, const float* v_cache,
                     std::int64_t num_slots, std::int64_t kv_heads, const PagedBatch& batch,
                     float scale, float* out);

}  // namespace lockstep::cpu
