// Activations: SwiGLU (the text model's MLPs) and GELU (the vision encoder's).
#pragma once

#include "corral/kernels/types.h"

namespace corral::kernels {

// SwiGLU: out[r, i] = silu(gate[r, i]) * up[r, i] for r < rows, i < n, silu(g) = g * sigmoid(g).
// Rows of gate, up and out are ld_in, ld_in and ld_out floats apart.
void silu_mul(const Stream& stream, float* out, int64_t ld_out, const float* gate, const float* up,
              int64_t ld_in, int64_t rows, int64_t n);

// GELU in its exact form, x * (1 + erf(x / sqrt(2))) / 2 (torch.nn.GELU()), in place on
// x[r, i] for r < rows, i < n, rows ld floats apart.
void gelu(const Stream& stream, float* x, int64_t ld, int64_t rows, int64_t n);

}  // namespace corral::kernels
