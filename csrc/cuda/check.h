// Error checking for CUDA runtime calls: every failure becomes a corral::DeviceError.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "corral/error.h"

namespace corral::cuda {

[[noreturn]] inline void throw_error(cudaError_t err, const char* what, const char* file, int line) {
  throw DeviceError(std::string("CUDA error: ") + cudaGetErrorString(err) + " (" +
                    cudaGetErrorName(err) + ") in " + what + " at " + file + ":" +
                    std::to_string(line));
}

}  // namespace corral::cuda

#define CORRAL_CUDA_CHECK(expr)                                                 \
  do {                                                                          \
    const cudaError_t corral_err_ = (expr);                                     \
    if (corral_err_ != cudaSuccess)                                             \
      ::corral::cuda::throw_error(corral_err_, #expr, __FILE__, __LINE__);      \
  } while (0)

// After a kernel launch: a bad configuration is reported by cudaGetLastError.
#define CORRAL_CUDA_CHECK_LAUNCH() CORRAL_CUDA_CHECK(cudaGetLastError())
