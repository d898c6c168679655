// Paged GQA decode attention, hand-written: flash-decoding with a fixed split size.
//
// One new token per sequence. For sequence b and q head h (kv head kh = h / group):
//
//     out[b, h] = sum_j softmax_j(scale * q[b, h] . K[j, kh]) V[j, kh],   j < seq_lens[b]
//
// where key j of sequence b lives in cache slot block_tables[b, j / block_size] * block_size
// + j % block_size.
//
// Parallel decomposition (two kernels):
//   split kernel  one thread block per (sequence, kv head, group tile, split). A split is
//                 kSplitTokens consecutive keys, so a sequence of length L has cdiv(L, 512)
//                 splits: the partition depends on its own length only, never on the batch
//                 (batch invariance). The block handles up to G q heads of its kv head (all of
//                 them for group <= 8), so each K/V row is read from memory once and used G
//                 times. A group of LPT lanes owns one key row (16-byte vector loads, LPT = D /
//                 elements-per-16-bytes); the dot products are finished with __shfl_xor_sync.
//                 Each lane group keeps an online softmax (running max m, sum l, fp32
//                 accumulator) over the keys it visits; the lane groups of a warp, then the
//                 warps of the block (through shared memory), are combined in a fixed order.
//                 A sequence with one split writes out directly; otherwise the split writes
//                 its normalised output and log-sum-exp to fp32 scratch.
//   merge kernel  one thread block per (sequence, q head) combines that sequence's splits by
//                 log-sum-exp, in split order (fixed, so bit-reproducible). It does nothing for
//                 single-split sequences.
// Every reduction order above is a function of the sequence's length and of compile-time
// constants only, so a sequence's output bits do not depend on what else is in the batch.
//
// Softmax runs in base 2: the launcher passes scale * log2(e), and exp2f replaces expf.
//
// NVRTC compiles this file at run time (through CuPy). It includes no header at all (16-bit
// conversions are inline PTX) and uses built-in types only. It also compiles with
// `nvcc -arch=sm_80|sm_90 -cubin`. The CPU tests compile it with nvcc (and with NVRTC where a
// libnvrtc is installed) and also run it on the host, emulated. Needs sm_80 or newer.

namespace lockstep_decode {

typedef long long i64;

// Keys per split. The Python launcher mirrors this (SPLIT_TOKENS) to size the grid and scratch.
constexpr int kSplitTokens = 512;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// What 16 bytes of each element type hold, and scalar conversions to and from fp32.
template <typename T> struct Elem;

template <> struct Elem<float> {
  static constexpr int kPerVec = 4;
  __device__ static __forceinline__ void unpack(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
  }
  __device__ static __forceinline__ float to_float(float x) { return x; }
  __device__ static __forceinline__ float from_float(float x) { return x; }
};

// 16-bit storage types. The conversions are single PTX instructions (sm_80+), so the file needs
// no CUDA headers at all: NVRTC compiles it with no include path, whatever toolkit layout the
// CuPy wheel finds.
struct Half { unsigned short bits; };
struct BFloat16 { unsigned short bits; };

// The CPU tests compile this file for the host (tests/test_cuda_decode_attention.py) and bring
// their own versions of these three.
#ifndef LOCKSTEP_DECODE_HOST_EMULATION
__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ unsigned short float_to_half(float x) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
}
__device__ __forceinline__ unsigned short float_to_bfloat16(float x) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
}
#endif

template <> struct Elem<Half> {
  static constexpr int kPerVec = 8;
  __device__ static __forceinline__ void unpack(const uint4& r, float* f) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = half_to_float((unsigned short)(w[i] & 0xffffu));
      f[2 * i + 1] = half_to_float((unsigned short)(w[i] >> 16));
    }
  }
  __device__ static __forceinline__ float to_float(Half x) { return half_to_float(x.bits); }
  __device__ static __forceinline__ Half from_float(float x) { return Half{float_to_half(x)}; }
};

