// RMS normalization (every RMSNorm of Llama 4, and its weightless QK norm).
#pragma once

#include "corral/kernels/types.h"

namespace corral::kernels {

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for r < rows, over `dim` elements, computed
// in float32. w == nullptr means no weight. y may alias x. x and y have dtype `act` (CPU: float32;
// CUDA: float32, bfloat16 or float16); w has dtype `w_dtype`.
void rms_norm(const Stream& stream, void* y, const void* x, DType act, const void* w, DType w_dtype,
              int64_t rows, int64_t dim, float eps);

}  // namespace corral::kernels
