// Matrix products against weight matrices, the bulk of every forward pass.
#pragma once

#include <cstdlib>
#include <memory>

#include "corral/kernels/types.h"

namespace corral {

// How a weight matrix is stored. nn.Linear weights are [out, in]; Llama 4's fused expert
// tensors are [in, out] (used as x @ W). The CPU products read weights repacked at load
// (pack_weights, pack_glu): Packed is one matrix, PackedGlu the gate and up matrices of a SwiGLU
// MLP side by side (its `out` counts both: twice the MLP's width).
enum class WeightLayout : uint8_t { OutIn, InOut, Packed, PackedGlu };

// A weight matrix in memory: `in` x `out` logical size, elements of `dtype`. Stored rows ([out]
// rows of `in` for OutIn, [in] rows of `out` for InOut) are `ld` elements apart; 0 means dense,
// and a larger ld views a slice of a wider matrix (e.g. the gate half of a fused gate_up).
// Packed layouts ignore ld.
struct MatrixRef {
  const void* data = nullptr;
  DType dtype = DType::F32;
  WeightLayout layout = WeightLayout::OutIn;
  int64_t in = 0;
  int64_t out = 0;
  int64_t ld = 0;

  int64_t row_stride() const { return ld ? ld : layout == WeightLayout::OutIn ? in : out; }
  bool packed() const { return layout == WeightLayout::Packed || layout == WeightLayout::PackedGlu; }
};

namespace kernels {

// Host memory for packed weights: aligned to 2 MiB and advised for transparent huge pages (decode
// streams every weight once per token; huge pages spare it most TLB misses).
struct FreeMemory {
  void operator()(void* p) const { std::free(p); }
};
using PackedStorage = std::unique_ptr<char, FreeMemory>;
PackedStorage allocate_packed(int64_t bytes);

// Output columns per panel of the CPU layout.
constexpr int64_t kPackedPanelCols = 64;
// The CPU layout: panels of kPackedPanelCols output columns, each panel contiguous, its k steps one after the
// other (bfloat16: pairs of k per column, as vdpbf16ps reads them). A product then streams each
// panel front to back whatever the number of rows, and every column sums over k in one fixed
// order. Sizes in bytes; dst must be 64-byte aligned; the results view dst. Source layouts:
// OutIn or InOut, float32, bfloat16 or float16 (DTypeError otherwise).
int64_t packed_bytes(const MatrixRef& w);
MatrixRef pack_weights(void* dst, const MatrixRef& w);
// Gate and up (same shape and dtype) packed together: each panel holds 32 gate columns and the
// same 32 up columns, so one pass yields silu(x . gate) * (x . up).
int64_t packed_glu_bytes(const MatrixRef& gate);
MatrixRef pack_glu(void* dst, const MatrixRef& gate, const MatrixRef& up);

// What the products multiply bfloat16 weights with: activations rounded to bfloat16 (Native:
// vdpbf16ps, twice the float32 rate, as llama.cpp and vLLM compute bf16 models) or float32 ones
// (exact products at float32 speed). Float32 and float16 weights always take float32 activations.
// Sums are float32 either way.
enum class Activations : uint8_t { Native, Float32 };

// y[r, 0:out] = x[r, 0:in] . W for r < rows (y += ... when accumulate). x and y are float32 with
// row strides ldy and ldx. On CPU W is Packed.
void linear(const Stream& stream, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows,
            const MatrixRef& w, bool accumulate = false, Activations act = Activations::Native);

}  // namespace kernels
}  // namespace corral
