// Run-time choice of the CPU instruction set. The SIMD inner loops (simd/*.h) are compiled once per
// ISA level by isa_kernels.cpp; the kernels in this folder do tiling and threading in baseline code
// and call the inner loops of the level picked here, once, from what the CPU reports.
#pragma once

#include <string>
#include <vector>

#include "corral/kernels/types.h"

namespace corral::cpu {

// y[r, 0:n] (+)= x[r, :] . W for r < rows over a panel of n output columns. OutIn: w points at
// the panel's first row of W[out, in]; InOut: at the panel's first column of W[in, out]. Rows of
// W are ldw elements apart, k is the inner dimension.
using GemmPanelFn = void (*)(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows,
                             const void* w, int64_t ldw, int64_t n, int64_t k, bool accumulate);

// Rows of x up to which InOut products stream W row by row (gemm_inout_stream).
constexpr int64_t kStreamRows = 12;

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

// Inner loops of one ISA level, indexed by the dtype of W (see float_index and kv_index): the
// first three serve weights and the KV cache, the fp8 entry only the KV cache. The fp8 loops
// read the stored codes; scales are the caller's.
struct IsaKernels {
  const char* name;
  GemmPanelFn gemm_outin[4];
  GemmPanelFn gemm_inout[4];
  GemmPanelFn gemm_inout_stream[3];  // accumulates; at most kStreamRows rows; weights only
  AttnScoresFn attn_scores[4];  // by kv_index
  AttnPvFn attn_pv[4];          // by kv_index
  SoftmaxBlockFn softmax_block;
};

// 0, 1, 2 for float32, bfloat16, float16; throws DTypeError naming `what` otherwise (float8_e4m3
// included: weights are never fp8 on CPU).
int float_index(DType dtype, const char* what);

// The index for a KV cache: float_index's, or 3 for float8_e4m3; throws DTypeError otherwise.
int kv_index(DType dtype, const char* what);

// The inner loops in use: the best level this CPU supports, or $CORRAL_CPU_ISA if set.
const IsaKernels& isa();

// Levels this build and this CPU both support, best first (e.g. "avx512", "avx2", "generic").
std::vector<std::string> supported_isas();

// Switches the level in use (for tests and benchmarks); throws InvalidInputError if unsupported.
void select_isa(const std::string& name);

}  // namespace corral::cpu
