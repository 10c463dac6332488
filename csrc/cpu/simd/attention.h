// Inner loops of attention that the weight products do not cover.
#pragma once

#include <type_traits>

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

#if defined(__AVX512BF16__)
// bf16 KV cache: vdpbf16ps multiplies the two bf16 halves of each dword of two vectors and adds
// both products to an fp32 lane, twice the multiply-adds of an fp32 FMA, with no conversion of K
// or V. The other operand (q, p) is rounded to bf16 (nearest even), as GPU flash attention does
// with a bf16 cache. A dword pairs consecutive terms of a sum: (K[p, j], K[p+1, j]) with
// (q[p], q[p+1]), and (V[k, c], V[k+1, c]) with (p[k], p[k+1]); an odd last term pairs with zero.
// Lanes are independent and the pairs are fixed by position, so each result's arithmetic does not
// depend on which rows, keys or columns share a vector.

// Elements of q or p rounded per pass (d or keys past it: further passes).
constexpr int64_t kDpChunk = 256;
using Pairs = uint32_t[kDpChunk / 2];

CORRAL_INLINE __mmask16 lanes_below(int64_t n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : __mmask16((1u << n) - 1); }

// 16 bf16 at x in the low half of a vector; Masked: lanes m only (zero elsewhere, nothing else read).
template <bool Masked>
CORRAL_INLINE __m512i load_bf16x16(const bf16* x, __mmask16 m) {
  if constexpr (Masked) return _mm512_zextsi256_si512(_mm256_maskz_loadu_epi16(m, x));
  return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// (a[i], b[i]) as dword i, i < 16: a two-source word permute (index bit 5 picks b).
CORRAL_INLINE __m512bh interleave_bf16(__m512i a, __m512i b) {
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return (__m512bh)_mm512_permutex2var_epi16(a, idx, b);
}

// x[0:n] rounded to bf16 pairs: out[i] = (x[2i], x[2i+1]), zero past n, up to a multiple of 32.
CORRAL_INLINE void round_pairs(uint32_t* out, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 32)
    _mm512_storeu_si512(out + i / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(lanes_below(n - i - 16), x + i + 16),
                                                                  _mm512_maskz_loadu_ps(lanes_below(n - i), x + i)));
}

CORRAL_INLINE __m512bh bcast_pair(uint32_t pair) { return (__m512bh)_mm512_set1_epi32(int(pair)); }

// Scores of MR rows (q in pairs qp) against 16 keys (Masked: lanes m) over K rows [0, n) at kt,
// rows bs apart: four sums per element as in scores_rows (pair i in sum i % 4). add: s += them.
template <int MR, bool Masked>
CORRAL_INLINE void scores_keys_dp(float* s, int64_t lds, const Pairs* qp, const bf16* kt, int64_t bs, int64_t n,
                                  __mmask16 m, bool add, int64_t ahead) {
  auto kpair = [&](int64_t i, bool two) __attribute__((always_inline)) {
    prefetch_ahead(kt + 2 * i * bs, ahead, 32);
    if (two) prefetch_ahead(kt + (2 * i + 1) * bs, ahead, 32);
    return interleave_bf16(load_bf16x16<Masked>(kt + 2 * i * bs, m),
                           two ? load_bf16x16<Masked>(kt + (2 * i + 1) * bs, m) : _mm512_setzero_si512());
  };
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 4 <= n / 2; i += 4) {
    __m512bh kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = kpair(i + c, true);
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], bcast_pair(qp[r][i + c]), kv[c]);
  }
  for (; 2 * i < n; ++i) {
    const __m512bh kv = kpair(i, 2 * i + 1 < n);
    for (int r = 0; r < MR; ++r) acc[r][0] = _mm512_dpbf16_ps(acc[r][0], bcast_pair(qp[r][i]), kv);
  }
  for (int r = 0; r < MR; ++r) {
    __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
    if (add) sum = _mm512_add_ps(_mm512_maskz_loadu_ps(m, s + r * lds), sum);
    _mm512_mask_storeu_ps(s + r * lds, m, sum);
  }
}

// scores_rows for a bf16 cache.
template <int MR>
CORRAL_INLINE void scores_rows_dp(float* s, int64_t lds, const float* q, int64_t ldq, const bf16* kt, int64_t bs,
                                  int64_t d, int64_t ahead) {
  alignas(64) Pairs qp[MR];
  for (int64_t p0 = 0; p0 < d; p0 += kDpChunk) {  // a head_dim past kDpChunk: s adds up the passes in order
    const int64_t n = d - p0 < kDpChunk ? d - p0 : kDpChunk;
    for (int r = 0; r < MR; ++r) round_pairs(qp[r], q + r * ldq + p0, n);
    int64_t j = 0;
    for (; j + 16 <= bs; j += 16)
      scores_keys_dp<MR, false>(s + j, lds, qp, kt + p0 * bs + j, bs, n, 0xffff, p0 > 0, ahead);
    if (j < bs) scores_keys_dp<MR, true>(s + j, lds, qp, kt + p0 * bs + j, bs, n, lanes_below(bs - j), p0 > 0, ahead);
  }
}

