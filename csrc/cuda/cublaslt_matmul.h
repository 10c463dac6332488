// Dense products y = x . W on cuBLASLt (csrc/cuda/cublaslt.h loads it): bfloat16 or float16 W and
// x, or float8_e4m3 W and x with float32 scales per output and per row (the OUTER_VEC scale mode;
// fp8 needs W OutIn, "TN" in cuBLAS's terms); float32 sums (CUBLAS_COMPUTE_32F) and float32 y.
// cuBLASLt is column-major; Corral's operands are row-major, and a row-major [r, c] matrix with
// row stride ld is the column-major [c, r] one with leading dimension ld. So, with m = out,
// n = rows, k = in:
//   y [rows, out], stride ldy       = D [out, rows], ld ldy (C = D: accumulating reads y);
//   x [rows, in], stride ldx        = B [in, rows], ld ldx, used as is (transb = N);
//   W OutIn [out, in], stride ldw   = A [in, out], ld ldw, transposed (transa = T);
//   W InOut [in, out], stride ldw   = A [out, in], ld ldw, used as is (transa = N);
// and D = op(A) . B (+ C) is y^T = W^T . x^T, which is y = x . W.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "corral/kernels/linear.h"

namespace corral::cuda {

struct Matmul {
  DType dtype;  // of W and x: BF16, F16 or F8_E4M3
  WeightLayout layout;  // of W: OutIn or InOut (F8_E4M3: OutIn)
  int64_t rows, in, out;
  const void* w;
  int64_t ldw;
  const void* x;  // 16-byte aligned (the plan assumes it; linear stages x in scratch)
  int64_t ldx;
  float* y;
  int64_t ldy;
  bool accumulate;  // y += x . W, else y = x . W (y is then not read)
  // F8_E4M3 only, float32 vectors in device memory: y[r, o] = x_scale[r] * w_scale[o] * (x . W)[r, o].
  const float* w_scale = nullptr;  // [out]
  const float* x_scale = nullptr;  // [rows]
};

// Descriptors and the algorithm cuBLASLt's heuristic picked for one shape (defined in the .cpp).
struct MatmulPlan;

// The plan for m on the current device, cached per (device, dtype, layout, rows, in, out, ldw,
// ldx, ldy, alignment of w and of y), so that decode queries no heuristic after its first step;
// null when cuBLASLt is not loaded or has no algorithm for the shape, or (F8_E4M3) refuses the
// OUTER_VEC scale mode, as cuBLAS before 12.9 does (also cached). DeviceError when a cuBLASLt call
// fails otherwise.
std::shared_ptr<const MatmulPlan> plan_matmul(const Matmul& m);

// Device memory the plan's algorithm needs (up to 32 MiB, NVIDIA's recommendation for Hopper);
// the caller passes it to run_matmul, 256-byte aligned, for the duration of the call's work.
size_t workspace_bytes(const MatmulPlan& plan);

// Enqueues the product on `stream`; m must have the shape and alignments the plan was made for.
void run_matmul(const MatmulPlan& plan, const Matmul& m, void* workspace, cudaStream_t stream);

}  // namespace corral::cuda
