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

template <class W>
void layer_norm_rows(float* y, const float* x, const W* w, const W* b, int64_t rows, int64_t dim, float eps) {
  parallel_for(rows, dim * 2, [&](int64_t r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double sum = 0.0, sq = 0.0;
    for (int64_t i = 0; i < dim; ++i) sum += xr[i];
    const double mean = sum / double(dim);
    for (int64_t i = 0; i < dim; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
    const float m = float(mean), inv = float(1.0 / std::sqrt(sq / double(dim) + double(eps)));
    for (int64_t i = 0; i < dim; ++i) {
      const float n = (xr[i] - m) * inv * to_float_unaligned(w + i);
      yr[i] = b ? n + to_float_unaligned(b + i) : n;
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

void layer_norm(float* y, const float* x, const void* w, const void* b, DType w_dtype, int64_t rows, int64_t dim,
                float eps) {
  switch (float_index(w_dtype, "layer_norm weight")) {
    case 0: return layer_norm_rows(y, x, static_cast<const float*>(w), static_cast<const float*>(b), rows, dim, eps);
    case 1: return layer_norm_rows(y, x, static_cast<const bf16*>(w), static_cast<const bf16*>(b), rows, dim, eps);
    default: return layer_norm_rows(y, x, static_cast<const f16*>(w), static_cast<const f16*>(b), rows, dim, eps);
  }
}

}  // namespace corral::cpu
