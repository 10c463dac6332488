#include <algorithm>
#include <cmath>

#include "ops.h"

namespace corral::cpu {

namespace {

// Rotates pairs [i0, i0 + n) of every head of one token (its row at v, heads head_dim apart) by
// angle(i) for i < n: an fp32 angle, then accurate cos/sin of it (the reference's rounding at
// long range).
template <class Angle>
void rotate_pairs(float* v, int64_t heads, int64_t head_dim, int64_t i0, int64_t n, Angle angle) {
  float cs[512], sn[512];
  for (int64_t j0 = 0; j0 < n; j0 += 512) {
    const int64_t m = std::min<int64_t>(512, n - j0);
    for (int64_t j = 0; j < m; ++j) {
      const float a = angle(j0 + j);
      cs[j] = std::cos(a);
      sn[j] = std::sin(a);
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* p = v + h * head_dim + 2 * (i0 + j0);
      for (int64_t j = 0; j < m; ++j) {
        const float a = p[2 * j], b = p[2 * j + 1];
        p[2 * j] = a * cs[j] - b * sn[j];
        p[2 * j + 1] = a * sn[j] + b * cs[j];
      }
    }
  }
}

}  // namespace

void rope_interleaved(float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim,
                      const int32_t* positions, const float* inv_freq) {
  parallel_for(tokens, heads * head_dim * 4, [&](int64_t t) {
    const float p = float(positions[t]);
    rotate_pairs(x + t * ld, heads, head_dim, 0, head_dim / 2, [&](int64_t i) { return p * inv_freq[i]; });
  });
}

void rope_2d(float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim, const int32_t* pos_x,
             const int32_t* pos_y, const float* inv_freq) {
  const int64_t quarter = head_dim / 4;
  parallel_for(tokens, heads * head_dim * 4, [&](int64_t t) {
    const float px = float(pos_x[t]), py = float(pos_y[t]);
    rotate_pairs(x + t * ld, heads, head_dim, 0, quarter, [&](int64_t i) { return px * inv_freq[i]; });
    rotate_pairs(x + t * ld, heads, head_dim, quarter, quarter, [&](int64_t i) { return py * inv_freq[i]; });
  });
}

}  // namespace corral::cpu
