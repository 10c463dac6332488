// The CUDA implementations behind the device switch in csrc/dispatch.cpp; each has the contract
// of the kernels:: function of the same name. `stream` is a cudaStream_t.
#pragma once

#include "corral/kernels/moe.h"
#include "corral/kernels/types.h"

namespace corral::cuda {

void rms_norm(void* stream, void* y, const void* x, DType act, const void* w, DType w_dtype,
              int64_t rows, int64_t dim, float eps);

// x, out and every weight pointer are device pointers; expert_tokens, when not null, is a device
// int64 array [experts]. Weights: bfloat16 / float16 (tensor cores) or float32 (CUDA cores).
void moe(void* stream, float* out, const float* x, int64_t tokens, const MoeWeights& w, int top_k,
         int64_t* expert_tokens);

}  // namespace corral::cuda
