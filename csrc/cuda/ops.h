// The CUDA implementations behind the device switch in csrc/dispatch.cpp; each has the contract
// of the kernels:: function of the same name. `stream` is a cudaStream_t.
#pragma once

#include "corral/kernels/types.h"

namespace corral::cuda {

void rms_norm(void* stream, void* y, const void* x, DType act, const void* w, DType w_dtype,
              int64_t rows, int64_t dim, float eps);

}  // namespace corral::cuda
