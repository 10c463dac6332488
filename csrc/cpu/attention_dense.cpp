#include <algorithm>
#include <cmath>
#include <vector>

#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {
// Query rows whose scores are held at once (rows x len floats).
constexpr int64_t kQueryRows = 32;
}  // namespace

void attention_dense(float* out, const float* q, const float* k, const float* v, int64_t ld, int64_t seqs,
                     int64_t len, int64_t heads, int64_t head_dim, float scale) {
  const int64_t d = head_dim, width = heads * head_dim;
  const IsaKernels& isa_kernels = isa();
  // One item per (sequence, head): its keys transposed and its values gathered, then the paged
  // attention's vectorized steps (scores, softmax, P.V) over all of them as one block, so every
  // row's softmax is exact in one pass.
  parallel_for(seqs * heads, len * len * d, [&](int64_t item) {
    const int64_t seq = item / heads, h = item % heads, row0 = seq * len;
    std::vector<float> kt(size_t(d * len)), vs(size_t(len * d)), s(size_t(kQueryRows * len));
    std::vector<float> acc(size_t(kQueryRows * d)), m(kQueryRows), l(kQueryRows), corr(kQueryRows);
    for (int64_t j = 0; j < len; ++j) {
      const float* kj = k + (row0 + j) * ld + h * d;
      for (int64_t c = 0; c < d; ++c) kt[size_t(c * len + j)] = kj[c];
      std::copy_n(v + (row0 + j) * ld + h * d, d, vs.data() + j * d);
    }
    for (int64_t i0 = 0; i0 < len; i0 += kQueryRows) {
      const int64_t rows = std::min(kQueryRows, len - i0);
      isa_kernels.attn_scores[0](s.data(), len, q + (row0 + i0) * ld + h * d, ld, rows, kt.data(), len, d, 0);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      isa_kernels.softmax_block(s.data(), len, rows, len, scale, 1.f, m.data(), l.data(), corr.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      isa_kernels.attn_pv[0](acc.data(), d, s.data(), len, rows, vs.data(), len, d, 0);
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = 1.f / l[size_t(i)];
        float* o = out + (row0 + i0 + i) * width + h * d;
        for (int64_t c = 0; c < d; ++c) o[c] = acc[size_t(i * d + c)] * inv;
      }
    }
  });
}

}  // namespace corral::cpu
