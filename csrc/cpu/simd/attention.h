// Inner loops of attention that the weight products do not cover.
#pragma once

#include "simd/vec.h"

namespace corral::cpu::CORRAL_ISA_NS {

// MR rows of scores over one block: s[r, j] = dot(q[r, 0:d], K[:, j]) for j < bs, K stored
// transposed ([d, bs], rows bs apart). Four independent sums per element (d split by p % 4)
// keep the FMA units busy with few rows; they are added at the end in a fixed order.
template <class KV, int MR>
CORRAL_INLINE void scores_rows(float* s, int64_t lds, const float* q, int64_t ldq, const KV* kt, int64_t bs, int64_t d) {
  int64_t j = 0;
  for (; j + kVecWidth <= bs; j += kVecWidth) {
    VecF acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = vzero();
    int64_t p = 0;
    for (; p + 4 <= d; p += 4) {
      VecF kv[4];
      for (int c = 0; c < 4; ++c) kv[c] = vload(kt + (p + c) * bs + j);
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = vfma(vset1(q[r * ldq + p + c]), kv[c], acc[r][c]);
    }
    for (; p < d; ++p) {
      const VecF kv = vload(kt + p * bs + j);
      for (int r = 0; r < MR; ++r) acc[r][0] = vfma(vset1(q[r * ldq + p]), kv, acc[r][0]);
    }
    for (int r = 0; r < MR; ++r) vstore(s + r * lds + j, vadd(vadd(acc[r][0], acc[r][1]), vadd(acc[r][2], acc[r][3])));
  }
  for (; j < bs; ++j)  // keys past the last full vector
    for (int r = 0; r < MR; ++r) {
      float a[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t p = 0;
      for (; p + 4 <= d; p += 4)
        for (int c = 0; c < 4; ++c) a[c] += q[r * ldq + p + c] * to_float(kt[(p + c) * bs + j]);
      for (; p < d; ++p) a[0] += q[r * ldq + p] * to_float(kt[p * bs + j]);
      s[r * lds + j] = (a[0] + a[1]) + (a[2] + a[3]);
    }
}

// Runs F<MR>::run(r0, args...) over rows in passes of up to 6 rows (a GQA group of 5 in one pass,
// so K or V is loaded once for all of it).
template <template <int> class F, class... A>
CORRAL_INLINE void row_passes(int64_t rows, A... args) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) F<6>::run(r, args...);
  switch (rows - r) {
    case 5: return F<5>::run(r, args...);
    case 4: return F<4>::run(r, args...);
    case 3: return F<3>::run(r, args...);
    case 2: return F<2>::run(r, args...);
    case 1: return F<1>::run(r, args...);
    default: return;
  }
}

template <class KV>
struct ScoresPass {
  template <int MR>
  struct Rows {
    CORRAL_INLINE static void run(int64_t r, float* s, int64_t lds, const float* q, int64_t ldq, const KV* kt,
                                  int64_t bs, int64_t d) {
      scores_rows<KV, MR>(s + r * lds, lds, q + r * ldq, ldq, kt, bs, d);
    }
  };
};

// Scores of `rows` query rows (q rows ldq apart) against one block's keys, into s (rows lds apart).
template <class KV>
void attn_scores(float* s, int64_t lds, const float* q, int64_t ldq, int64_t rows, const void* ktv, int64_t bs,
                 int64_t d) {
  row_passes<ScoresPass<KV>::template Rows>(rows, s, lds, q, ldq, static_cast<const KV*>(ktv), bs, d);
}

// acc[r, 0:d] += sum_j p[r, j] * V[j, 0:d] for j < nk, V stored [nk, d]: MR rows per pass over 64
// columns at a time, so each V row is loaded once per pass. For every element the sum runs over j
// in order with fused multiply-adds (columns past the last full vector: plain ones).
template <class KV, int MR>
CORRAL_INLINE void pv_rows(float* acc, int64_t lda, const float* p, int64_t ldp, const KV* v, int64_t nk, int64_t d) {
  int64_t c = 0;
  for (; c + 4 * kVecWidth <= d; c += 4 * kVecWidth) {
    VecF a[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) a[r][j] = vload(acc + r * lda + c + j * kVecWidth);
    for (int64_t k = 0; k < nk; ++k) {
      VecF vv[4];
      for (int j = 0; j < 4; ++j) vv[j] = vload(v + k * d + c + j * kVecWidth);
      for (int r = 0; r < MR; ++r) {
        const VecF pb = vset1(p[r * ldp + k]);
        for (int j = 0; j < 4; ++j) a[r][j] = vfma(pb, vv[j], a[r][j]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) vstore(acc + r * lda + c + j * kVecWidth, a[r][j]);
  }
  for (; c + kVecWidth <= d; c += kVecWidth) {
    VecF a[MR];
    for (int r = 0; r < MR; ++r) a[r] = vload(acc + r * lda + c);
    for (int64_t k = 0; k < nk; ++k) {
      const VecF vv = vload(v + k * d + c);
      for (int r = 0; r < MR; ++r) a[r] = vfma(vset1(p[r * ldp + k]), vv, a[r]);
    }
    for (int r = 0; r < MR; ++r) vstore(acc + r * lda + c, a[r]);
  }
  for (; c < d; ++c)
    for (int r = 0; r < MR; ++r) {
      float x = acc[r * lda + c];
      for (int64_t k = 0; k < nk; ++k) x += p[r * ldp + k] * to_float(v[k * d + c]);
      acc[r * lda + c] = x;
    }
}

template <class KV>
struct PvPass {
  template <int MR>
  struct Rows {
    CORRAL_INLINE static void run(int64_t r, float* acc, int64_t lda, const float* p, int64_t ldp, const KV* v,
                                  int64_t nk, int64_t d) {
      pv_rows<KV, MR>(acc + r * lda, lda, p + r * ldp, ldp, v, nk, d);
    }
  };
};

template <class KV>
void attn_pv(float* acc, int64_t lda, const float* p, int64_t ldp, int64_t rows, const void* vv, int64_t nk,
             int64_t d) {
  row_passes<PvPass<KV>::template Rows>(rows, acc, lda, p, ldp, static_cast<const KV*>(vv), nk, d);
}

}  // namespace corral::cpu::CORRAL_ISA_NS
