// The host side of the grouped matrix product (kernels: moe_gemm_tc.cuh, moe_gemm_simt.cuh,
// moe_gemv.cuh): one launch over the routed experts' rows and/or the shared side's. The shared side
// alone is a dense product C = A . B, which the MoE's router logits and kernels::linear's own
// kernels use (dense_product).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "corral/kernels/linear.h"
#include "moe_common.cuh"

namespace corral::cuda::moe_detail {

// Row counts live in int32 on the device.
constexpr int64_t kMaxRows = int64_t(1) << 30;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// How a product runs: GEMV (few rows: float32 activations, reads each weight once), tensor cores
// (bfloat16 / float16 weights with activations of the same dtype), CUDA cores (float32
// activations, weights of any float dtype widened exactly).
enum class Path { Gemv, TensorCore, CudaCore };

struct Product {
  const char* what;  // the op, for error messages
  cudaStream_t stream;
  Groups g;
  Operand routed, shared;
  bool swiglu;
  int64_t pairs, tokens, experts;  // bounds of the device-side counts (routed pairs, shared rows)
  int gemv_rows;                   // R of the GEMV kernels
  int gemv_chunks = 1;             // GEMV: chunks of gemv_rows rows of the shared side (blockIdx.z)

  bool has_routed() const { return g.num_experts > 0 || g.routed_slots > 0; }
  bool has_shared() const { return g.shared_rows > 0; }
};

// R of the GEMV kernels for at most `rows` rows per side: 1, 2, 4 or kMaxGemvRows.
inline int gemv_rows_for(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : int(kMaxGemvRows); }

// The operand of a product with matrix m: C[rows, n] (rows ldc apart) = A[rows, k] (rows lda
// apart) . m. For the routed experts m is expert 0's; the caller sets b_stride to step to the next.
Operand matrix_operand(const void* a, int64_t lda, const MatrixRef& m, void* c, int64_t ldc, int64_t n, int64_t k);

// Launches p with `weights` (F32, BF16 or F16) on `path`. A's rows: float32 for Gemv and CudaCore,
// the weight dtype for TensorCore; for Gemv and TensorCore 16-byte aligned with lda a multiple of
// 8 and zero-padded to it (the kernels read whole 16-byte pieces).
void launch(const Product& p, DType weights, Path path);

// C = A . B (C += A . B with op.accumulate) for `rows` rows: op as the shared side alone. The
// GEMV runs over chunks of up to kMaxGemvRows rows.
void dense_product(const char* what, cudaStream_t stream, const Operand& op, int64_t rows, DType weights, Path path);

}  // namespace corral::cuda::moe_detail