// bf16 is the top half of an fp32, so widening is a shift.
template <> struct Elem<BFloat16> {
  static constexpr int kPerVec = 8;
  __device__ static __forceinline__ void unpack(const uint4& r, float* f) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static __forceinline__ float to_float(BFloat16 x) { return __uint_as_float((unsigned)x.bits << 16); }
  __device__ static __forceinline__ BFloat16 from_float(float x) { return BFloat16{float_to_bfloat16(x)}; }
};

// Keys each lane group loads before it updates its softmax state: more keys in flight hide
// memory latency, but each costs registers per q head. Chosen so that no instantiation spills
// on sm_80/sm_90 (the CPU test suite checks cuobjdump's report).
template <int G> struct Unroll { static constexpr int value = G >= 8 ? 1 : 2; };

// The split kernel. Grid: x = sequence, y = kv head * group tiles + tile, z = split.
template <typename T, int D, int G>
__device__ __forceinline__ void decode_split(
    const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_lse,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
    i64 q_stride_b, i64 q_stride_h, i64 k_stride_slot, i64 k_stride_h, i64 v_stride_slot, i64 v_stride_h,
    i64 out_stride_b, i64 out_stride_h, i64 table_stride,
    int num_q_heads, int group, int block_size, int max_blocks, int max_splits, float scale_log2) {
  constexpr int kVec = Elem<T>::kPerVec;
  constexpr int kLanesPerKey = D / kVec;
  static_assert(D % kVec == 0 && kLanesPerKey <= 32 && 32 % kLanesPerKey == 0, "head_dim must tile a warp");
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kUnroll = Unroll<G>::value;
  constexpr int kKeysPerStep = kWarps * kKeysPerWarp * kUnroll;

  const int b = blockIdx.x;
  const int tiles = (group + G - 1) / G;
  const int kv_head = blockIdx.y / tiles;
  const int tile = blockIdx.y - kv_head * tiles;
  const int head0 = kv_head * group + tile * G;
  const int heads = min(G, group - tile * G);
  const int split = blockIdx.z;

  // A seq_len past the table's capacity is a caller bug; clamping keeps every read and scratch
  // write in bounds (and the split count <= max_splits) instead of corrupting memory.
  const int len = min(seq_lens[b], max_blocks * block_size);
  if (len <= 0) {
    // An empty (padding) sequence gets zeros rather than leftover memory, so padded batch
    // slots stay finite through the layers that follow.
    if (split == 0) {
      for (int i = threadIdx.x; i < heads * D; i += kThreads)
        out[b * out_stride_b + (head0 + i / D) * out_stride_h + i % D] = Elem<T>::from_float(0.f);
    }
    return;
  }
  const int start = split * kSplitTokens;
  if (start >= len) return;  // the grid is sized for the widest table; this split is past the end
  const int end = min(len, start + kSplitTokens);
  const int num_splits = (len + kSplitTokens - 1) / kSplitTokens;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int row = lane / kLanesPerKey;        // which key of the warp's kKeysPerWarp
  const int col = (lane % kLanesPerKey) * kVec;  // first of this lane's kVec head-dim elements

  // q is read once per block, so plain scalar loads (no alignment demands on q) are fine.
  // Tile heads past `heads` get q = 0: their arithmetic is harmless and never stored.
  float qf[G][kVec];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const T* qp = q + b * q_stride_b + (head0 + (g < heads ? g : 0)) * q_stride_h + col;
#pragma unroll
    for (int i = 0; i < kVec; ++i) qf[g][i] = g < heads ? Elem<T>::to_float(qp[i]) * scale_log2 : 0.f;
  }

  float m[G], l[G], acc[G][kVec];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[g][i] = 0.f;
  }

  const T* k_base = k_cache + kv_head * k_stride_h + col;
  const T* v_base = v_cache + kv_head * v_stride_h + col;
  const int* table = block_tables + b * table_stride;

  // The loop bounds are uniform across the block, so every lane reaches the shuffles below;
  // lanes whose key is past the end just load nothing and contribute p = 0.
  for (int base = start; base < end; base += kKeysPerStep) {
    uint4 kr[kUnroll], vr[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + (u * kWarps + warp) * kKeysPerWarp + row;
      ok[u] = t < end;
      if (ok[u]) {
        // Slots are 64-bit: slot * stride overflows 32 bits in caches over 2^31 elements.
        const i64 slot = (i64)table[t / block_size] * block_size + t % block_size;
        kr[u] = __ldg(reinterpret_cast<const uint4*>(k_base + slot * k_stride_slot));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(v_base + slot * v_stride_slot));
      } else {
        // Slots outside the sequence may hold anything (NaN included); 0 * NaN would poison acc.
        kr[u] = make_uint4(0u, 0u, 0u, 0u);
        vr[u] = make_uint4(0u, 0u, 0u, 0u);
      }
    }

    float s[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[kVec];
      Elem<T>::unpack(kr[u], kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) d = fmaf(qf[g][i], kf[i], d);
        s[u][g] = d;
      }
    }
    // Butterfly within the lane group: a + b == b + a, so every lane of the group ends with
    // the same bits and the group's lanes agree on p below.