// acc[r, 0:16 NV] += p[r, 0:n] . V for MR rows (p in pairs pp), V from v (rows d apart; Masked: the
// 16 columns of lanes m, NV = 1).
template <int MR, int NV, bool Masked>
CORRAL_INLINE void pv_cols_dp(float* acc, int64_t lda, const Pairs* pp, const bf16* v, int64_t n, int64_t d,
                              __mmask16 m, int64_t ahead) {
  __m512 a[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) a[r][j] = _mm512_maskz_loadu_ps(m, acc + r * lda + 16 * j);
  auto step = [&](int64_t k, bool two) __attribute__((always_inline)) {
    __m512bh vv[NV];
    for (int j = 0; j < NV; ++j) {
      prefetch_ahead(v + k * d + 16 * j, ahead, 32);
      if (two) prefetch_ahead(v + (k + 1) * d + 16 * j, ahead, 32);
      vv[j] = interleave_bf16(load_bf16x16<Masked>(v + k * d + 16 * j, m),
                              two ? load_bf16x16<Masked>(v + (k + 1) * d + 16 * j, m) : _mm512_setzero_si512());
    }
    for (int r = 0; r < MR; ++r) {
      const __m512bh pb = bcast_pair(pp[r][k / 2]);
      for (int j = 0; j < NV; ++j) a[r][j] = _mm512_dpbf16_ps(a[r][j], pb, vv[j]);
    }
  };
  int64_t k = 0;
  for (; k + 2 <= n; k += 2) step(k, true);
  if (k < n) step(k, false);
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) _mm512_mask_storeu_ps(acc + r * lda + 16 * j, m, a[r][j]);
}

// pv_rows for a bf16 cache: 64 columns at a time, then 16, then the rest masked.
template <int MR>
CORRAL_INLINE void pv_rows_dp(float* acc, int64_t lda, const float* p, int64_t ldp, const bf16* v, int64_t nk,
                              int64_t d, int64_t ahead) {
  alignas(64) Pairs pp[MR];
  for (int64_t k0 = 0; k0 < nk; k0 += kDpChunk) {
    const int64_t n = nk - k0 < kDpChunk ? nk - k0 : kDpChunk;
    for (int r = 0; r < MR; ++r) round_pairs(pp[r], p + r * ldp + k0, n);
    const bf16* vk = v + k0 * d;
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) pv_cols_dp<MR, 4, false>(acc + c, lda, pp, vk + c, n, d, 0xffff, ahead);
    for (; c + 16 <= d; c += 16) pv_cols_dp<MR, 1, false>(acc + c, lda, pp, vk + c, n, d, 0xffff, ahead);
    if (c < d) pv_cols_dp<MR, 1, true>(acc + c, lda, pp, vk + c, n, d, lanes_below(d - c), ahead);
  }
}
#endif

// Rows per pass: a GQA group of 5 in one pass, so K or V is loaded once for all of it.
constexpr int kAttentionRowsPerPass = 6;

template <class KV>
struct ScoresPass {
  template <int MR>
  struct Rows {
    CORRAL_INLINE static void run(int64_t r, float* s, int64_t lds, const float* q, int64_t ldq, const KV* kt,
                                  int64_t bs, int64_t d, int64_t ahead) {
      ahead = r == 0 ? ahead : 0;  // the first pass over the rows prefetches
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<KV, bf16>)
        return scores_rows_dp<MR>(s + r * lds, lds, q + r * ldq, ldq, kt, bs, d, ahead);
#endif
      scores_rows<KV, MR>(s + r * lds, lds, q + r * ldq, ldq, kt, bs, d, ahead);
    }
  };
};

// Scores of `rows` query rows (q rows ldq apart) against one block's keys, into s (rows lds apart);
// prefetches the tile `ahead` bytes away (see prefetch_ahead).
template <class KV>
void attn_scores(float* s, int64_t lds, const float* q, int64_t ldq, int64_t rows, const void* ktv, int64_t bs,
                 int64_t d, int64_t ahead) {
  row_tiles<ScoresPass<KV>::template Rows, kAttentionRowsPerPass>(rows, s, lds, q, ldq, static_cast<const KV*>(ktv), bs, d, ahead);
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

template <class KV>
struct PvPass {
  template <int MR>
  struct Rows {
    CORRAL_INLINE static void run(int64_t r, float* acc, int64_t lda, const float* p, int64_t ldp, const KV* v,
                                  int64_t nk, int64_t d, int64_t ahead) {
      ahead = r == 0 ? ahead : 0;  // the first pass over the rows prefetches
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<KV, bf16>)
        return pv_rows_dp<MR>(acc + r * lda, lda, p + r * ldp, ldp, v, nk, d, ahead);
#endif
      pv_rows<KV, MR>(acc + r * lda, lda, p + r * ldp, ldp, v, nk, d, ahead);
    }
  };
};

template <class KV>
void attn_pv(float* acc, int64_t lda, const float* p, int64_t ldp, int64_t rows, const void* vv, int64_t nk,
             int64_t d, int64_t ahead) {
  row_tiles<PvPass<KV>::template Rows, kAttentionRowsPerPass>(rows, acc, lda, p, ldp, static_cast<const KV*>(vv), nk, d, ahead);
}

}  // namespace corral::cpu::CORRAL_ISA_NS
