// Products with packed weights: activations prepared once per product, then work items of one
// panel of W and a block of rows, spread over the CPU threads (panel-major: a thread's items
// reuse one panel from cache while the rows stream past it).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

int gemm_kind(DType dtype, Activations act) {
  if (dtype == DType::I8) return kGemmI8;
  if (dtype == DType::I4) return kGemmI4;
  if (dtype == DType::F8_E4M3) return kGemmF8;
  const int kind = float_index(dtype, "weight matrix");  // 0, 1, 2 are kGemmF32, kGemmBf16, kGemmF16
  return act == Activations::Float32 && kind == kGemmBf16 ? kGemmBf16Exact : kind;
}

int64_t output_width(const MatrixRef& w) { return w.layout == WeightLayout::PackedGlu ? w.out / 2 : w.out; }
int64_t panel_outputs(const MatrixRef& w) { return w.layout == WeightLayout::PackedGlu ? kPanelCols / 2 : kPanelCols; }
int64_t num_panels(const MatrixRef& w) { return (output_width(w) + panel_outputs(w) - 1) / panel_outputs(w); }

void* scratch(int slot, int64_t bytes) {
  thread_local std::vector<float> buffers[6];
  std::vector<float>& b = buffers[slot];
  const size_t floats = size_t((bytes + 3) / 4);
  if (b.size() < floats) b.resize(floats);
  return b.data();
}

// x rounded to fp8 e4m3 per token and per run of `group` k, with the run's scale max|x| / 448
// (as compressed-tensors' dynamic fp8 activations), into buf.
const float* round_fp8(float* buf, const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t group) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k0 = 0; k0 < k; k0 += group) {
      const float* src = x + r * ldx + k0;
      float* dst = buf + r * k + k0;
      const int64_t n = std::min(group, k - k0);
      float amax = 0.f;
      for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(src[i]));
      const float s = amax / 448.f;
      for (int64_t i = 0; i < n; ++i) dst[i] = amax > 0.f ? to_float(to_fp8_e4m3(src[i] / s)) * s : 0.f;
    }
  return buf;
}

PreparedX prepare_in(void* buf, const float* x, int64_t ldx, int64_t rows, int64_t k, int kind, int64_t act_group) {
  if (kind == kGemmF8 && act_group > 0) return {round_fp8(static_cast<float*>(buf), x, ldx, rows, k, act_group), k};
  return isa().prepare_x[kind](buf, x, ldx, rows, k);
}

PreparedX prepare(int slot, const float* x, int64_t ldx, int64_t rows, int64_t k, int kind, int64_t act_group) {
  return prepare_in(scratch(slot, rows * prepared_row_words(kind, k) * 4), x, ldx, rows, k, kind, act_group);
}

void gemm_panel(float* y, int64_t ldy, const PreparedX& x, int64_t x_row, int64_t rows, const MatrixRef& w, int kind,
                int64_t panel, bool accumulate) {
  const int64_t per = panel_outputs(w), c0 = panel * per, n = std::min(per, output_width(w) - c0);
  const char* p = static_cast<const char*>(w.data) + panel * panel_bytes(w);
  const PanelGemmFn fn = w.layout == WeightLayout::PackedGlu ? isa().gemm_glu[kind] : isa().gemm[kind];
  fn(y + c0, ldy, static_cast<const uint32_t*>(x.x) + x_row * x.ld, x.ld, rows, p, w.in, n, accumulate, w.quant);
}

void product(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w, int kind,
             bool accumulate) {
  if (rows <= 0 || w.out <= 0) return;
  if (!w.packed())
    throw InvalidInputError("CPU products read packed weights (kernels::pack_weights / pack_glu)");
  if (w.layout == WeightLayout::PackedGlu && accumulate)
    throw InvalidInputError("a GLU product writes its outputs; it cannot accumulate");
  const PreparedX px = prepare(0, x, ldx, rows, w.in, kind, w.quant.act_group);
  const int64_t panels = num_panels(w), blocks = (rows + kRowBlock - 1) / kRowBlock, items = panels * blocks;
  // Contiguous shares (handing panels out one by one breaks the streams the prefetchers follow:
  // decode about 1.3x slower), balanced at their ends.
  parallel_shares(items, std::min(rows, kRowBlock) * panel_outputs(w) * w.in, [&](int64_t item) {
    const int64_t r0 = (item % blocks) * kRowBlock;
    gemm_panel(y + r0 * ldy, ldy, px, r0, std::min(kRowBlock, rows - r0), w, kind, item / blocks, accumulate);
  });
}

void linear(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
            bool accumulate, Activations act) {
  if (w.layout == WeightLayout::PackedGlu)
    throw InvalidInputError("linear: a PackedGlu matrix is the gate and up of an MLP; use swiglu_mlp");
  product(y, ldy, x, ldx, rows, w, gemm_kind(w.dtype, act), accumulate);
}

namespace {
template <class T>
void add_rows_of(float* y, int64_t ldy, int64_t rows, const T* src, int64_t n, int64_t src_rows) {
  parallel_for(rows, n, [&](int64_t r) {
    const T* s = src + (r % src_rows) * n;
    float* yr = y + r * ldy;
    for (int64_t i = 0; i < n; ++i) yr[i] += to_float_unaligned(s + i);
  });
}
}  // namespace

void add_rows(float* y, int64_t ldy, int64_t rows, const void* src, DType dtype, int64_t n, int64_t src_rows) {
  switch (float_index(dtype, "add_rows source")) {
    case 0: return add_rows_of(y, ldy, rows, static_cast<const float*>(src), n, src_rows);
    case 1: return add_rows_of(y, ldy, rows, static_cast<const bf16*>(src), n, src_rows);
    default: return add_rows_of(y, ldy, rows, static_cast<const f16*>(src), n, src_rows);
  }
}

}  // namespace corral::cpu