#pragma unroll
    for (int off = kLanesPerKey / 2; off > 0; off /= 2) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int g = 0; g < G; ++g) s[u][g] += __shfl_xor_sync(kFullMask, s[u][g], off);
      }
    }

    float vf[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) Elem<T>::unpack(vr[u], vf[u]);

#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = ok[u] ? fmaxf(mx, s[u][g]) : mx;
      // mx is -inf only while this lane group has seen no key; then alpha = exp2(-inf) = 0
      // and p = 0, with no inf - inf = NaN.
      const float ref = mx == neg_inf() ? 0.f : mx;
      const float alpha = exp2f(m[g] - ref);
      float p[kUnroll];
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        p[u] = ok[u] ? exp2f(s[u][g] - ref) : 0.f;
        psum += p[u];
      }
      l[g] = l[g] * alpha + psum;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        float a = acc[g][i] * alpha;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) a = fmaf(p[u], vf[u][i], a);
        acc[g][i] = a;
      }
      m[g] = mx;
    }
  }

  // Combine the lane groups of the warp (same columns, different keys): xor over the row bits.
#pragma unroll
  for (int off = kLanesPerKey; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float mo = __shfl_xor_sync(kFullMask, m[g], off);
      const float lo = __shfl_xor_sync(kFullMask, l[g], off);
      const float mx = fmaxf(m[g], mo);
      const float ref = mx == neg_inf() ? 0.f : mx;
      const float a = exp2f(m[g] - ref);
      const float ao = exp2f(mo - ref);
      l[g] = l[g] * a + lo * ao;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float other = __shfl_xor_sync(kFullMask, acc[g][i], off);
        acc[g][i] = acc[g][i] * a + other * ao;
      }
      m[g] = mx;
    }
  }

  // Combine the warps through shared memory, always in warp order.
  __shared__ float s_acc[kWarps][G][D];
  __shared__ float s_m[kWarps][G];
  __shared__ float s_l[kWarps][G];
  if (row == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) s_acc[warp][g][col + i] = acc[g][i];
      if (lane == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < heads * D; idx += kThreads) {
    const int g = idx / D;
    const int d = idx - g * D;
    float mx = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][g]);
    // The split holds at least one key, so mx is finite; empty warps weigh exp2(-inf) = 0.
    float sum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float a = exp2f(s_m[w][g] - mx);
      sum = fmaf(s_l[w][g], a, sum);
      o = fmaf(s_acc[w][g][d], a, o);
    }
    const int h = head0 + g;
    if (num_splits == 1) {
      out[b * out_stride_b + h * out_stride_h + d] = Elem<T>::from_float(o / sum);
    } else {
      const i64 p = ((i64)b * num_q_heads + h) * max_splits + split;
      part_out[p * D + d] = o / sum;
      if (d == 0) part_lse[p] = mx + log2f(sum);
    }
  }
}

