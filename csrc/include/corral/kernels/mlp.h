// The SwiGLU feed-forward block (Llama 4's dense layers and its shared expert).
#pragma once

#include "corral/kernels/linear.h"

namespace corral::kernels {

// out[r, :] += ((silu(x[r, :] . Wg) * (x[r, :] . Wu)) . Wd) for r < rows; x and out are
// [rows, hidden] float32 and must not alias. On CPU gate_up is PackedGlu (pack_glu) and down Packed.
// On CUDA (device memory; numerics of linear) float weights are unpacked: gate_up one matrix of out =
// 2 * inter whose outputs 0..inter-1 are the gate's and inter..2*inter-1 the up's (OutIn: [2 * inter,
// hidden], gate rows then up rows; InOut: [hidden, 2 * inter]), down [hidden, inter] (OutIn) or
// [inter, hidden] (InOut); quantized ones are packed as on the CPU (gate_up PackedGlu, down Packed),
// and each of the two may be quantized or not on its own.
void swiglu_mlp(const Stream& stream, float* out, const float* x, int64_t rows, const MatrixRef& gate_up,
                const MatrixRef& down, Activations act = Activations::Native);

}  // namespace corral::kernels
