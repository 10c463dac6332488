// One float vector type for the ISA level of the including translation unit (AVX-512, AVX2, or
// plain C++ that the compiler vectorizes for the baseline). Included only by isa_kernels.cpp,
// which is compiled once per level inside namespace corral::cpu::CORRAL_ISA_NS.
#pragma once

#include <type_traits>

#include "corral/kernels/types.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef CORRAL_ISA_NS
#error "compile through isa_kernels.cpp, which sets CORRAL_ISA_NS"
#endif

namespace corral::cpu::CORRAL_ISA_NS {

#if defined(__AVX512F__) || defined(__AVX2__)
// fp8 e4m3 codes (one per 16-bit lane, 0..255) -> float16 bits whose value times 2^8 is the
// e4m3 value, exactly, subnormals included: the 7 magnitude bits go to bits 7..13 (fp16 exponent
// bias 15 = 7 + 8, and e4m3 subnormals land on fp16 subnormals, which vcvtph2ps converts exactly
// whatever MXCSR's DAZ says), the sign to bit 15. NaN codes (x7 = 0x7f) become fp16 NaN (exponent
// 31, mantissa not 0).
CORRAL_INLINE __m128i fp8_to_half_bits(__m128i b) {
  const __m128i t = _mm_and_si128(_mm_srai_epi16(_mm_slli_epi16(b, 8), 1), _mm_set1_epi16(int16_t(0xbf80)));
  const __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), _mm_set1_epi16(0x7f));
  return _mm_or_si128(t, nan);  // all ones: fp16 NaN
}
#endif
#if defined(__AVX512F__)
CORRAL_INLINE __m256i fp8_to_half_bits(__m256i b) {
  const __m256i t = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 1);
  const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), _mm256_set1_epi16(0x7f));
  // bitwise select: the kept bits of t where the mask 0xbf80 has ones, the nan mask elsewhere.
  return _mm256_ternarylogic_epi32(t, nan, _mm256_set1_epi16(int16_t(0xbf80)), 0xe4);
}
#endif

#if defined(__AVX512F__)

struct VecF {
  __m512 v;
};
constexpr int kVecWidth = 16;
CORRAL_INLINE VecF vzero() { return {_mm512_setzero_ps()}; }
CORRAL_INLINE VecF vset1(float a) { return {_mm512_set1_ps(a)}; }
CORRAL_INLINE VecF vload(const float* p) { return {_mm512_loadu_ps(p)}; }
CORRAL_INLINE VecF vload(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
CORRAL_INLINE VecF vload(const f16* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
CORRAL_INLINE VecF vload(const fp8_e4m3* p) {
  const __m256i h = fp8_to_half_bits(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  return {_mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f))};
}
CORRAL_INLINE void vstore(float* p, VecF a) { _mm512_storeu_ps(p, a.v); }
CORRAL_INLINE VecF vfma(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
CORRAL_INLINE VecF vadd(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
CORRAL_INLINE VecF vsub(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
CORRAL_INLINE VecF vmul(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
CORRAL_INLINE VecF vdiv(VecF a, VecF b) { return {_mm512_div_ps(a.v, b.v)}; }
CORRAL_INLINE float vsum(VecF a) { return _mm512_reduce_add_ps(a.v); }
// a rounded to bfloat16 (to nearest even, NaN kept quiet), as to_bf16.
CORRAL_INLINE VecF vround_bf16(VecF a) {
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan =
      _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
  return {_mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int32_t(0xffff0000u))))};
}
// kVecWidth bf16 pairs (k, k + 1) of kVecWidth columns -> the k values and the k + 1 values.
CORRAL_INLINE void vload_pairs(const bf16* p, VecF& even, VecF& odd) {
  const __m512i w = _mm512_loadu_si512(p);
  even = {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  odd = {_mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int32_t(0xffff0000u))))};
}
CORRAL_INLINE VecF vmax(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
CORRAL_INLINE float vhmax(VecF a) { return _mm512_reduce_max_ps(a.v); }
// exp(x) to about 2 ulp; exactly 0 below -87.3 (and for -inf), +inf above 88.7.
CORRAL_INLINE VecF vexp(VecF a) {
  const __m512 x = _mm512_min_ps(a.v, _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  return {_mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n))};
}

#elif defined(__AVX2__)

