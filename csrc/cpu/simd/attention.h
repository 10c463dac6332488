// Inner loops of attention that the weight products do not cover.
#pragma once

#include "simd/vec.h"

namespace corral::cpu::CORRAL_ISA_NS {

// Blocks sit anywhere in the pool, where the hardware prefetchers stall, so the kernels fetch the
// tile of a later block as they read this one: a load at address a also prefetches a + ahead (the
// same element of the later tile), once per cache line (by the load that starts in the line's
// first `bytes` bytes). Spread over the arithmetic, the fetches never fill the miss queue at once.
// ahead 0: no prefetch.
CORRAL_INLINE void prefetch_ahead(const void* a, int64_t ahead, int64_t bytes) {
  if (ahead != 0 && (reinterpret_cast<uintptr_t>(a) & 63) < uintptr_t(bytes))
    __builtin_prefetch(static_cast<const char*>(a) + ahead, 0, 3);
}

// MR rows of scores over one block: s[r, j] = dot(q[r, 0:d], K[:, j]) for j < bs, K stored
// transposed ([d, bs], rows bs apart). Four independent sums per element (d split by p % 4)
// keep the FMA units busy with few rows; they are added at the end in a fixed order.
template <class KV, int MR>
CORRAL_INLINE void scores_rows(float* s, int64_t lds, const float* q, int64_t ldq, const KV* kt, int64_t bs, int64_t d,
                              int64_t ahead) {
  int64_t j = 0;
  for (; j + kVecWidth <= bs; j += kVecWidth) {
    VecF acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = vzero();
    int64_t p = 0;
    for (; p + 4 <= d; p += 4) {
      VecF kv[4];
      for (int c = 0; c < 4; ++c) {
        prefetch_ahead(kt + (p + c) * bs + j, ahead, kVecWidth * sizeof(KV));
        kv[c] = vload(kt + (p + c) * bs + j);
      }
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = vfma(vset1(q[r * ldq + p + c]), kv[c], acc[r][c]);
    }
    for (; p < d; ++p) {
      prefetch_ahead(kt + p * bs + j, ahead, kVecWidth * sizeof(KV));
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

// Rows per pass: a GQA group of 5 in one pass, so K or V is loaded once for all of it.
constexpr int kAttentionRowsPerPass = 6;

// Scores of `rows` query rows (q rows ldq apart) against one block's keys, into s (rows lds apart);
// the first pass over the rows prefetches the tile `ahead` bytes away (see prefetch_ahead).
template <class KV>
void attn_scores(float* s, int64_t lds, const float* q, int64_t ldq, int64_t rows, const void* ktv, int64_t bs,
                 int64_t d, int64_t ahead) {
  const KV* kt = static_cast<const KV*>(ktv);
  row_tiles<kAttentionRowsPerPass>(rows, [&](auto mr, int64_t r) __attribute__((always_inline)) {
    scores_rows<KV, decltype(mr)::value>(s + r * lds, lds, q + r * ldq, ldq, kt, bs, d, r == 0 ? ahead : 0);
  });
}

// acc[r, 0:d] += sum_j p[r, j] * V[j, 0:d] for j < nk, V stored [nk, d]: MR rows per pass over 64
// columns at a time, so each V row is loaded once per pass. For every element the sum runs over j
// in order with fused multiply-adds (columns past the last full vector: plain ones).
template <class KV, int MR>
CORRAL_INLINE void pv_rows(float* acc, int64_t lda, const float* p, int64_t ldp, const KV* v, int64_t nk, int64_t d,
                          int64_t ahead) {
  int64_t c = 0;
  for (; c + 4 * kVecWidth <= d; c += 4 * kVecWidth) {
    VecF a[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) a[r][j] = vload(acc + r * lda + c + j * kVecWidth);
    for (int64_t k = 0; k < nk; ++k) {
      VecF vv[4];
      for (int j = 0; j < 4; ++j) {
        prefetch_ahead(v + k * d + c + j * kVecWidth, ahead, kVecWidth * sizeof(KV));
        vv[j] = vload(v + k * d + c + j * kVecWidth);
      }
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
      prefetch_ahead(v + k * d + c, ahead, kVecWidth * sizeof(KV));
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

// P.V of `rows` rows, prefetching as attn_scores.
template <class KV>
void attn_pv(float* acc, int64_t lda, const float* p, int64_t ldp, int64_t rows, const void* vv, int64_t nk,
             int64_t d, int64_t ahead) {
  const KV* v = static_cast<const KV*>(vv);
  row_tiles<kAttentionRowsPerPass>(rows, [&](auto mr, int64_t r) __attribute__((always_inline)) {
    pv_rows<KV, decltype(mr)::value>(acc + r * lda, lda, p + r * ldp, ldp, v, nk, d, r == 0 ? ahead : 0);
  });
}

}  // namespace corral::cpu::CORRAL_ISA_NS
