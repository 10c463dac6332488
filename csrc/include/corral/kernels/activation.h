// Gated activations.
#pragma once

#include "corral/kernels/types.h"

namespace corral::kernels {

// SwiGLU: out[r, i] = silu(gate[r, i]) * up[r, i] for r < rows, i < n, silu(g) = g * sigmoid(g).
// Rows of gate, up and out are ld_in, ld_in and ld_out floats apart.
void silu_mul(const Stream& stream, float* out, int64_t ld_out, const float* gate, const float* up,
              int64_t ld_in, int64_t rows, int64_t n);

}  // namespace corral::kernels
