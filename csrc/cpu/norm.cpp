#include <cmath>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {
template <class W>
void rms_norm_rows(float* y, const float* x, const W* w, int64_t rows, int64_t dim, float eps) {
  parallel_for(rows, dim, [&](int64_t r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    float ss = 0.f;
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / float(dim) + eps);
    if (w) {
      for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] * inv) * to_float_unaligned(w + i);
    } else {
      for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * inv;
    }
  });
}
}  // namespace

void rms_norm(float* y, const float* x, const void* w, DType w_dtype, int64_t rows, int64_t dim,
              float eps) {
  switch (float_index(w_dtype, "rms_norm weight")) {
    case 0: return rms_norm_rows(y, x, static_cast<const float*>(w), rows, dim, eps);
    case 1: return rms_norm_rows(y, x, static_cast<const bf16*>(w), rows, dim, eps);
    default: return rms_norm_rows(y, x, static_cast<const f16*>(w), rows, dim, eps);
  }
}

}  // namespace corral::cpu
