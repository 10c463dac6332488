#include <algorithm>
#include <cmath>

#include "ops.h"

namespace corral::cpu {

void rope_interleaved(float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim,
                      const int32_t* positions, const float* inv_freq) {
  const int64_t half = head_dim / 2;
  parallel_for(tokens, heads * head_dim * 4, [&](int64_t t) {
    // fp32 angle, then accurate cos/sin of it: the reference's rounding at long range.
    float cs[512], sn[512];
    for (int64_t i0 = 0; i0 < half; i0 += 512) {
      const int64_t n = std::min<int64_t>(512, half - i0);
      for (int64_t i = 0; i < n; ++i) {
        const float angle = float(positions[t]) * inv_freq[i0 + i];
        cs[i] = std::cos(angle);
        sn[i] = std::sin(angle);
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + t * ld + h * head_dim + 2 * i0;
        for (int64_t i = 0; i < n; ++i) {
          const float a = v[2 * i], b = v[2 * i + 1];
          v[2 * i] = a * cs[i] - b * sn[i];
          v[2 * i + 1] = a * sn[i] + b * cs[i];
        }
      }
    }
  });
}

}  // namespace corral::cpu