struct VecF {
  __m256 v;
};
constexpr int kVecWidth = 8;
CORRAL_INLINE VecF vzero() { return {_mm256_setzero_ps()}; }
CORRAL_INLINE VecF vset1(float a) { return {_mm256_set1_ps(a)}; }
CORRAL_INLINE VecF vload(const float* p) { return {_mm256_loadu_ps(p)}; }
CORRAL_INLINE VecF vload(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
CORRAL_INLINE VecF vload(const f16* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
CORRAL_INLINE VecF vload(const fp8_e4m3* p) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_mul_ps(_mm256_cvtph_ps(fp8_to_half_bits(b)), _mm256_set1_ps(256.0f))};
}
CORRAL_INLINE void vstore(float* p, VecF a) { _mm256_storeu_ps(p, a.v); }
CORRAL_INLINE VecF vfma(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
CORRAL_INLINE VecF vadd(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
CORRAL_INLINE VecF vsub(VecF a, VecF b) { return {_mm256_sub_ps(a.v, b.v)}; }
CORRAL_INLINE VecF vmul(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
CORRAL_INLINE VecF vdiv(VecF a, VecF b) { return {_mm256_div_ps(a.v, b.v)}; }
CORRAL_INLINE VecF vround_bf16(VecF a) {
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i q = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
  return {_mm256_castsi256_ps(_mm256_and_si256(q, _mm256_set1_epi32(int32_t(0xffff0000u))))};
}
CORRAL_INLINE void vload_pairs(const bf16* p, VecF& even, VecF& odd) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  odd = {_mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int32_t(0xffff0000u))))};
}
CORRAL_INLINE float vsum(VecF a) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
CORRAL_INLINE VecF vmax(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
CORRAL_INLINE float vhmax(VecF a) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}
// exp(x) to about 2 ulp; exactly 0 below -87.3 (and for -inf), +inf above 88.7.
CORRAL_INLINE VecF vexp(VecF a) {
  const __m256 x = _mm256_min_ps(a.v, _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n through the exponent field, in two halves so that n = 128 (x near 88.7) stays finite.
  const __m256i e = _mm256_cvtps_epi32(n);
  const __m256i e1 = _mm256_srai_epi32(e, 1), e2 = _mm256_sub_epi32(e, e1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, _mm256_set1_epi32(127)), 23));
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  return {_mm256_and_ps(live, _mm256_mul_ps(_mm256_mul_ps(p, s1), s2))};
}

#else

// Baseline: fixed-size arrays the compiler maps onto whatever vector unit the target has.
struct VecF {
  float v[4];
};
constexpr int kVecWidth = 4;
CORRAL_INLINE VecF vzero() { return {{0.f, 0.f, 0.f, 0.f}}; }
CORRAL_INLINE VecF vset1(float a) { return {{a, a, a, a}}; }
template <class T>
CORRAL_INLINE VecF vload(const T* p) {
  VecF r;
  for (int i = 0; i < 4; ++i) r.v[i] = to_float(p[i]);
  return r;
}
CORRAL_INLINE void vstore(float* p, VecF a) {
  for (int i = 0; i < 4; ++i) p[i] = a.v[i];
}
CORRAL_INLINE VecF vfma(VecF a, VecF b, VecF c) {
  for (int i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
CORRAL_INLINE VecF vadd(VecF a, VecF b) {
  for (int i = 0; i < 4; ++i) a.v[i] += b.v[i];
  return a;
}
CORRAL_INLINE VecF vmul(VecF a, VecF b) {
  for (int i = 0; i < 4; ++i) a.v[i] *= b.v[i];
  return a;
}
CORRAL_INLINE VecF vsub(VecF a, VecF b) {
  for (int i = 0; i < 4; ++i) a.v[i] -= b.v[i];
  return a;
}
CORRAL_INLINE VecF vdiv(VecF a, VecF b) {
  for (int i = 0; i < 4; ++i) a.v[i] /= b.v[i];
  return a;
}
CORRAL_INLINE VecF vround_bf16(VecF a) {
  for (int i = 0; i < 4; ++i) a.v[i] = to_float(to_bf16(a.v[i]));
  return a;
}
CORRAL_INLINE void vload_pairs(const bf16* p, VecF& even, VecF& odd) {
  for (int i = 0; i < 4; ++i) {
    even.v[i] = to_float(p[2 * i]);
    odd.v[i] = to_float(p[2 * i + 1]);
  }
}
CORRAL_INLINE float vsum(VecF a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
CORRAL_INLINE VecF vmax(VecF a, VecF b) {
  for (int i = 0; i < 4; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
  return a;
}
CORRAL_INLINE float vhmax(VecF a) {
  const float x = a.v[0] > a.v[1] ? a.v[0] : a.v[1], y = a.v[2] > a.v[3] ? a.v[2] : a.v[3];
  return x > y ? x : y;
}
CORRAL_INLINE VecF vexp(VecF a) {
  for (int i = 0; i < 4; ++i) a.v[i] = a.v[i] < -87.3f ? 0.f : __builtin_expf(a.v[i]);
  return a;
}

#endif

// The first n (< kVecWidth) lanes of a vector from / to memory.
CORRAL_INLINE VecF vload_n(const float* p, int64_t n) {
  alignas(64) float t[kVecWidth] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return vload(t);
}
CORRAL_INLINE void vstore_n(float* p, VecF a, int64_t n) {
  alignas(64) float t[kVecWidth];
  vstore(t, a);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}

// The last `left` rows (fewer than a tile) as one tile of exactly that many rows.
template <int MR, class F>
CORRAL_INLINE void last_row_tile(int64_t left, int64_t r, F& f) {
  if constexpr (MR > 0) {
    if (left == MR) return f(std::integral_constant<int, MR>{}, r);
    last_row_tile<MR - 1>(left, r, f);
  }
}

// Calls f(std::integral_constant<int, MR>{}, r) for the tiles of rows [0, rows): MaxRows rows from
// row r each, the rest in one tile (so each tile loads its operand once for all its rows).
template <int MaxRows, class F>
CORRAL_INLINE void row_tiles(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + MaxRows <= rows; r += MaxRows) f(std::integral_constant<int, MaxRows>{}, r);
  last_row_tile<MaxRows - 1>(rows - r, r, f);
}

}  // namespace corral::cpu::CORRAL_ISA_NS
