// Row normalizations: RMSNorm (every norm of Llama 4's text model, and its weightless QK norm)
// and LayerNorm (the vision encoder's).
#pragma once

#include "corral/kernels/types.h"

namespace corral::kernels {

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for r < rows, over `dim` elements, computed
// in float32. w == nullptr means no weight. y may alias x. x and y have dtype `act` (CPU: float32;
// CUDA: float32, bfloat16 or float16); w has dtype `w_dtype`.
void rms_norm(const Stream& stream, void* y, const void* x, DType act, const void* w, DType w_dtype,
              int64_t rows, int64_t dim, float eps);

// LayerNorm (torch.nn.LayerNorm): y[r, :] = (x[r, :] - mean) / sqrt(var + eps) * w + b over `dim`
// elements, the biased variance, statistics in double and the rest in float32. y may alias x.
// w and b (b may be null) have dtype `w_dtype`. float32 rows.
void layer_norm(const Stream& stream, float* y, const float* x, const void* w, const void* b, DType w_dtype,
                int64_t rows, int64_t dim, float eps);

}  // namespace corral::kernels
