#include <vector>

#include "ops.h"

namespace corral::cpu {

void swiglu_mlp(float* out, const float* x, int64_t rows, const MatrixRef& gate, const MatrixRef& up,
                const MatrixRef& down) {
  const int64_t inter = gate.out, hidden = gate.in;
  std::vector<float> h(rows * 2 * inter);  // [gate | up] per row; the product overwrites gate
  linear(h.data(), 2 * inter, x, hidden, rows, gate, false);
  linear(h.data() + inter, 2 * inter, x, hidden, rows, up, false);
  silu_mul(h.data(), 2 * inter, h.data(), h.data() + inter, 2 * inter, rows, inter);
  linear(out, down.out, h.data(), 2 * inter, rows, down, true);
}

}  // namespace corral::cpu
