// The CPU sampler's order of a row's tokens, on the device (sampling.cu, sample.cu): the larger
// logit first, the lower id among equal ones; the argmax is the first token of that order as the
// CPU's scan finds it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "block_reduce.cuh"

namespace corral::cuda {

// A key whose unsigned order is that order: the logit's bits made monotone above, 0xffffffff - id
// below; -0 == +0, and NaN (value bits 0) ranks below -inf. Key 0 is no token's (ids < 2^31).
__device__ __forceinline__ u64 rank_key(float v, int64_t i) {
  uint32_t k = 0;  // NaN
  if (v == v) {
    const uint32_t b = __float_as_uint(v == 0.f ? 0.f : v);
    k = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  return (u64(k) << 32) | u64(0xffffffffu - uint32_t(i));
}

__device__ __forceinline__ int64_t key_id(u64 key) { return int64_t(0xffffffffu - uint32_t(key)); }

// The logit of a key (+0 for -0, a NaN for NaN).
__device__ __forceinline__ float key_value(u64 key) {
  const uint32_t k = uint32_t(key >> 32);
  if (k == 0) return __uint_as_float(0x7fc00000u);
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// A candidate: index -1 is none (every value seen was NaN).
struct Best {
  float v;
  int64_t i;
};

// Whether candidate a beats b: a number over none, a larger value, or an equal one at a lower index.
__device__ __forceinline__ bool beats(const Best& a, const Best& b) {
  if (a.i < 0) return false;
  if (b.i < 0) return true;
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

__device__ __forceinline__ Best warp_best(Best b) {
  for (int off = 16; off > 0; off >>= 1) {
    const Best o{__shfl_xor_sync(0xffffffffu, b.v, off), __shfl_xor_sync(0xffffffffu, b.i, off)};
    if (beats(o, b)) b = o;
  }
  return b;
}

// The CPU's argmax of a row, in every thread: the lowest index among equal maxima; a NaN never wins
// over a number (NaN > x is false), and a NaN at index 0 wins the row, since the CPU's scan starts
// there and nothing compares greater than NaN. A row of -inf (or of NaN) gives 0, and so does an
// empty one (nothing read). `scratch` holds kMaxWarps entries.
__device__ __forceinline__ int64_t block_argmax(const float* l, int64_t vocab, Best* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = int(blockDim.x / 32);
  Best b{0.f, -1};
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = l[i];
    if (v == v && (b.i < 0 || v > b.v)) b = Best{v, i};  // strided scan: later i only wins if larger
  }
  b = warp_best(b);
  __syncthreads();  // earlier readers of `scratch` are done
  if (lane == 0) scratch[warp] = b;
  __syncthreads();
  Best best = scratch[0];
  for (int w = 1; w < warps; ++w)
    if (beats(scratch[w], best)) best = scratch[w];
  return best.i < 0 || isnan(l[0]) ? 0 : best.i;
}

}  // namespace corral::cuda
