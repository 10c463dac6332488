// Matrix products against weight matrices, the bulk of every forward pass.
#pragma once

#include <cstdlib>
#include <memory>
#include <string>

#include "corral/kernels/types.h"

namespace corral {

// How a weight matrix is stored. nn.Linear weights are [out, in]; Llama 4's fused expert
// tensors are [in, out] (used as x @ W). The CPU products read weights repacked at load
// (pack_weights, pack_glu): Packed is one matrix, PackedGlu the gate and up matrices of a SwiGLU
// MLP side by side (its `out` counts both: twice the MLP's width).
enum class WeightLayout : uint8_t { OutIn, InOut, Packed, PackedGlu };

// How the codes of a quantized matrix (dtype I8, I4 or F8_E4M3) give its weights: for the group
// of `group` consecutive k that k belongs to, w[k, c] = (code[k, c] - offset[c]) * scale[c]. The
// offset is 8 for I4 codes (stored 0..15) and 0 for I8 and F8 unless `offsets` says that each
// (group, column) has its own (asymmetric formats: zero points). Plain data, no pointers: the
// CUDA backend reads the same description of its own copies.
struct QuantInfo {
  int64_t group = 0;               // k per scale; I8 and I4: a multiple of kQuantBlock
  DType scale_dtype = DType::F32;  // F32 or BF16
  bool offsets = false;            // I8, I4: an integer offset per (group, column)
  // F8 only: activations rounded to fp8 per token and per run of this many k, scaled by the
  // run's max |x| / 448 (the checkpoint's dynamic activation quantization; 0: not rounded).
  int64_t act_group = 0;
};

inline bool operator==(const QuantInfo& a, const QuantInfo& b) {
  return a.group == b.group && a.scale_dtype == b.scale_dtype && a.offsets == b.offsets && a.act_group == b.act_group;
}

// A weight matrix in memory: `in` x `out` logical size, elements of `dtype`. Stored rows ([out]
// rows of `in` for OutIn, [in] rows of `out` for InOut) are `ld` elements apart; 0 means dense,
// and a larger ld views a slice of a wider matrix (e.g. the gate half of a fused gate_up).
// Packed layouts ignore ld. Quantized matrices (I8, I4, F8_E4M3 weights) exist only packed.
struct MatrixRef {
  const void* data = nullptr;
  DType dtype = DType::F32;
  WeightLayout layout = WeightLayout::OutIn;
  int64_t in = 0;
  int64_t out = 0;
  int64_t ld = 0;
  QuantInfo quant;

