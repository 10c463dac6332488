// The SwiGLU feed-forward block (Llama 4's dense layers and its shared expert).
#pragma once

#include "corral/kernels/linear.h"

namespace corral::kernels {

// out[r, :] += ((silu(x[r, :] . Wg) * (x[r, :] . Wu)) . Wd) for r < rows; x and out are
// [rows, hidden] float32 and must not alias. On CPU gate_up is PackedGlu (pack_glu) and down Packed.
void swiglu_mlp(const Stream& stream, float* out, const float* x, int64_t rows, const MatrixRef& gate_up,
                const MatrixRef& down, Activations act = Activations::Native);

}  // namespace corral::kernels
