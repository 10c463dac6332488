// Matrix products against weight matrices, the bulk of every forward pass.
#pragma once

#include "corral/kernels/types.h"

namespace corral {

// How a weight matrix is stored. nn.Linear weights are [out, in]; Llama 4's fused expert
// tensors are [in, out] (used as x @ W).
enum class WeightLayout : uint8_t { OutIn, InOut };

// A weight matrix in memory: `in` x `out` logical size, elements of `dtype`. Stored rows ([out]
// rows of `in` for OutIn, [in] rows of `out` for InOut) are `ld` elements apart; 0 means dense,
// and a larger ld views a slice of a wider matrix (e.g. the gate half of a fused gate_up).
struct MatrixRef {
  const void* data = nullptr;
  DType dtype = DType::F32;
  WeightLayout layout = WeightLayout::OutIn;
  int64_t in = 0;
  int64_t out = 0;
  int64_t ld = 0;

  int64_t row_stride() const { return ld ? ld : layout == WeightLayout::OutIn ? in : out; }
};

namespace kernels {

// y[r, 0:out] = x[r, 0:in] . W for r < rows (y += ... when accumulate). x and y are float32 with
// row strides ldx and ldy; W may be float32, bfloat16 or float16 and is read once per block of rows.
void linear(const Stream& stream, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows,
            const MatrixRef& w, bool accumulate = false);

}  // namespace kernels
}  // namespace corral
