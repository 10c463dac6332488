// Launches of the grouped matrix product (contract: grouped_product.cuh): the kernels' template
// instances for each weight dtype, path, SwiGLU epilogue and vector width live here, once.
#include "grouped_product.cuh"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "check.h"
#include "corral/error.h"
#include "moe_gemm_simt.cuh"
#include "moe_gemm_tc.cuh"
#include "moe_gemv.cuh"

namespace corral::cuda::moe_detail {

namespace {

// B can be read in 16-byte pieces of `elems` elements: every row (and every expert's matrix)
// starts 16-byte aligned and the contiguous extent is a whole number of pieces.
bool vector_ok(const Operand& op, bool swiglu, int64_t elems) {
  const int64_t contiguous = op.n_major ? op.k : op.n;
  return contiguous % elems == 0 && op.ldb % elems == 0 && op.b_stride % elems == 0 && aligned16(op.b0) &&
         (!swiglu || aligned16(op.b1));
}

bool vec(const Product& p, int64_t elems) {
  return (!p.has_routed() || vector_ok(p.routed, p.swiglu, elems)) &&
         (!p.has_shared() || vector_ok(p.shared, p.swiglu, elems));
}

// Grid of the GEMM kernels: x = M tiles for the worst case of the device-side counts (every
// expert's last tile partial), y = N tiles.
dim3 gemm_grid(const Product& p) {
  int64_t x = 0, y = 0;
  if (p.has_routed()) {
    x += ceil_div(p.pairs, kTileM) + std::min(p.experts, p.pairs);
    y = std::max(y, ceil_div(p.routed.n, kTileN));
  }
  if (p.has_shared()) {
    x += ceil_div(p.tokens, kTileM);
    y = std::max(y, ceil_div(p.shared.n, kTileN));
  }
  if (x > 0x7fffffff || y > 65535)
    throw ShapeError(std::string(p.what) + ": the products are too large for one CUDA launch (" + std::to_string(x) +
                     " x " + std::to_string(y) + " tiles)");
  return dim3(unsigned(x), unsigned(y));
}

template <class W, bool Swiglu>
void launch_tc(const Product& p) {
  const dim3 grid = gemm_grid(p);
  if (vec(p, 8))
    grouped_gemm_tc<W, Swiglu, true><<<grid, tc::kThreads, 0, p.stream>>>(p.g, p.routed, p.shared);
  else
    grouped_gemm_tc<W, Swiglu, false><<<grid, tc::kThreads, 0, p.stream>>>(p.g, p.routed, p.shared);
  CORRAL_CUDA_CHECK_LAUNCH();
}

template <class W, bool Swiglu>
void launch_simt(const Product& p) {
  grouped_gemm_simt<W, Swiglu><<<gemm_grid(p), simt::kThreads, 0, p.stream>>>(p.g, p.routed, p.shared);
  CORRAL_CUDA_CHECK_LAUNCH();
}

template <class W, int R, bool Swiglu>
void launch_gemv_rows(const Product& p) {
  constexpr int64_t VW = Vec16<W>::kElems;
  const bool v = vec(p, VW);
  auto cols = [&](const Operand& op) -> int64_t {
    if (op.n_major) return gemv::nmajor_cols<Swiglu>();
    return v ? gemv::kmajor_cols<int(VW), Swiglu>() : gemv::kmajor_cols<1, Swiglu>();
  };
  int64_t x = 0;
  if (p.has_routed()) x = std::max(x, ceil_div(p.routed.n, cols(p.routed)));
  if (p.has_shared()) x = std::max(x, ceil_div(p.shared.n, cols(p.shared)));
  if (x > 0x7fffffff || p.gemv_chunks > 65535)
    throw ShapeError(std::string(p.what) + ": the products are too large for one CUDA launch");
  const dim3 grid(unsigned(x), unsigned(p.g.routed_slots + (p.has_shared() ? 1 : 0)), unsigned(p.gemv_chunks));
  if (v)
    grouped_gemv<W, R, Swiglu, true><<<grid, gemv::kThreads, 0, p.stream>>>(p.g, p.routed, p.shared);
  else
    grouped_gemv<W, R, Swiglu, false><<<grid, gemv::kThreads, 0, p.stream>>>(p.g, p.routed, p.shared);
  CORRAL_CUDA_CHECK_LAUNCH();
}

template <class W, bool Swiglu>
void launch_gemv(const Product& p) {
  switch (p.gemv_rows) {
    case 1: return launch_gemv_rows<W, 1, Swiglu>(p);
    case 2: return launch_gemv_rows<W, 2, Swiglu>(p);
    case 4: return launch_gemv_rows<W, 4, Swiglu>(p);
    default: return launch_gemv_rows<W, kMaxGemvRows, Swiglu>(p);
  }
}

template <class W>
void launch_typed(const Product& p, Path path) {
  switch (path) {
    case Path::Gemv: return p.swiglu ? launch_gemv<W, true>(p) : launch_gemv<W, false>(p);
    case Path::CudaCore: return p.swiglu ? launch_simt<W, true>(p) : launch_simt<W, false>(p);
    case Path::TensorCore:
      if constexpr (std::is_same<W, float>::value) {
        throw NotSupportedError(std::string(p.what) + ": no tensor-core path for float32 weights");
      } else {
        return p.swiglu ? launch_tc<W, true>(p) : launch_tc<W, false>(p);
      }
  }
}

}  // namespace

Operand matrix_operand(const void* a, int64_t lda, const MatrixRef& m, void* c, int64_t ldc, int64_t n, int64_t k) {
  Operand op;
  op.a = a;
  op.lda = lda;
  op.b0 = m.data;
  op.n_major = m.layout == WeightLayout::OutIn;
  op.ldb = m.row_stride();
  op.c = c;
  op.ldc = ldc;
  op.n = n;
  op.k = k;
  return op;
}

void launch(const Product& p, DType weights, Path path) {
  switch (weights) {
    case DType::F32: return launch_typed<float>(p, path);
    case DType::BF16: return launch_typed<__nv_bfloat16>(p, path);
    case DType::F16: return launch_typed<__half>(p, path);
    default:
      throw DTypeError(std::string(p.what) + ": weights of " + dtype_name(weights) + " are not supported on CUDA");
  }
}

void dense_product(const char* what, cudaStream_t stream, const Operand& op, int64_t rows, DType weights, Path path) {
  const int r = gemv_rows_for(rows);
  Product p{what, stream, Groups{}, Operand{}, op, false, 0, rows, 0, r, int(ceil_div(rows, r))};
  p.g.shared_rows = int(rows);
  launch(p, weights, path);
}

}  // namespace corral::cuda::moe_detail
