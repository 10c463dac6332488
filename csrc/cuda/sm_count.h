// The current device's count of streaming multiprocessors, asked once per device and cached
// (attention's persistent grids, the quantized products' k split).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>

#include "check.h"

namespace corral::cuda {

inline int sm_count() {
  static std::atomic<int> cached[64] = {};
  int dev = 0;
  CORRAL_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < 64) {
    const int c = cached[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  CORRAL_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  n = std::max(n, 1);
  if (dev >= 0 && dev < 64) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace corral::cuda
