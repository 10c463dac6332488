#include "corral/kernels/quantize.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "corral/error.h"
#include "isa.h"

namespace corral::kernels {

namespace {

float element(const MatrixRef& w, int64_t row, int64_t k) {
  const int64_t i = w.layout == WeightLayout::OutIn ? row * w.row_stride() + k : k * w.row_stride() + row;
  switch (w.dtype) {
    case DType::F32: return static_cast<const float*>(w.data)[i];
    case DType::BF16: return to_float(static_cast<const bf16*>(w.data)[i]);
    default: return to_float(static_cast<const f16*>(w.data)[i]);
  }
}

float rounded_scale(float s, DType t) { return t == DType::BF16 ? to_float(to_bf16(s)) : s; }

// x rounded to the nearest integer, ties to even, for |x| < 2^22 (without a libm call: the
// baseline build has no rounding instruction).
inline float round_even(float x) {
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
  return (x + kMagic) - kMagic;
}

// Codes of x[0:n) for scale s in [lo, hi], and their squared error.
double fit(const float* x, int64_t n, float s, int lo, int hi, int8_t* q) {
  double err = 0;
  const float inv = s > 0.f ? 1.f / s : 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float t = std::clamp(x[i] * inv, float(lo) - 1.f, float(hi) + 1.f);
    const int v = std::clamp(int(round_even(t)), lo, hi);
    q[i] = int8_t(v);
    const double e = double(x[i]) - double(s) * v;
    err += e * e;
  }
  return err;
}

// The scale of one I4 group (see quantize_weights), its codes in q.
float search_int4(const float* x, int64_t n, DType scale_dtype, int8_t* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  if (amax == 0.f) {
    std::fill(q, q + n, int8_t(0));
    return 0.f;
  }
  int8_t trial[256];
  float best_s = 0.f;
  double best = INFINITY;
  const auto consider = [&](float s) {
    s = rounded_scale(s, scale_dtype);
    if (!(s > 0.f)) return;
    const double err = fit(x, n, s, -8, 7, trial);
    if (err < best) {
      best = err;
      best_s = s;
      std::copy(trial, trial + n, q);
    }
  };
  for (int d = 30; d <= 45; ++d) {
    const float s = amax / (0.2f * float(d));
    consider(s);
    // Least squares for these codes: s' = sum(x q) / sum(q^2).
    double xq = 0, qq = 0;
    fit(x, n, rounded_scale(s, scale_dtype), -8, 7, trial);
    for (int64_t i = 0; i < n; ++i) {
      xq += double(x[i]) * trial[i];
      qq += double(trial[i]) * trial[i];
    }
    if (qq > 0) consider(float(xq / qq));
  }
  return best_s;
}

}  // namespace

QuantizedBuffer quantize_weights(const MatrixRef& w, DType dtype, int64_t group, DType scale_dtype) {
  if (w.packed() || w.quantized()) throw InvalidInputError("quantize_weights: w must be a plain float matrix");
  cpu::float_index(w.dtype, "quantize_weights");
  if (dtype != DType::I8 && dtype != DType::I4)
    throw DTypeError(std::string("quantize_weights: codes must be int8 or int4, not ") + dtype_name(dtype));
  if (scale_dtype != DType::F32 && scale_dtype != DType::BF16)
    throw DTypeError("quantize_weights: scales are float32 or bfloat16");
  const int64_t K = w.in, N = w.out;
  if (dtype == DType::I8) group = (K + kQuantBlock - 1) / kQuantBlock * kQuantBlock;
  if (group < kQuantBlock || group % kQuantBlock != 0 || (dtype == DType::I4 && group > 256))
    throw ShapeError("quantize_weights: int4 groups must be multiples of " + std::to_string(kQuantBlock) +
                     " up to 256, got " + std::to_string(group));
  const int64_t groups = (K + group - 1) / group;
  QuantizedBuffer b;
  b.dtype = dtype;
  b.out = N;
  b.in = K;
  b.group = group;
  b.codes.resize(size_t(N * K));
  b.scales.resize(size_t(N * groups));
#pragma omp parallel
  {
    std::vector<float> row(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < N; ++r) {
      for (int64_t k = 0; k < K; ++k) row[k] = element(w, r, k);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group, n = std::min(group, K - k0);
        int8_t* q = b.codes.data() + r * K + k0;
        float& s = b.scales[r * groups + g];
        if (dtype == DType::I4) {
          s = search_int4(row.data() + k0, n, scale_dtype, q);
        } else {
          float amax = 0.f;
          for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(row[k0 + i]));
          s = rounded_scale(amax / 127.f, scale_dtype);
          fit(row.data() + k0, n, s, -127, 127, q);
        }
      }
    }
  }
  return b;
}

}  // namespace corral::kernels
