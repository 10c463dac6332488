// Launch helpers shared by the element-wise CUDA kernels (vision.cu, elementwise.cu, sampling.cu):
// capped grids for grid-stride loops and the float dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "corral/error.h"
#include "corral/kernels/types.h"

namespace corral::cuda {

constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest
constexpr int64_t kMaxBlocksY = 65535;            // gridDim.y's limit

// A 1-D grid for `items` blocks' worth of work (at least 1, at most kMaxBlocks).
inline unsigned blocks_for(int64_t items) { return unsigned(std::min(std::max<int64_t>(items, 1), kMaxBlocks)); }

// A grid for `rows` x `cols` element-wise work: blockIdx.y walks rows, blockIdx.x column blocks.
inline dim3 rows_cols_grid(int64_t rows, int64_t cols, int threads) {
  const int64_t x = std::min<int64_t>((cols + threads - 1) / threads, 1024);
  const int64_t y = std::min(rows, kMaxBlocksY);
  return dim3(unsigned(std::max<int64_t>(x, 1)), unsigned(std::max<int64_t>(y, 1)));
}

// Threads of a block that walks one row of n elements.
inline int threads_for_row(int64_t n) { return n >= 4096 ? 1024 : n >= 1024 ? 256 : n >= 256 ? 128 : 32; }

template <class T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}) with the CUDA element type of a float dtype; DTypeError for any other.
template <class Fn>
void with_float_type(DType t, const char* what, Fn&& fn) {
  switch (t) {
    case DType::F32: return fn(Tag<float>{});
    case DType::BF16: return fn(Tag<__nv_bfloat16>{});
    case DType::F16: return fn(Tag<__half>{});
    default:
      throw DTypeError(std::string(what) + ": dtype " + dtype_name(t) +
                       " is not supported on CUDA (float32, bfloat16 and float16 are)");
  }
}

}  // namespace corral::cuda
