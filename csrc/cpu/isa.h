// Run-time choice of the CPU instruction set. The SIMD inner loops (simd/*.h) are compiled once per
// ISA level by isa_kernels.cpp; the kernels in this folder do tiling and threading in baseline code
// and call the inner loops of the level picked here, once, from what the CPU reports.
#pragma once

#include <string>
#include <vector>

#include "corral/kernels/linear.h"
#include "corral/kernels/types.h"

namespace corral::cpu {

// Weight products (simd/gemm.h) run on weights packed at load (cpu/pack.cpp) in panels of
// kPanelCols output columns. How a product reads its weights and activations, by kind:
//   kGemmF32, kGemmF16: float32 / float16 weights, float32 activations (exact float32 sums);
//   kGemmBf16: bfloat16 weights, activations rounded to bfloat16 (vdpbf16ps where available);
//   kGemmBf16Exact: bfloat16 weights, float32 activations (the router: its top-k decides routes);
//   kGemmI8, kGemmI4: int8 / int4 codes, activations quantized per token and block (simd/qgemm.h);
//   kGemmF8: fp8 e4m3 codes, float32 activations.
constexpr int64_t kPanelCols = kernels::kPackedPanelCols;
enum GemmKind : int { kGemmF32 = 0, kGemmBf16 = 1, kGemmF16 = 2, kGemmBf16Exact = 3, kGemmI8 = 4, kGemmI4 = 5, kGemmF8 = 6 };
constexpr int kGemmKinds = 7;
constexpr int64_t kQuantBlock = kernels::kQuantBlock;

// Where code i (of a group) of panel column c lies in a quantized group's codes (simd/qgemm.h):
// I8 quads and I4 nibble words of 8 k per column, fp8 one k per panel row. The stored code: an
// int8, an I4 nibble 0..15 (low nibble for i % 8 < 4), or fp8 bits.
CORRAL_INLINE int64_t quant_code_byte(DType dtype, int64_t i, int64_t c) {
  if (dtype == DType::F8_E4M3) return i * kPanelCols + c;
  return (dtype == DType::I4 ? i / 8 : i / 4) * kPanelCols * 4 + c * 4 + i % 4;
}
CORRAL_INLINE bool quant_high_nibble(int64_t i) { return i % 8 >= 4; }
CORRAL_INLINE int quant_code(DType dtype, const char* codes, int64_t i, int64_t c) {
  const char b = codes[quant_code_byte(dtype, i, c)];
  if (dtype == DType::I4) return quant_high_nibble(i) ? uint8_t(b) >> 4 : uint8_t(b) & 15;
  return dtype == DType::I8 ? int(int8_t(b)) : int(uint8_t(b));
}

// Activations prepared for the integer products: per row, one record per kQuantBlock k: the block's
// scale (float), the sum of its codes (int32), then its int8 codes, zeros past k.
constexpr int64_t quant_record_bytes(int) { return 8 + kQuantBlock; }
// 4-byte words of one prepared row of k activations for products of `kind`.
constexpr int64_t prepared_row_words(int kind, int64_t k) {
  return kind == kGemmI8 || kind == kGemmI4 ? (k + kQuantBlock - 1) / kQuantBlock * quant_record_bytes(kind) / 4
                                            : k + 1;
}

// Activations as a product reads them: 4-byte elements (floats or bf16 pairs), rows ld apart.
struct PreparedX {
  const void* x;
  int64_t ld;
};
// Prepares rows x of k for a kind of product, in buf (rows * prepared_row_words(kind, k) words).
using PrepareXFn = PreparedX (*)(void* buf, const float* x, int64_t ldx, int64_t rows, int64_t k);
// y[r, 0:n) (+)= x[r] . (one panel of W) for r < rows (n <= the panel's outputs), x prepared;
// q describes quantized panels (ignored otherwise).
using PanelGemmFn = void (*)(float* y, int64_t ldy, const void* x, int64_t ldx, int64_t rows, const void* panel,
                             int64_t k, int64_t n, bool accumulate, const QuantInfo& q);

// Attention scores of rows of q against one block of keys stored [d, bs]; the kernels also
// prefetch the same tile `ahead` bytes away, a later block's (see simd/attention.h).
using AttnScoresFn = void (*)(float* s, int64_t lds, const float* q, int64_t ldq, int64_t rows, const void* kt,
                              int64_t bs, int64_t d, int64_t ahead);
// acc[r, 0:d] += p[r, 0:nk] . V for one block's values stored [nk, d]; prefetches as attn_scores.
using AttnPvFn = void (*)(float* acc, int64_t lda, const float* p, int64_t ldp, int64_t rows, const void* v,
                          int64_t nk, int64_t d, int64_t ahead);
// The softmax step of attention over one block (see simd/softmax.h).
using SoftmaxBlockFn = void (*)(float* s, int64_t lds, int64_t rows, int64_t nk, float pre, float post, float* m,
                                float* l, float* corr);

// Inner loops of one ISA level. Products are indexed by GemmKind; attention by the KV cache's
// dtype (kv_index; the fp8 loops read the stored codes, scales are the caller's).
struct IsaKernels {
  const char* name;
  PrepareXFn prepare_x[kGemmKinds];
  PanelGemmFn gemm[kGemmKinds];      // plain panels
  PanelGemmFn gemm_glu[kGemmKinds];  // GLU panels: SwiGLU of gate and up
  AttnScoresFn attn_scores[4];
  AttnPvFn attn_pv[4];          // by kv_index
  SoftmaxBlockFn softmax_block;
};

// 0, 1, 2 for float32, bfloat16, float16; throws DTypeError naming `what` otherwise.
int float_index(DType dtype, const char* what);
// Bytes of one group's header in a quantized panel (scales, then offsets), and of the whole group.
int64_t quant_header_bytes(const QuantInfo& q);
int64_t quant_group_bytes(DType dtype, const QuantInfo& q);

// The index for a KV cache: float_index's, or 3 for float8_e4m3; throws DTypeError otherwise.
int kv_index(DType dtype, const char* what);

// The inner loops in use: the best level this CPU supports, or $CORRAL_CPU_ISA if set.
const IsaKernels& isa();

// Levels this build and this CPU both support, best first (e.g. "avx512bf16", "avx512", "avx2",
// "generic").
std::vector<std::string> supported_isas();

// Switches the level in use (for tests and benchmarks); throws InvalidInputError if unsupported.
void select_isa(const std::string& name);

}  // namespace corral::cpu
