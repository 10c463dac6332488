#include "corral/kernels/quantize.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
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
    const float t = std::clamp(x[i] * inv, float(lo), float(hi));
    q[i] = int8_t(round_even(t));
    const double e = double(x[i]) - double(s) * q[i];
    err += e * e;
  }
  return err;
}

// The squared error of scale s alone (no codes stored): plain float arithmetic in 8 lanes that
// the compiler vectorizes, for the many candidates of the search.
float error_of(const float* x, int64_t n, float s, float lo, float hi) {
  const float inv = s > 0.f ? 1.f / s : 0.f;
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      float t = x[i + j] * inv;
      t = t < lo ? lo : t;
      t = t > hi ? hi : t;
      const float e = x[i + j] - s * round_even(t);
      acc[j] += e * e;
    }
  for (; i < n; ++i) {
    const float e = x[i] - s * round_even(std::fmin(std::fmax(x[i] * inv, lo), hi));
    acc[0] += e * e;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// The scale of one I4 group (see quantize_weights), its codes in q: the best candidate
// max|x| / d, then its least-squares refit for the codes it gives if that is better.
float search_int4(const float* x, int64_t n, DType scale_dtype, int8_t* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  if (amax == 0.f) {
    std::fill(q, q + n, int8_t(0));
    return 0.f;
  }
  float best_s = 0.f, best = std::numeric_limits<float>::max();
  for (int d = 12; d <= 18; ++d) {
    const float s = rounded_scale(amax / (0.5f * float(d)), scale_dtype);
    const float err = s > 0.f ? error_of(x, n, s, -8.f, 7.f) : std::numeric_limits<float>::max();
    if (err < best) best = err, best_s = s;
  }
  fit(x, n, best_s, -8, 7, q);
  double xq = 0, qq = 0;
  for (int64_t i = 0; i < n; ++i) {
    xq += double(x[i]) * q[i];
    qq += double(q[i]) * q[i];
  }
  const float refit = qq > 0 ? rounded_scale(float(xq / qq), scale_dtype) : 0.f;
  if (refit > 0.f && error_of(x, n, refit, -8.f, 7.f) < best) best_s = refit;
  fit(x, n, best_s, -8, 7, q);
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
  // One row buffer per thread, allocated here: an allocation failing inside the parallel region
  // could not be reported (an exception may not leave it).
  std::vector<float> rows(size_t(omp_get_max_threads()) * size_t(K));
#pragma omp parallel
  {
    float* row = rows.data() + size_t(omp_get_thread_num()) * size_t(K);
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < N; ++r) {
      for (int64_t k = 0; k < K; ++k) row[k] = element(w, r, k);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group, n = std::min(group, K - k0);
        int8_t* q = b.codes.data() + r * K + k0;
        float& s = b.scales[r * groups + g];
        if (dtype == DType::I4) {
          s = search_int4(row + k0, n, scale_dtype, q);
        } else {
          float amax = 0.f;
          for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(row[k0 + i]));
          s = rounded_scale(amax / 127.f, scale_dtype);
          fit(row + k0, n, s, -127, 127, q);
        }
      }
    }
  }
  return b;
}

}  // namespace corral::kernels
