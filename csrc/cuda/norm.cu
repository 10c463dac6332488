#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "check.h"
#include "convert.cuh"
#include "ops.h"

namespace corral::cuda {

namespace {

// One block per row: a block-wide sum of squares, then one scaling pass. Rows may be in place.
template <class X, class W>
__global__ void rms_norm_kernel(X* y, const X* x, const W* w, int64_t dim, float eps) {
  const int64_t row = blockIdx.x;
  const X* xr = x + row * dim;
  X* yr = y + row * dim;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = to_f32(xr[i]);
    ss += v * v;
  }
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  __shared__ float warp_sums[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    ss = lane < int(blockDim.x / 32) ? warp_sums[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (lane == 0) warp_sums[0] = ss;
  }
  __syncthreads();
  const float inv = rsqrtf(warp_sums[0] / float(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = to_f32(xr[i]) * inv;
    yr[i] = from_f32<X>(w ? v * to_f32(w[i]) : v);
  }
}

template <class X, class W>
void launch(cudaStream_t s, void* y, const void* x, const void* w, int64_t rows, int64_t dim,
            float eps) {
  const int threads = dim >= 4096 ? 1024 : dim >= 1024 ? 256 : dim >= 256 ? 128 : 32;
  rms_norm_kernel<X, W><<<unsigned(rows), threads, 0, s>>>(
      static_cast<X*>(y), static_cast<const X*>(x), static_cast<const W*>(w), dim, eps);
  CORRAL_CUDA_CHECK_LAUNCH();
}

template <class X>
void launch_for_weight(cudaStream_t s, void* y, const void* x, const void* w, DType w_dtype,
                       int64_t rows, int64_t dim, float eps) {
  switch (w_dtype) {
    case DType::F32: return launch<X, float>(s, y, x, w, rows, dim, eps);
    case DType::BF16: return launch<X, __nv_bfloat16>(s, y, x, w, rows, dim, eps);
    case DType::F16: return launch<X, __half>(s, y, x, w, rows, dim, eps);
    default:
      throw DTypeError(std::string("rms_norm weight: dtype ") + dtype_name(w_dtype) +
                       " is not supported on CUDA");
  }
}

}  // namespace

void rms_norm(void* stream, void* y, const void* x, DType act, const void* w, DType w_dtype,
              int64_t rows, int64_t dim, float eps) {
  if (rows <= 0) return;
  if (rows > 0x7fffffff) throw ShapeError("rms_norm: too many rows for one CUDA launch");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (act) {
    case DType::F32: return launch_for_weight<float>(s, y, x, w, w_dtype, rows, dim, eps);
    case DType::BF16: return launch_for_weight<__nv_bfloat16>(s, y, x, w, w_dtype, rows, dim, eps);
    case DType::F16: return launch_for_weight<__half>(s, y, x, w, w_dtype, rows, dim, eps);
    default:
      throw DTypeError(std::string("rms_norm activations: dtype ") + dtype_name(act) +
                       " is not supported on CUDA");
  }
}

}  // namespace corral::cuda