// The merge kernel. Grid: x = sequence, y = q head; D threads, one per output element.
template <typename T, int D>
__device__ __forceinline__ void decode_merge(
    T* __restrict__ out, const float* __restrict__ part_out, const float* __restrict__ part_lse,
    const int* __restrict__ seq_lens, i64 out_stride_b, i64 out_stride_h,
    int num_q_heads, int block_size, int max_blocks, int max_splits) {
  const int b = blockIdx.x;
  const int h = blockIdx.y;
  const int len = min(seq_lens[b], max_blocks * block_size);  // the split kernel's clamp
  const int num_splits = (len + kSplitTokens - 1) / kSplitTokens;
  if (num_splits <= 1) return;  // the split kernel wrote this row itself
  const int d = threadIdx.x;
  const i64 p0 = ((i64)b * num_q_heads + h) * max_splits;
  float mx = neg_inf();
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, part_lse[p0 + s]);
  float sum = 0.f, o = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float w = exp2f(part_lse[p0 + s] - mx);
    sum += w;
    o = fmaf(w, part_out[(p0 + s) * D + d], o);
  }
  out[b * out_stride_b + h * out_stride_h + d] = Elem<T>::from_float(o / sum);
}

}  // namespace lockstep_decode

// extern "C" entry points, one per (dtype, head_dim[, q heads per block]), so CuPy finds them
// by plain name: decode_attention_split_<f32|f16|bf16>_d<64|128>_g<1|2|4|8> and
// decode_attention_merge_<f32|f16|bf16>_d<64|128>.
#define LOCKSTEP_DECODE_SPLIT(TAG, T, D, G)                                                          \
  extern "C" __global__ void __launch_bounds__(lockstep_decode::kThreads)                             \
  decode_attention_split_##TAG##_d##D##_g##G(                                                         \
      const T* q, const T* k_cache, const T* v_cache, T* out, float* part_out, float* part_lse,     \
      const int* block_tables, const int* seq_lens, long long q_stride_b, long long q_stride_h,     \
      long long k_stride_slot, long long k_stride_h, long long v_stride_slot, long long v_stride_h, \
      long long out_stride_b, long long out_stride_h, long long table_stride, int num_q_heads,      \
      int group, int block_size, int max_blocks, int max_splits, float scale_log2) {               \
    lockstep_decode::decode_split<T, D, G>(                                                          \
        q, k_cache, v_cache, out, part_out, part_lse, block_tables, seq_lens, q_stride_b,            \
        q_stride_h, k_stride_slot, k_stride_h, v_stride_slot, v_stride_h, out_stride_b,              \
        out_stride_h, table_stride, num_q_heads, group, block_size, max_blocks, max_splits,          \
        scale_log2);                                                                                 \
  }

#define LOCKSTEP_DECODE_MERGE(TAG, T, D)                                                             \
  extern "C" __global__ void __launch_bounds__(D) decode_attention_merge_##TAG##_d##D(              \
      T* out, const float* part_out, const float* part_lse, const int* seq_lens,                   \
      long long out_stride_b, long long out_stride_h, int num_q_heads, int block_size,              \
      int max_blocks, int max_splits) {                                                              \
    lockstep_decode::decode_merge<T, D>(out, part_out, part_lse, seq_lens, out_stride_b,             \
                                        out_stride_h, num_q_heads, block_size, max_blocks,           \
                                        max_splits);                                                 \
  }

#define LOCKSTEP_DECODE_ALL_GROUPS(TAG, T, D) \
  LOCKSTEP_DECODE_SPLIT(TAG, T, D, 1)         \
  LOCKSTEP_DECODE_SPLIT(TAG, T, D, 2)         \
  LOCKSTEP_DECODE_SPLIT(TAG, T, D, 4)         \
  LOCKSTEP_DECODE_SPLIT(TAG, T, D, 8)         \
  LOCKSTEP_DECODE_MERGE(TAG, T, D)

LOCKSTEP_DECODE_ALL_GROUPS(f32, float, 64)
LOCKSTEP_DECODE_ALL_GROUPS(f32, float, 128)
LOCKSTEP_DECODE_ALL_GROUPS(f16, lockstep_decode::Half, 64)
LOCKSTEP_DECODE_ALL_GROUPS(f16, lockstep_decode::Half, 128)
LOCKSTEP_DECODE_ALL_GROUPS(bf16, lockstep_decode::BFloat16, 64)
LOCKSTEP_DECODE_ALL_GROUPS(bf16, lockstep_decode::BFloat16, 128)
