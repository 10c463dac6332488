// Dense products on CUDA (contracts: corral/kernels/linear.h linear, mlp.h swiglu_mlp) with
// unpacked float32, bfloat16 or float16 weights in device memory, OutIn or InOut, any row stride:
//   - 16-bit weights with Activations::Native: x rounded to the weight dtype (nearest even) into
//     scratch, then cuBLASLt with float32 sums (cublaslt_matmul.h);
//   - packed quantized weights (int8, int4, fp8; the CPU's layout): quantized_product.cuh;
//   - everything else, and shapes cuBLASLt has no algorithm for or runs without it: the MoE's
//     grouped product as a dense product (grouped_product.cuh) with the same numerics: a GEMV up
//     to kMaxGemvRows rows, above that tensor cores (Native 16-bit) or CUDA cores (float32
//     activations, 16-bit weights widened exactly).
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "check.h"
#include "convert.cuh"
#include "corral/error.h"
#include "corral/kernels/mlp.h"
#include "cublaslt_matmul.h"
#include "grouped_product.cuh"
#include "launch.cuh"
#include "ops.h"
#include "quantized_product.cuh"
#include "scratch.h"

namespace corral::cuda {

namespace {

using namespace moe_detail;

constexpr int kThreads = 256;

// dst[r, 0:n] = src[r, 0:n] rounded to R (nearest even), stored as Out; dst[r, n:ld_dst] = 0 (the
// products read whole 16-byte pieces).
template <class Out, class R>
__global__ void stage_rows_kernel(Out* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                                  int64_t n) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < ld_dst; i += int64_t(gridDim.x) * blockDim.x)
      dst[r * ld_dst + i] = from_f32<Out>(i < n ? to_f32(from_f32<R>(src[r * ld_src + i])) : 0.0f);
}

// x's rows as a product reads them, into dst (rows ld elements apart): rounded to `round_to` and
// stored as `stored` (round_to itself, or float32).
void stage_rows(cudaStream_t s, void* dst, DType stored, int64_t ld, const float* x, int64_t ldx, int64_t rows,
                int64_t in, DType round_to) {
  with_float_type(round_to, "linear activations", [&](auto tag) {
    using R = typename decltype(tag)::type;
    const dim3 grid = rows_cols_grid(rows, ld, kThreads);
    if (stored == DType::F32)
      stage_rows_kernel<float, R><<<grid, kThreads, 0, s>>>(static_cast<float*>(dst), ld, x, ldx, rows, in);
    else
      stage_rows_kernel<R, R><<<grid, kThreads, 0, s>>>(static_cast<R*>(dst), ld, x, ldx, rows, in);
    CORRAL_CUDA_CHECK_LAUNCH();
  });
}

// The float weights CUDA's products read: unpacked float32 / bfloat16 / float16 matrices.
void check_weights(const MatrixRef& w, const std::string& op) {
  if (w.dtype == DType::I8 || w.dtype == DType::I4 || w.dtype == DType::F8_E4M3)
    throw InvalidInputError(op + ": " + dtype_name(w.dtype) + " weights need their QuantInfo (quant.group >= 1)");
  if (w.packed())
    throw NotSupportedError(op + ": CUDA reads float weights unpacked (OutIn or InOut), not in the CPU's packed "
                            "layout; only quantized weights are packed");
  if (w.dtype != DType::F32 && w.dtype != DType::BF16 && w.dtype != DType::F16)
    throw DTypeError(op + ": weights of " + dtype_name(w.dtype) +
                     " are not supported on CUDA (float32, bfloat16 and float16 are)");
  const int64_t min_ld = w.layout == WeightLayout::OutIn ? w.in : w.out;
  if (w.in < 1 || w.out < 1 || w.row_stride() < min_ld)
    throw ShapeError(op + ": a weight matrix of in " + std::to_string(w.in) + ", out " + std::to_string(w.out) +
                     ", ld " + std::to_string(w.ld) + ": in and out must be positive and ld 0 (dense) or at least " +
                     std::to_string(min_ld));
  if (!w.data) throw InvalidInputError(op + ": the weight pointer is null");
}

void check_rows(int64_t rows, const std::string& op) {
  if (rows < 0 || rows > kMaxRows)
    throw ShapeError(op + ": rows " + std::to_string(rows) + " must be in [0, 2^30]");
}

}  // namespace