  int64_t row_stride() const { return ld ? ld : layout == WeightLayout::OutIn ? in : out; }
  bool packed() const { return layout == WeightLayout::Packed || layout == WeightLayout::PackedGlu; }
  bool quantized() const { return quant.group > 0; }
};

// An [out, in] quantized matrix as a checkpoint or the load-time quantizer gives it, one code per
// byte: I8 codes, I4 codes in [-8, 7], or F8_E4M3 bits; scales [out, ceil(in / group)] as floats;
// zero points (I8, I4 only; null: symmetric) [out, ceil(in / group)] in the codes' domain, so
// w = (q - z) * s.
struct QuantizedRows {
  DType dtype = DType::I8;
  int64_t out = 0, in = 0, group = 0;
  const int8_t* codes = nullptr;
  const float* scales = nullptr;
  const int8_t* zero_points = nullptr;
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

// The quantized packing (same panels; per panel, group after group: the group's scales for the
// panel's columns, then its offsets if any, then its codes). I8 and I4 groups are multiples of
// kQuantBlock; the scales must be exact in scale_dtype (F32 or BF16). InvalidInputError /
// ShapeError otherwise.
constexpr int64_t kQuantBlock = 32;
int64_t packed_quantized_bytes(const QuantizedRows& w, DType scale_dtype);
// The same from the shape alone: `out` x `in` codes of `dtype` held as q says.
int64_t packed_quantized_bytes(DType dtype, int64_t out, int64_t in, const QuantInfo& q);
int64_t packed_quantized_glu_bytes(DType dtype, int64_t out, int64_t in, const QuantInfo& q);
MatrixRef pack_quantized(void* dst, const QuantizedRows& w, DType scale_dtype);
int64_t packed_quantized_glu_bytes(const QuantizedRows& gate, DType scale_dtype);
MatrixRef pack_quantized_glu(void* dst, const QuantizedRows& gate, const QuantizedRows& up, DType scale_dtype);
// Bytes of a packed matrix's data (any packed layout and dtype).
int64_t packed_size(const MatrixRef& packed);
// The weights of a packed matrix as float32 [out, in] (PackedGlu: the gate rows, then the up
// rows), exactly as the products use them: for tests and tools.
void unpack_weights(float* dst, const MatrixRef& packed);

// What the products multiply bfloat16 weights with: activations rounded to bfloat16 (Native:
// vdpbf16ps, twice the float32 rate, as llama.cpp and vLLM compute bf16 models) or float32 ones
// (exact products at float32 speed). Float32 and float16 weights always take float32 activations.
// Sums are float32 either way. Integer weights (I8, I4) always multiply activations quantized per
// token and per kQuantBlock k to 8-bit integers (scale max |x| / 127, as llama.cpp's Q8_0), whose
// block dot products are exact integers; FP8 weights multiply float32 activations (or fp8-rounded
// ones, see QuantInfo::act_group).
enum class Activations : uint8_t { Native, Float32 };

// y[r, 0:out] = x[r, 0:in] . W for r < rows (y += ... when accumulate). x and y are float32 with
// row strides ldx and ldy. On CPU W is Packed.
// On CUDA x, y and W's data are device memory, y must not overlap x, and W is unpacked: OutIn or
// InOut (any ld), float32, bfloat16 or float16, or quantized (I8, I4, F8_E4M3) in the CPU's Packed
// layout (pack_quantized's bytes copied to the device, 16-byte aligned; packed float weights:
// NotSupportedError). Quantized products compute what the CPU's do (the activation quantization
// above, exact block dot products), only their float32 sums in another order; fp8 prefill with
// per-output scales and per-token activations multiplies on fp8 tensor cores where cuBLASLt can
// (cuda_fp8_tensor_products), the same values accumulated as the tensor cores do.
// Sums are float32. Native with bfloat16 or float16 weights rounds the activations to the weight
// dtype (float16 too, unlike the CPU) and multiplies on cuBLASLt, or on Corral's own kernels where
// cuBLASLt is not loaded (cuda_blas_status); the other products (float32 activations or weights)
// run on Corral's kernels in float32, 16-bit weights widened exactly. A row's result may change in
// the last bits with the number of rows (the algorithm is picked per shape).
void linear(const Stream& stream, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows,
            const MatrixRef& w, bool accumulate = false, Activations act = Activations::Native);

// The library behind CUDA's products of 16-bit weights and fp8 prefill: "cuBLASLt 131000 from
// <path>", why it is not loaded (csrc/cuda/cublaslt.h lists where it is looked for), or "not
// built". Loads it.
std::string cuda_blas_status();

// Whether CUDA's fp8 products of `rows` x [in -> out] with a scale per output and activations
// rounded per token (fbgemm_fp8's; see linear) run on fp8 tensor cores here: from 64 rows on, where
// cuBLASLt (12.9 or newer, for its per-row and per-column scale vectors) has a plan for the shape
// on the current device. False without CUDA (or a GPU). For tests and tools.
bool cuda_fp8_tensor_products(int64_t rows, int64_t in, int64_t out);

// y[r, 0:n] += src[r % src_rows, 0:n] for r < rows (y rows ldy floats apart; src [src_rows, n]
// of `dtype`): a bias when src_rows is 1, a table of position embeddings when it is the rows of
// one sequence.
void add_rows(const Stream& stream, float* y, int64_t ldy, int64_t rows, const void* src, DType dtype, int64_t n,
              int64_t src_rows);

}  // namespace kernels
}  // namespace corral
