// What the current device allows, as the kernels' launches ask it.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "check.h"
#include "corral/error.h"

namespace corral::cuda {

// Its count of streaming multiprocessors, asked once per device and cached (attention's
// persistent grids, the quantized products' k split).
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

// Lets `kernel` take `smem` bytes of dynamic shared memory (beyond 48 KB: the device's opt-in);
// NotSupportedError naming `op` when the device has less.
template <class K>
void allow_shared_memory(K kernel, size_t smem, const std::string& op) {
  if (smem <= 48 * 1024) return;
  int dev = 0, optin = 0;
  CORRAL_CUDA_CHECK(cudaGetDevice(&dev));
  CORRAL_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (smem > size_t(optin))
    throw NotSupportedError(op + ": needs " + std::to_string(smem) +
                            " bytes of shared memory per block, more than this GPU's " + std::to_string(optin));
  CORRAL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

}  // namespace corral::cuda
