// The host side of the products with packed quantized weights (kernels and the k split:
// quantized_panel.cuh), for kernels::linear and swiglu_mlp (linear.cu) and the MoE's quantized
// experts (moe.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "corral/kernels/linear.h"
#include "moe_common.cuh"

namespace corral::cuda::quant {

constexpr int kCols = int(kernels::kPackedPanelCols);
constexpr int kBlock = int(kernels::kQuantBlock);
// k lanes per column for row tiles of `rows`: the fewer rows, the more lanes keep loads in flight
// (decode has one block per panel); a block has kCols * lanes threads.
constexpr int lanes_for(int rows) { return rows <= 1 ? 16 : rows <= 8 ? 8 : 4; }
// The CPU's activation record of one block (csrc/cpu/isa.h): float scale, int32 sum of the codes,
// kBlock int8 codes.
constexpr int kRecordBytes = 8 + kBlock;

enum Kind : int { kI8, kI4, kF8 };

// One side (routed experts or shared) of a product C = A . W with packed quantized W (PackedGlu:
// the SwiGLU epilogue, C = silu(gate) * up).
struct QuantOperand {
  const void* a = nullptr;  // I8 / I4: rows of records (prepare); F8: float32 rows
  int64_t lda = 0;          // bytes from one row of a to the next
  const void* w = nullptr;  // the (first expert's) packed matrix
  int64_t w_stride = 0;     // bytes from one expert's matrix to the next
  float* c = nullptr;
  int64_t ldc = 0;       // floats
  int64_t n = 0, k = 0;  // output columns (PackedGlu: the MLP's width), inputs
  QuantInfo q;
  int accumulate = 0;  // C += A . W (not with the epilogue)
};

// Where a packed matrix keeps its groups.
struct PanelShape {
  int64_t header = 0;       // a group's scales and offsets
  int64_t group_bytes = 0;  // header and codes
  int64_t groups = 0;
  int64_t units = 0;  // units of kBlock k per group
};

__host__ __device__ inline PanelShape panel_shape(int kind, const QuantInfo& q, int64_t k) {
  PanelShape s;
  s.header = kCols * (q.scale_dtype == DType::BF16 ? 2 : 4) + (q.offsets ? kCols : 0);
  s.group_bytes = s.header + q.group * kCols / (kind == kI4 ? 2 : 1);
  s.groups = (k + q.group - 1) / q.group;
  s.units = (q.group + kBlock - 1) / kBlock;
  return s;
}

// The k split of a launch with fewer (row tile, panel) blocks than two per SM: `splits` blocks
// per pair (gridDim.z), each over whole units of kBlock k (split_units; a unit's products are
// scaled and added on their own, so a unit boundary cuts no arithmetic), write float sums before
// the epilogue; quantized_split_sum adds them in split order and finishes.
struct SplitK {
  float* partial = nullptr;  // [splits][tiles][panels][rows][kCols]
  int splits = 1;
  int rows = 0;  // rows per tile in partial (the launch's max_rows)
};

// Split z's units [u0, u1) of `units`: ceil(units / splits) each, the last ones maybe fewer or none.
__host__ __device__ inline void split_units(int64_t units, int64_t splits, int64_t z, int64_t& u0, int64_t& u1) {
  const int64_t each = unsigned(units + splits - 1) / unsigned(splits);  // 32 bits, as in the Partial loop
  u0 = z * each < units ? z * each : units;
  u1 = u0 + each < units ? u0 + each : units;
}

// The Kind of a packed quantized matrix in `layout`, after checking it (NotSupportedError for
// other layouts, DTypeError / ShapeError / InvalidInputError naming `what`).
int checked_kind(const MatrixRef& w, WeightLayout layout, const std::string& what);

// Activations as a product with (dtype, q) weights reads them: rows of records (I8, I4), x rounded
// to fp8 (F8 with act_group) or x itself (F8). prepared_bytes: per row (0: x itself).
struct Prepared {
  const void* a;
  int64_t lda;  // bytes
};
int64_t prepared_bytes(int kind, const QuantInfo& q, int64_t k);
Prepared prepare(cudaStream_t s, void* dst, const float* x, int64_t ldx, int64_t rows, int64_t k, int kind,
                 const QuantInfo& q);

// One launch over `tiles` row tiles (moe_detail::gemm_tile; an upper bound for the MoE) of both
// sides; no tile has more than max_rows rows (at most moe_detail::kTileM). When tiles x panels is
// under twice the SM count, k is split (SplitK): two launches, partial sums in stream-ordered scratch.
void launch(cudaStream_t s, const moe_detail::Groups& g, const QuantOperand& routed, const QuantOperand& shared,
            int kind, bool glu, int64_t max_rows, int64_t tiles);

// Rows from which an fp8 product whose weights have a scale per output and whose activations are
// rounded per token (fbgemm_fp8; compressed-tensors' channel strategy with dynamic token
// activations: Llama 4's published FP8 checkpoints) runs on fp8 tensor cores through cuBLASLt. It
// unpacks the codes to plain rows first (one more read and write of the matrix: against 64 rows'
// multiply-adds on CUDA cores that is cheap; decode keeps the panels, read once).
constexpr int64_t kFp8TensorRows = 64;

// Whether product sends this one to cuBLASLt (when that has a plan for it).
inline bool fp8_on_tensor_cores(int kind, const QuantInfo& q, int64_t k, int64_t rows) {
  return kind == kF8 && rows >= kFp8TensorRows && q.group >= k && q.act_group >= k;
}

// y = x . w (y += with accumulate; PackedGlu: silu(gate) * up into the first w.out / 2 columns of
// y, whose rows have room for w.out, the rest scratch: swiglu_mlp's [rows, 2 * inter]) for a checked
// packed quantized w: activations prepared, then one launch; or, where fp8_on_tensor_cores and
// cuBLASLt has an fp8 plan (OUTER_VEC scales: cuBLAS 12.9 on, Hopper or newer), the codes unpacked
// to plain rows, x rounded to fp8 codes with a scale per row (the same rounding), and cuBLASLt's
// product with both scale vectors (SwiGLU after it). The same arithmetic as the CPU's but for the
// order of float32 sums, and the tensor cores' accumulation between cuBLASLt's float32 promotions.
void product(cudaStream_t s, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
             int kind, bool accumulate);

}  // namespace corral::cuda::quant