void linear(void* stream, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
            bool accumulate, kernels::Activations act) {
  const int kind = w.quantized() ? quant::checked_kind(w, WeightLayout::Packed, "linear") : -1;
  if (kind < 0) check_weights(w, "linear");
  check_rows(rows, "linear");
  if (ldx < w.in || ldy < w.out)
    throw ShapeError("linear: ldx " + std::to_string(ldx) + " and ldy " + std::to_string(ldy) +
                     " must be at least in " + std::to_string(w.in) + " and out " + std::to_string(w.out));
  if (rows == 0) return;
  if (!x || !y) throw InvalidInputError("linear: x and y must not be null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (kind >= 0) return quant::product(s, y, ldy, x, ldx, rows, w, kind, accumulate);
  // Native products of 16-bit weights read the activations rounded to the weight dtype.
  const bool rounded = act == kernels::Activations::Native && w.dtype != DType::F32;
  const int64_t kp = round_up(w.in, 8);  // staged rows: whole 16-byte pieces
  Scratch sc(s);

  if (rounded) {
    Matmul m{w.dtype, w.layout, rows, w.in, w.out, w.data, w.row_stride(), nullptr, kp, y, ldy, accumulate};
    if (const std::shared_ptr<const MatmulPlan> plan = plan_matmul(m)) {
      const size_t workspace = workspace_bytes(*plan);
      const size_t o_x = sc.reserve(size_t(rows * kp) * dtype_size(w.dtype)), o_ws = sc.reserve(workspace);
      sc.allocate();
      m.x = sc.at<char>(o_x);
      stage_rows(s, sc.at<char>(o_x), w.dtype, kp, x, ldx, rows, w.in, w.dtype);
      run_matmul(*plan, m, workspace ? sc.at<char>(o_ws) : nullptr, s);
      return;
    }
  }

  // Corral's own kernels. They read x itself (CUDA cores; the GEMV where x's rows are whole 16-byte
  // pieces) or its rows staged: rounded to the weight dtype where `rounded` (tensor cores store
  // them in that dtype, the GEMV as float32), zero-padded to kp.
  const Path path = rows <= kMaxGemvRows ? Path::Gemv : rounded ? Path::TensorCore : Path::CudaCore;
  const bool direct = path == Path::CudaCore || (!rounded && aligned16(x) && ldx % 8 == 0 && w.in % 8 == 0);
  const void* a = x;
  int64_t lda = ldx;
  if (!direct) {
    const DType stored = path == Path::TensorCore ? w.dtype : DType::F32;
    const size_t o_a = sc.reserve(size_t(rows * kp) * dtype_size(stored));
    sc.allocate();
    stage_rows(s, sc.at<char>(o_a), stored, kp, x, ldx, rows, w.in, rounded ? w.dtype : DType::F32);
    a = sc.at<char>(o_a);
    lda = kp;
  }
  Operand op = matrix_operand(a, lda, w, y, ldy, w.out, w.in);
  op.accumulate = accumulate;
  dense_product("linear", s, op, rows, w.dtype, path);
}

void swiglu_mlp(void* stream, float* out, const float* x, int64_t rows, const MatrixRef& gate_up,
                const MatrixRef& down, kernels::Activations act) {
  const int kind = gate_up.quantized() ? quant::checked_kind(gate_up, WeightLayout::PackedGlu, "swiglu_mlp gate_up") : -1;
  if (kind < 0) check_weights(gate_up, "swiglu_mlp");
  if (!down.quantized()) check_weights(down, "swiglu_mlp");  // linear checks a quantized down
  const int64_t hidden = gate_up.in, inter = gate_up.out / 2;
  if (gate_up.out % 2 != 0 || down.in != inter || down.out != hidden)
    throw ShapeError("swiglu_mlp: gate_up must have 2 * inter outputs (gate, then up) for hidden inputs, and down "
                     "inter inputs and hidden outputs; got gate_up in " + std::to_string(hidden) + ", out " +
                     std::to_string(gate_up.out) + ", down in " + std::to_string(down.in) + ", out " +
                     std::to_string(down.out));
  check_rows(rows, "swiglu_mlp");
  if (rows == 0) return;
  if (!x || !out) throw InvalidInputError("swiglu_mlp: x and out must not be null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  Scratch sc(s);
  const size_t o_h = sc.reserve(size_t(rows * 2 * inter) * sizeof(float));
  sc.allocate();
  float* h = sc.at<float>(o_h);  // [rows, 2 * inter]: x . gate, then x . up
  if (kind >= 0) {
    quant::product(s, h, 2 * inter, x, hidden, rows, gate_up, kind, false);  // silu(gate) * up, in the epilogue
  } else {
    linear(stream, h, 2 * inter, x, hidden, rows, gate_up, false, act);
    // silu(gate) * up over the gate half, in place (each element is read, then written, by one thread).
    silu_mul(stream, h, 2 * inter, h, h + inter, 2 * inter, rows, inter);
  }
  linear(stream, out, hidden, h, 2 * inter, rows, down, true, act);
}

}  // namespace corral::cuda
