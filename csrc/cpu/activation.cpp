#include <cmath>

#include "ops.h"

namespace corral::cpu {

void silu_mul(float* out, int64_t ld_out, const float* gate, const float* up, int64_t ld_in,
              int64_t rows, int64_t n) {
  parallel_for(rows, n * 8, [&](int64_t r) {
    const float* g = gate + r * ld_in;
    const float* u = up + r * ld_in;
    float* o = out + r * ld_out;
    for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  });
}

void gelu(float* x, int64_t ld, int64_t rows, int64_t n) {
  parallel_for(rows, n * 16, [&](int64_t r) {
    float* v = x + r * ld;
    for (int64_t i = 0; i < n; ++i) v[i] = 0.5f * v[i] * (1.0f + std::erf(v[i] * float(M_SQRT1_2)));
  });
}

}  // namespace corral::cpu
