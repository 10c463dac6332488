// Block-wide reductions and scans for the kernels that give a block to each row (sampling.cu,
// sample.cu). Every thread gets the result, and no result depends on timing: lanes combine in a
// fixed xor tree or scan, warps in index order, so float64 sums come out the same run after run.
#pragma once

#include <cuda_runtime_api.h>

namespace corral::cuda {

using u64 = unsigned long long;  // __shfl_*_sync's 64-bit integer type

constexpr int kMaxWarps = 32;  // 1024 threads

struct SumD {
  __device__ double operator()(double a, double b) const { return __dadd_rn(a, b); }
};
struct MaxF {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }  // a NaN loses
};
struct Min {
  template <class T>
  __device__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct Max {
  template <class T>
  __device__ T operator()(T a, T b) const { return a < b ? b : a; }
};

// `scratch` holds kMaxWarps entries.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, Op op) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = int(blockDim.x / 32);
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();  // earlier readers of `scratch` are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < warps; ++w) r = op(r, scratch[w]);
  return r;
}

// Each of v[0, N) reduced over the block, in place, at the cost of one reduction's synchronization:
// `scratch` holds kMaxWarps * N entries, `total` N (and the block has at least N threads).
template <int N, class T, class Op>
__device__ __forceinline__ void block_reduce_each(T (&v)[N], T* scratch, T* total, Op op) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = int(blockDim.x / 32);
#pragma unroll
  for (int j = 0; j < N; ++j)
    for (int off = 16; off > 0; off >>= 1) v[j] = op(v[j], __shfl_xor_sync(0xffffffffu, v[j], off));
  __syncthreads();  // earlier readers of `scratch` and `total` are done
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < N; ++j) scratch[warp * N + j] = v[j];
  __syncthreads();
  if (threadIdx.x < N) {
    T r = scratch[threadIdx.x];
    for (int w = 1; w < warps; ++w) r = op(r, scratch[w * N + threadIdx.x]);
    total[threadIdx.x] = r;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = total[j];
}

// op over the v of the threads before this one (`zero` for thread 0): a scan in each warp, then the
// totals of the warps before in index order. `scratch` holds kMaxWarps entries.
template <class T, class Op>
__device__ __forceinline__ T block_exclusive_scan(T v, T zero, T* scratch, Op op) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  T incl = v;
  for (int off = 1; off < 32; off <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl = op(y, incl);
  }
  const T excl = __shfl_up_sync(0xffffffffu, incl, 1);
  __syncthreads();  // earlier readers of `scratch` are done
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  T before = zero;
  for (int w = 0; w < warp; ++w) before = op(before, scratch[w]);
  return lane == 0 ? before : op(before, excl);
}

}  // namespace corral::cuda
