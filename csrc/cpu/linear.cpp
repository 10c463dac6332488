#include <algorithm>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {
// Output columns per work item: OutIn panels are rows of W, InOut panels are column blocks of W.
constexpr int64_t kOutInPanel = 16;
constexpr int64_t kInOutPanel = 64;
// Rows of x per work item: a block of x stays in cache while a W panel streams past it.
constexpr int64_t kRowBlock = 64;
}  // namespace

void linear(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
            bool accumulate) {
  if (rows <= 0 || w.out <= 0) return;
  const int fi = float_index(w.dtype, "linear weight");
  const bool outin = w.layout == WeightLayout::OutIn;
  const GemmPanelFn fn = outin ? isa().gemm_outin[fi] : isa().gemm_inout[fi];
  const int64_t panel = outin ? kOutInPanel : kInOutPanel;
  const int64_t panels = (w.out + panel - 1) / panel;
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  const size_t es = dtype_size(w.dtype);
  const char* base = static_cast<const char*>(w.data);
  // Panel-major order: a thread's consecutive items reuse the same W panel from cache.
  parallel_for(panels * blocks, std::min(rows, kRowBlock) * panel * w.in, [&](int64_t item) {
    const int64_t p = item / blocks, b = item % blocks;
    const int64_t c0 = p * panel, n = std::min(panel, w.out - c0);
    const int64_t r0 = b * kRowBlock, m = std::min(kRowBlock, rows - r0);
    const void* wp = outin ? base + c0 * w.in * es : base + c0 * es;
    const int64_t ldw = outin ? w.in : w.out;
    fn(y + r0 * ldy + c0, ldy, x + r0 * ldx, ldx, m, wp, ldw, n, w.in, accumulate);
  });
}

}  // namespace corral::cpu
