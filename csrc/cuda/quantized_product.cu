// Launches of the quantized products (contract: quantized_product.cuh): the kernels' template
// instances for each code kind, epilogue, row tile and k split (SplitK) live here, once.
#include "quantized_product.cuh"

#include <algorithm>
#include <string>

#include "check.h"
#include "corral/error.h"
#include "cublaslt_matmul.h"
#include "device_limits.h"
#include "grouped_product.cuh"
#include "launch.cuh"
#include "ops.h"
#include "quantized_panel.cuh"
#include "scratch.h"

namespace corral::cuda::quant {

namespace {

// Splits for `blocks` (row tiles x panels) over `units` units of k on `sms` SMs: 1 from 2 * sms
// blocks on, else about 2 * sms blocks in all, at most one per unit (a fixed function of the
// shapes and the device, never of the data).
int split_count(int64_t units, int64_t blocks, int sms) {
  if (blocks >= 2 * int64_t(sms) || units < 2) return 1;
  const int64_t want = std::min(moe_detail::ceil_div(2 * int64_t(sms), blocks), units);
  return int(moe_detail::ceil_div(units, moe_detail::ceil_div(units, want)));
}

template <int Kind, bool Glu, bool Partial>
void launch_kind(cudaStream_t s, const moe_detail::Groups& g, const QuantOperand& routed, const QuantOperand& shared,
                 int64_t max_rows, const dim3& grid, const SplitK& split) {
  // Row tiles of 1 (decode), 8 or kTileM rows: accumulators for no more rows than a tile can have.
  constexpr int kTile = moe_detail::kTileM;
  if (max_rows <= 1)
    quantized_product<Kind, Glu, 1, Partial><<<grid, kCols * lanes_for(1), 0, s>>>(g, routed, shared, split);
  else if (max_rows <= 8)
    quantized_product<Kind, Glu, 8, Partial><<<grid, kCols * lanes_for(8), 0, s>>>(g, routed, shared, split);
  else quantized_product<Kind, Glu, kTile, Partial><<<grid, kCols * lanes_for(kTile), 0, s>>>(g, routed, shared, split);
  CORRAL_CUDA_CHECK_LAUNCH();
}

template <int Kind, bool Glu>
void launch_kind(cudaStream_t s, const moe_detail::Groups& g, const QuantOperand& routed, const QuantOperand& shared,
                 int64_t max_rows, const dim3& grid, const SplitK& split) {
  if (split.splits == 1) return launch_kind<Kind, Glu, false>(s, g, routed, shared, max_rows, grid, split);
  launch_kind<Kind, Glu, true>(s, g, routed, shared, max_rows, grid, split);
  const dim3 sums{grid.x, grid.y};
  const int threads = int(std::min<int64_t>(256, moe_detail::ceil_div(max_rows * (Glu ? kCols / 2 : kCols), 32) * 32));
  quantized_split_sum<Glu><<<sums, threads, 0, s>>>(g, routed, shared, split);
  CORRAL_CUDA_CHECK_LAUNCH();
}

// Bytes of an fp8 row of k codes as cuBLASLt reads them: whole 16-byte pieces, zero-padded.
int64_t fp8_row_bytes(int64_t k) { return moe_detail::round_up(k, 16); }

// fp8_tensor_product's cuBLASLt product of rows x [in -> out] into y, before the operands in
// scratch are known (null: scratch is 256-byte aligned, as the plan assumes).
Matmul fp8_matmul(int64_t rows, int64_t in, int64_t out, float* y, int64_t ldy, bool accumulate) {
  const int64_t kp = fp8_row_bytes(in);
  return Matmul{DType::F8_E4M3, WeightLayout::OutIn, rows, kp, out, nullptr, kp, nullptr, kp, y, ldy, accumulate};
}

// The fp8 product on tensor cores (see product): false, with nothing enqueued, when cuBLASLt has no
// plan for it.
bool fp8_tensor_product(cudaStream_t s, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows,
                        const MatrixRef& w, bool accumulate) {
  const bool glu = w.layout == WeightLayout::PackedGlu;
  const int64_t n = glu ? w.out / 2 : w.out, kp = fp8_row_bytes(w.in);
  // With the SwiGLU epilogue cuBLASLt writes gate and up (w.out columns of y, see product), then
  // silu_mul makes the first half silu(gate) * up in place.
  Matmul m = fp8_matmul(rows, w.in, w.out, y, ldy, accumulate);
  const std::shared_ptr<const MatmulPlan> plan = plan_matmul(m);
  if (!plan) return false;
  const PanelShape ps = panel_shape(kF8, w.quant, w.in);
  const int64_t panels = moe_detail::ceil_div(n, glu ? kCols / 2 : kCols);
  Scratch sc(s);
  const size_t o_w = sc.reserve(size_t(w.out * kp)), o_ws = sc.reserve(size_t(w.out) * sizeof(float)),
               o_x = sc.reserve(size_t(rows * kp)), o_xs = sc.reserve(size_t(rows) * sizeof(float)),
               o_work = sc.reserve(workspace_bytes(*plan));
  sc.allocate();
  m.w = sc.at<char>(o_w);
  m.w_scale = sc.at<float>(o_ws);
  m.x = sc.at<char>(o_x);
  m.x_scale = sc.at<float>(o_xs);
  const dim3 unpack_grid{unsigned(moe_detail::ceil_div(kp, 64)), unsigned(panels)};
  const auto unpack = glu ? unpack_fp8_rows<true> : unpack_fp8_rows<false>;
  unpack<<<unpack_grid, 256, 0, s>>>(sc.at<unsigned char>(o_w), kp, sc.at<float>(o_ws), static_cast<const char*>(w.data),
                                     ps.groups * ps.group_bytes, ps.header, w.quant.scale_dtype, w.in, n);
  CORRAL_CUDA_CHECK_LAUNCH();
  round_fp8_rows<true><<<blocks_for(rows), 256, 0, s>>>(sc.at<char>(o_x), kp, sc.at<float>(o_xs), x, ldx, rows,
                                                         w.in, w.in);
  CORRAL_CUDA_CHECK_LAUNCH();
  run_matmul(*plan, m, sc.at<char>(o_work), s);
  if (glu) silu_mul(s, y, ldy, y, y + n, ldy, rows, n);
  return true;
}

}  // namespace

int checked_kind(const MatrixRef& w, WeightLayout layout, const std::string& what) {
  const QuantInfo& q = w.quant;
  if (w.layout != layout)
    throw NotSupportedError(what + ": CUDA reads this quantized matrix " +
                            (layout == WeightLayout::PackedGlu ? "as an MLP's gate and up packed together "
                                                                 "(kernels::pack_quantized_glu)"
                                                               : "packed (kernels::pack_quantized)") +
                            (w.layout == WeightLayout::PackedGlu ? "; a PackedGlu pair is for swiglu_mlp" : ""));
  const int kind = w.dtype == DType::I8 ? kI8 : w.dtype == DType::I4 ? kI4 : w.dtype == DType::F8_E4M3 ? kF8 : -1;
  if (kind < 0) throw DTypeError(what + ": quantized codes must be int8, int4 or float8_e4m3, not " + dtype_name(w.dtype));
  if (q.scale_dtype != DType::F32 && q.scale_dtype != DType::BF16)
    throw DTypeError(what + ": scales are float32 or bfloat16, not " + dtype_name(q.scale_dtype));
  if (w.in < 1 || w.out < 1 || (layout == WeightLayout::PackedGlu && w.out % 2 != 0))
    throw ShapeError(what + ": a quantized matrix of in " + std::to_string(w.in) + ", out " + std::to_string(w.out) +
                     ": in and out must be positive (a PackedGlu out even)");
  if (kind != kF8 && q.group % kBlock != 0)
    throw ShapeError(what + ": integer groups must be multiples of " + std::to_string(kBlock) + ", got " +
                     std::to_string(q.group));
  if (q.act_group < 0 || (kind == kF8 && q.offsets))
    throw InvalidInputError(what + ": act_group must be >= 0, and fp8 weights have no offsets");
  if (!w.data || reinterpret_cast<uintptr_t>(w.data) % 16 != 0)
    throw InvalidInputError(what + ": the packed weights must be a non-null, 16-byte aligned device pointer");
  return kind;
}

int64_t prepared_bytes(int kind, const QuantInfo& q, int64_t k) {
  if (kind != kF8) return (k + kBlock - 1) / kBlock * kRecordBytes;
  return q.act_group > 0 ? k * int64_t(sizeof(float)) : 0;
}

Prepared prepare(cudaStream_t s, void* dst, const float* x, int64_t ldx, int64_t rows, int64_t k, int kind,
                 const QuantInfo& q) {
  const int64_t ld = prepared_bytes(kind, q, k);
  if (ld == 0) return {x, ldx * int64_t(sizeof(float))};
  if (kind == kF8) {
    round_fp8_rows<false><<<blocks_for(rows * ((k + q.act_group - 1) / q.act_group)), 256, 0, s>>>(
        dst, 0, nullptr, x, ldx, rows, k, q.act_group);
  } else {
    quantize_rows<<<blocks_for(moe_detail::ceil_div(rows * moe_detail::ceil_div(k, kBlock), 8)), 256, 0, s>>>(
        static_cast<char*>(dst), ld, x, ldx, rows, k);
  }
  CORRAL_CUDA_CHECK_LAUNCH();
  return {dst, ld};
}

void launch(cudaStream_t s, const moe_detail::Groups& g, const QuantOperand& routed, const QuantOperand& shared,
            int kind, bool glu, int64_t max_rows, int64_t tiles) {
  const int64_t per = glu ? kCols / 2 : kCols;
  int64_t panels = 0;
  if (g.num_experts > 0) panels = moe_detail::ceil_div(routed.n, per);
  if (g.shared_rows > 0) panels = std::max(panels, moe_detail::ceil_div(shared.n, per));
  if (tiles < 1 || panels < 1) return;
  // The k split (SplitK) when the grid has fewer than two blocks per SM, over the units of k.
  auto units_of = [kind](const QuantOperand& op) {
    const PanelShape ps = panel_shape(kind, op.q, op.k);
    return ps.groups * ps.units;
  };
  int64_t units = 0;
  if (g.num_experts > 0) units = units_of(routed);
  if (g.shared_rows > 0) units = std::max(units, units_of(shared));
  if (tiles > 0x7fffffff || panels > 65535 || units > 0x7fffffff)
    throw ShapeError("quantized product: too large for one CUDA launch (" + std::to_string(tiles) + " row tiles x " +
                     std::to_string(panels) + " panels, " + std::to_string(units) + " units of k)");
  SplitK split;
  split.splits = split_count(units, tiles * panels, sm_count());
  Scratch sc(s);
  if (split.splits > 1) {
    split.rows = int(max_rows);
    const size_t o = sc.reserve(size_t(split.splits * tiles * panels * max_rows * kCols) * sizeof(float));
    sc.allocate();
    split.partial = sc.at<float>(o);
  }
  const dim3 grid{unsigned(tiles), unsigned(panels), unsigned(split.splits)};
  switch (kind * 2 + (glu ? 1 : 0)) {
    case kI8 * 2: return launch_kind<kI8, false>(s, g, routed, shared, max_rows, grid, split);
    case kI8 * 2 + 1: return launch_kind<kI8, true>(s, g, routed, shared, max_rows, grid, split);
    case kI4 * 2: return launch_kind<kI4, false>(s, g, routed, shared, max_rows, grid, split);
    case kI4 * 2 + 1: return launch_kind<kI4, true>(s, g, routed, shared, max_rows, grid, split);
    case kF8 * 2: return launch_kind<kF8, false>(s, g, routed, shared, max_rows, grid, split);
    default: return launch_kind<kF8, true>(s, g, routed, shared, max_rows, grid, split);
  }
}

void product(cudaStream_t s, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
             int kind, bool accumulate) {
  const bool glu = w.layout == WeightLayout::PackedGlu;
  if (glu && ldy < w.out)
    throw InvalidInputError("quantized product: a PackedGlu product's y needs room for gate and up (" +
                            std::to_string(w.out) + " columns), got ldy " + std::to_string(ldy));
  if (fp8_on_tensor_cores(kind, w.quant, w.in, rows) && fp8_tensor_product(s, y, ldy, x, ldx, rows, w, accumulate))
    return;
  Scratch sc(s);
  const size_t o_a = sc.reserve(size_t(rows * prepared_bytes(kind, w.quant, w.in)));
  sc.allocate();
  const Prepared p = prepare(s, sc.at<char>(o_a), x, ldx, rows, w.in, kind, w.quant);
  const QuantOperand op{p.a, p.lda, w.data, 0, y, ldy, glu ? w.out / 2 : w.out, w.in, w.quant, accumulate};
  moe_detail::Groups g;  // the shared side alone: rows [0, rows)
  g.shared_rows = int(rows);
  launch(s, g, QuantOperand{}, op, kind, glu, std::min<int64_t>(rows, moe_detail::kTileM),
         moe_detail::ceil_div(rows, moe_detail::kTileM));
}

}  // namespace corral::cuda::quant

namespace corral::cuda {

bool fp8_tensor_products(int64_t rows, int64_t in, int64_t out) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) {
    cudaGetLastError();  // no driver: clear the error, nothing runs on CUDA here
    return false;
  }
  return devices > 0 && rows >= quant::kFp8TensorRows &&
         plan_matmul(quant::fp8_matmul(rows, in, out, nullptr, out, false)) != nullptr;
}

}  // namespace corral::cuda
