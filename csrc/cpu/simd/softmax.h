// The softmax step of attention over one block of keys, vectorized (exp included).
#pragma once

#include "simd/vec.h"

namespace corral::cpu::CORRAL_ISA_NS {

// For each of `rows` rows of scores s[r * lds + j], j < nk (keys a row does not see are -inf):
// the scores are multiplied by `pre`; the row's running max m[r] and sum l[r] are updated; the
// scores become exp(s - m_new) * post; corr[r] = exp(m_old - m_new) rescales the row's
// accumulator. A row that sees no key of the block gets zeros, corr 1, m and l unchanged.
// Every key's value comes from the same vector lanes whatever nk is (a partial last vector is
// padded with -inf), so results do not depend on how the keys were split into calls.
inline void softmax_block(float* s, int64_t lds, int64_t rows, int64_t nk, float pre, float post, float* m, float* l,
                          float* corr) {
  const float neg_inf = -__builtin_huge_valf();
  alignas(64) float pad[kVecWidth];
  for (int64_t r = 0; r < rows; ++r) {
    float* x = s + r * lds;
    VecF vm = vset1(neg_inf);
    for (int64_t j = 0; j < nk; j += kVecWidth) {
      VecF v;
      if (j + kVecWidth <= nk) {
        v = vload(x + j);
      } else {
        for (int q = 0; q < kVecWidth; ++q) pad[q] = j + q < nk ? x[j + q] : neg_inf;
        v = vload(pad);
      }
      if (pre != 1.f) v = vmul(v, vset1(pre));
      vm = vmax(vm, v);
    }
    const float block_max = vhmax(vm);
    if (!(block_max > neg_inf)) {  // no visible key
      for (int64_t j = 0; j < nk; ++j) x[j] = 0.f;
      corr[r] = 1.f;
      continue;
    }
    const float m_new = m[r] > block_max ? m[r] : block_max;
    const VecF vmn = vset1(m_new), vpost = vset1(post), vpre = vset1(pre);
    VecF sum = vzero();
    for (int64_t j = 0; j < nk; j += kVecWidth) {
      const bool full = j + kVecWidth <= nk;
      if (!full)
        for (int q = 0; q < kVecWidth; ++q) pad[q] = j + q < nk ? x[j + q] : neg_inf;
      VecF v = vload(full ? x + j : pad);
      if (pre != 1.f) v = vmul(v, vpre);
      const VecF e = vexp(vsub(v, vmn));
      sum = vadd(sum, e);
      const VecF out = post != 1.f ? vmul(e, vpost) : e;
      if (full) {
        vstore(x + j, out);
      } else {
        vstore(pad, out);
        for (int64_t q = 0; j + q < nk; ++q) x[j + q] = pad[q];
      }
    }
    float c[kVecWidth];
    vstore(c, vexp(vset1(m[r] - m_new)));
    corr[r] = c[0];
    l[r] = l[r] * c[0] + vsum(sum);
    m[r] = m_new;
  }
}

}  // namespace corral::cpu::CORRAL_ISA_NS
