// argmax on CUDA (contract: corral/kernels/sampling.h), the CPU's answer (csrc/cpu/sampling.cpp)
// for every row: the lowest index among equal maxima; a NaN never wins over a number (NaN > x is
// false), and a NaN at index 0 wins the row, since the CPU's scan starts from index 0 and nothing
// compares greater than NaN. A row of -inf (or of NaN) gives 0, and so does every row of an
// empty vocabulary (nothing read).
#include <cuda_runtime_api.h>

#include <cstdint>

#include "check.h"
#include "corral/error.h"
#include "launch.cuh"
#include "ops.h"

namespace corral::cuda {

namespace {

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

// A block per row (grid-stride): each thread scans a strided slice, then warps and blocks reduce.
__global__ void argmax_kernel(int32_t* out, const float* logits, int64_t rows, int64_t vocab) {
  __shared__ Best partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = int(blockDim.x / 32);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* l = logits + r * vocab;
    Best b{0.f, -1};
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = l[i];
      if (v == v && (b.i < 0 || v > b.v)) b = Best{v, i};  // strided scan: later i only wins if larger
    }
    b = warp_best(b);
    __syncthreads();  // the previous row's readers are done with `partial`
    if (lane == 0) partial[warp] = b;
    __syncthreads();
    if (threadIdx.x == 0) {
      Best best = partial[0];
      for (int w = 1; w < warps; ++w)
        if (beats(partial[w], best)) best = partial[w];
      out[r] = best.i < 0 || isnan(l[0]) ? 0 : int32_t(best.i);
    }
  }
}

}  // namespace

void argmax(void* stream, int32_t* out, const float* logits, int64_t rows, int64_t vocab) {
  if (rows <= 0) return;
  if (!out || (vocab > 0 && !logits)) throw InvalidInputError("argmax: a pointer is null");
  argmax_kernel<<<blocks_for(rows), threads_for_row(vocab), 0, static_cast<cudaStream_t>(stream)>>>(out, logits,
                                                                                                   rows, vocab);
  CORRAL_CUDA_CHECK_LAUNCH();
}

}  // namespace corral::cuda
