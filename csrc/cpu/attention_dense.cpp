#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace corral::cpu {

namespace {
// Query rows whose scores are held at once (rows x len floats).
constexpr int64_t kQueryRows = 32;
}  // namespace

void attention_dense(float* out, const float* q, const float* k, const float* v, int64_t ld, int64_t seqs,
                     int64_t len, int64_t heads, int64_t head_dim, float scale) {
  const int64_t d = head_dim, width = heads * head_dim;
  // One item per (sequence, head). Its keys are transposed first, so that both products run as
  // axpy loops over contiguous rows (which vectorize without reassociating any sum).
  parallel_for(seqs * heads, len * len * d, [&](int64_t item) {
    const int64_t seq = item / heads, h = item % heads, row0 = seq * len;
    std::vector<float> kt(size_t(d * len)), s(size_t(kQueryRows * len)), o(size_t(kQueryRows * d));
    for (int64_t j = 0; j < len; ++j)
      for (int64_t c = 0; c < d; ++c) kt[size_t(c * len + j)] = k[(row0 + j) * ld + h * d + c];
    for (int64_t i0 = 0; i0 < len; i0 += kQueryRows) {
      const int64_t rows = std::min(kQueryRows, len - i0);
      for (int64_t i = 0; i < rows; ++i) {
        const float* qi = q + (row0 + i0 + i) * ld + h * d;
        float* si = s.data() + i * len;
        std::fill(si, si + len, 0.f);
        for (int64_t c = 0; c < d; ++c) {
          const float a = qi[c];
          const float* kc = kt.data() + c * len;
          for (int64_t j = 0; j < len; ++j) si[j] += a * kc[j];
        }
        float m = -INFINITY;
        for (int64_t j = 0; j < len; ++j) m = std::max(m, si[j] *= scale);
        float sum = 0.f;
        for (int64_t j = 0; j < len; ++j) sum += si[j] = std::exp(si[j] - m);
        const float inv = 1.f / sum;
        float* oi = o.data() + i * d;
        std::fill(oi, oi + d, 0.f);
        for (int64_t j = 0; j < len; ++j) {
          const float p = si[j] * inv;
          const float* vj = v + (row0 + j) * ld + h * d;
          for (int64_t c = 0; c < d; ++c) oi[c] += p * vj[c];
        }
        std::copy(oi, oi + d, out + (row0 + i0 + i) * width + h * d);
      }
    }
  });
}

}  // namespace corral::cpu
