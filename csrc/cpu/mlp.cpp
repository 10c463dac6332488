#include <string>

#include "corral/error.h"
#include "ops.h"

namespace corral::cpu {

void swiglu_mlp(float* out, const float* x, int64_t rows, const MatrixRef& gate_up, const MatrixRef& down,
                Activations act) {
  if (gate_up.layout != WeightLayout::PackedGlu || down.layout != WeightLayout::Packed)
    throw InvalidInputError("swiglu_mlp: CPU weights must be packed (gate_up by pack_glu, down by pack_weights)");
  const int64_t inter = gate_up.out / 2, hidden = gate_up.in;
  if (down.in != inter || down.out != hidden)
    throw ShapeError("swiglu_mlp: down must be (" + std::to_string(hidden) + ", " + std::to_string(inter) + ")");
  float* h = static_cast<float*>(scratch(1, rows * inter * 4));  // silu(x . gate) * (x . up)
  product(h, inter, x, hidden, rows, gate_up, gemm_kind(gate_up.dtype, act), false);
  product(out, hidden, h, inter, rows, down, gemm_kind(down.dtype, act), true);
}

}  // namespace corral::cpu
