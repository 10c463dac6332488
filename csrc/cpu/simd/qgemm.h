// Inner loops of the products with quantized weights (cpu/pack.cpp packs them), in the panels of
// simd/gemm.h: per panel, group after group of QuantInfo::group k, each group a header (the scale
// of every panel column, then its integer offset if the format has them) and the group's codes:
//   I8: [group / 4][kPanelCols][4] int8   (quads of k, as vpmaddubsw / vpdpbusd read them)
//   I4: [group / 8][kPanelCols][4] bytes  (byte i of a column holds k = 8s + i in its low nibble
//                                          and k = 8s + 4 + i in its high one, codes 0..15)
//   F8: [group][kPanelCols] fp8 e4m3
// Integer products (the A8 scheme of llama.cpp's Q8_0 dots): each kQuantBlock of activations is
// quantized on its own (prepare_quant_x); a block's dot product with a column is an exact
// integer, then acc += float(dot - offset * sum(x codes)) * x_scale * w_scale, block after block
// in k order, for every tile shape: a row's result never depends on its batch.
#pragma once

#include <cmath>
#include <cstdint>

#include "isa.h"
#include "simd/gemm.h"

namespace corral::cpu::CORRAL_ISA_NS {


// Activations for kGemmI8 and kGemmI4: per row and block the record of isa.h (scale max|x| / 127,
// code sum, codes), codes = round-half-even(x * (1 / scale)) in [-127, 127], all in float32; an
// all-zero block has scale 0.
template <int Kind>
PreparedX prepare_quant_x(void* buf, const float* x, int64_t ldx, int64_t rows, int64_t k) {
  using Code = int8_t;
  constexpr float kMax = 127.f;
  constexpr int64_t rec = quant_record_bytes(Kind);
  const int64_t nb = (k + kQuantBlock - 1) / kQuantBlock, ld = prepared_row_words(Kind, k);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + r * ldx;
    char* row = static_cast<char*>(buf) + r * ld * 4;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * kQuantBlock, n = k - k0 < kQuantBlock ? k - k0 : kQuantBlock;
      float amax = 0.f;
      for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(src[k0 + i]));
      const float d = amax / kMax, id = amax > 0.f ? 1.f / d : 0.f;
      char* record = row + b * rec;
      Code* q = reinterpret_cast<Code*>(record + 8);
      int32_t sum = 0;
      for (int64_t i = 0; i < kQuantBlock; ++i) {
        q[i] = i < n ? Code(std::nearbyint(src[k0 + i] * id)) : Code(0);
        sum += q[i];
      }
      std::memcpy(record, &d, 4);
      std::memcpy(record + 4, &sum, 4);
    }
  }
  return {buf, ld};
}

CORRAL_INLINE float scale_at(const char* header, DType t, int64_t c) {
  return t == DType::BF16 ? to_float(reinterpret_cast<const bf16*>(header)[c]) : reinterpret_cast<const float*>(header)[c];
}

CORRAL_INLINE VecF vload_scales(const char* header, DType t, int64_t c) {
  return t == DType::BF16 ? vload(reinterpret_cast<const bf16*>(header) + c) : vload(reinterpret_cast<const float*>(header) + c);
}

// The integer dot products of one block: MR rows of activation records x[r] (kQuantBlock codes
// each) with TV vectors of columns of one kQuantBlock of weight codes w, into dot[r][v] (int32
// lanes, one per column). Specialized per ISA below; none on the baseline, which runs
// quant_panel_scalar instead.
CORRAL_INLINE int32_t load32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(__AVX512F__) || defined(__AVX2__)

#if defined(__AVX512F__)
using VecI = __m512i;
CORRAL_INLINE VecI vi_zero() { return _mm512_setzero_si512(); }
CORRAL_INLINE VecI vi_set1(int32_t a) { return _mm512_set1_epi32(a); }
CORRAL_INLINE VecI vi_load(const void* p) { return _mm512_loadu_si512(p); }
CORRAL_INLINE VecI vi_abs8(VecI a) { return _mm512_abs_epi8(a); }
// x negated where w is negative (AVX-512 has no vpsignb; where w is 0 the product is 0 anyway).
CORRAL_INLINE VecI vi_sign8(VecI x, VecI w) {
  return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
}
CORRAL_INLINE VecI vi_load_i8(const void* p) {  // kVecWidth int8 -> int32
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
CORRAL_INLINE VecI vi_add32(VecI a, VecI b) { return _mm512_add_epi32(a, b); }
CORRAL_INLINE VecI vi_sub32(VecI a, VecI b) { return _mm512_sub_epi32(a, b); }
CORRAL_INLINE VecI vi_mul32(VecI a, VecI b) { return _mm512_mullo_epi32(a, b); }
CORRAL_INLINE VecI vi_low_nibbles(VecI b) { return _mm512_and_si512(b, _mm512_set1_epi8(0x0f)); }
CORRAL_INLINE VecI vi_high_nibbles(VecI b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(0x0f)); }
CORRAL_INLINE VecF vi_to_float(VecI a) { return {_mm512_cvtepi32_ps(a)}; }
#if defined(__AVX512VNNI__)
#define CORRAL_VNNI 1
#endif
CORRAL_INLINE VecI vi_add16(VecI a, VecI b) { return _mm512_add_epi16(a, b); }
CORRAL_INLINE VecI vi_maddubs(VecI u, VecI s) { return _mm512_maddubs_epi16(u, s); }
CORRAL_INLINE VecI vi_pairs_to32(VecI a) { return _mm512_madd_epi16(a, _mm512_set1_epi16(1)); }
#if defined(CORRAL_VNNI)
CORRAL_INLINE VecI vi_dot_u8(VecI acc, VecI u, VecI s) { return _mm512_dpbusd_epi32(acc, u, s); }
#endif
#else
using VecI = __m256i;
CORRAL_INLINE VecI vi_zero() { return _mm256_setzero_si256(); }
CORRAL_INLINE VecI vi_set1(int32_t a) { return _mm256_set1_epi32(a); }
CORRAL_INLINE VecI vi_load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
CORRAL_INLINE VecI vi_abs8(VecI a) { return _mm256_abs_epi8(a); }
CORRAL_INLINE VecI vi_sign8(VecI x, VecI w) { return _mm256_sign_epi8(x, w); }
CORRAL_INLINE VecI vi_load_i8(const void* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
}
CORRAL_INLINE VecI vi_add32(VecI a, VecI b) { return _mm256_add_epi32(a, b); }
CORRAL_INLINE VecI vi_sub32(VecI a, VecI b) { return _mm256_sub_epi32(a, b); }
CORRAL_INLINE VecI vi_mul32(VecI a, VecI b) { return _mm256_mullo_epi32(a, b); }
CORRAL_INLINE VecI vi_low_nibbles(VecI b) { return _mm256_and_si256(b, _mm256_set1_epi8(0x0f)); }
CORRAL_INLINE VecI vi_high_nibbles(VecI b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(0x0f)); }
CORRAL_INLINE VecF vi_to_float(VecI a) { return {_mm256_cvtepi32_ps(a)}; }
CORRAL_INLINE VecI vi_add16(VecI a, VecI b) { return _mm256_add_epi16(a, b); }
CORRAL_INLINE VecI vi_maddubs(VecI u, VecI s) { return _mm256_maddubs_epi16(u, s); }
CORRAL_INLINE VecI vi_pairs_to32(VecI a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
#endif

// The integer dot products of one block of kQuantBlock k: MR rows of activation codes x[r] with
// TVI vectors of columns (panel vectors vec[i]) of the block's weight codes w, into dot[r][i]
// (int32 lanes, one per column; I4: of the stored codes 0..15, the caller subtracts the offsets).
// Steps outside, vectors inside: each row's activations are broadcast once per step, and the
// accumulators stay in registers.
template <int MR, int TVI>
CORRAL_INLINE void block_dots_i8(VecI (&dot)[MR][TVI], const int8_t* w, const char* const (&x)[MR], const int* vec) {
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < TVI; ++i) dot[r][i] = vi_zero();
#pragma GCC unroll 4
  for (int64_t s = 0; s < kQuantBlock / 4; ++s) {
    VecI xb[MR];
    for (int r = 0; r < MR; ++r) xb[r] = vi_set1(load32(x[r] + 4 * s));
    for (int i = 0; i < TVI; ++i) {
      // |w| (0..128 as unsigned bytes, -128 included) times x with w's sign (-127..127): the
      // pair sums of vpmaddubsw stay within int16 (2 * 128 * 127).
      const VecI wv = vi_load(w + s * kPanelCols * 4 + vec[i] * kVecWidth * 4), aw = vi_abs8(wv);
      for (int r = 0; r < MR; ++r) {
#if defined(CORRAL_VNNI)
        dot[r][i] = vi_dot_u8(dot[r][i], aw, vi_sign8(xb[r], wv));
#else
        dot[r][i] = vi_add32(dot[r][i], vi_pairs_to32(vi_maddubs(aw, vi_sign8(xb[r], wv))));
#endif
      }
    }
  }
}

// Without VNNI the I4 pair sums stay int16 through the block: |u0 x0 + u1 x1| <= 2 * 15 * 127 =
// 3810, and 8 of them fit.
template <int MR, int TVI>
CORRAL_INLINE void block_dots_i4(VecI (&dot)[MR][TVI], const uint8_t* w, const char* const (&x)[MR], const int* vec) {
  VecI acc[MR][TVI];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < TVI; ++i) acc[r][i] = vi_zero();
#pragma GCC unroll 4
  for (int64_t s = 0; s < kQuantBlock / 8; ++s) {
    VecI xl[MR], xh[MR];
    for (int r = 0; r < MR; ++r) {
      xl[r] = vi_set1(load32(x[r] + 8 * s));
      xh[r] = vi_set1(load32(x[r] + 8 * s + 4));
    }
    for (int i = 0; i < TVI; ++i) {
      const VecI b = vi_load(w + s * kPanelCols * 4 + vec[i] * kVecWidth * 4);
      const VecI lo = vi_low_nibbles(b), hi = vi_high_nibbles(b);
      for (int r = 0; r < MR; ++r) {
#if defined(CORRAL_VNNI)
        acc[r][i] = vi_dot_u8(vi_dot_u8(acc[r][i], lo, xl[r]), hi, xh[r]);
#else
        acc[r][i] = vi_add16(acc[r][i], vi_add16(vi_maddubs(lo, xl[r]), vi_maddubs(hi, xh[r])));
#endif
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < TVI; ++i)
#if defined(CORRAL_VNNI)
      dot[r][i] = acc[r][i];
#else
      dot[r][i] = vi_pairs_to32(acc[r][i]);
#endif
}

// Rows per tile of the integer products, and vectors per pass over a block: a tile spans the
// whole panel (each panel is read from memory once per row tile) and takes a block's vectors in
// passes of kQuantPassVecs, the block staying in L1 between passes.
constexpr int kQuantTileRows = kPanelVecs == 4 ? 4 : 3;
template <int MR>
constexpr int kQuantPassVecs = MR == 1 ? 4 : 2;

// y[r, 0:n) (+)= the MR rows of x (records) against one quantized panel.
template <int Kind, bool Glu, int MR>
CORRAL_INLINE void quant_tile(float* y, int64_t ldy, const char* x, int64_t ldx_bytes, const char* panel, int64_t k,
                              int64_t n, bool accumulate, const QuantInfo& q, bool fetch) {
  constexpr int TV = kPanelVecs, TVI = kQuantPassVecs<MR>;
  constexpr int64_t rec = quant_record_bytes(Kind);
  constexpr int64_t block_bytes = Kind == kGemmI8 ? kQuantBlock * kPanelCols : kQuantBlock * kPanelCols / 2;
  const int64_t header = quant_header_bytes(q), group_bytes = header + q.group / kQuantBlock * block_bytes;
  const int64_t nb = (k + kQuantBlock - 1) / kQuantBlock, per_group = q.group / kQuantBlock;
  int vec[TV];
  for (int v = 0; v < TV; ++v) vec[v] = tile_vector<TV>(Glu, 0, v);
  VecF acc[MR][TV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < TV; ++v) acc[r][v] = vzero();
  for (int64_t b = 0; b < nb; ++b) {
    const char* g = panel + (b / per_group) * group_bytes;
    const char* w = g + header + (b % per_group) * block_bytes;
    if (fetch)
      for (int64_t i = 0; i < block_bytes; i += 64) __builtin_prefetch(w + kFetchAhead + i, 0, 0);
    const char* xr[MR];
    VecF xd[MR];
    VecI xsum[MR];  // the sum of the block's activation codes (I4 symmetric: times the offset 8)
    for (int r = 0; r < MR; ++r) {
      const char* record = x + r * ldx_bytes + b * rec;
      xr[r] = record + 8;
      xd[r] = vset1(reinterpret_cast<const float*>(record)[0]);
      xsum[r] = vi_set1(load32(record + 4) * (Kind == kGemmI4 && !q.offsets ? 8 : 1));
    }
#pragma GCC unroll 8
    for (int p = 0; p < TV; p += TVI) {
      VecI dot[MR][TVI];
      if constexpr (Kind == kGemmI8) block_dots_i8<MR, TVI>(dot, reinterpret_cast<const int8_t*>(w), xr, vec + p);
      else block_dots_i4<MR, TVI>(dot, reinterpret_cast<const uint8_t*>(w), xr, vec + p);
      for (int i = 0; i < TVI; ++i) {
        const int64_t c = int64_t(vec[p + i]) * kVecWidth;
        const VecF s = vload_scales(g, q.scale_dtype, c);
        if (q.offsets) {
          const VecI o = vi_load_i8(g + header - kPanelCols + c);
          for (int r = 0; r < MR; ++r) dot[r][i] = vi_sub32(dot[r][i], vi_mul32(o, xsum[r]));
        } else if constexpr (Kind == kGemmI4) {
          for (int r = 0; r < MR; ++r) dot[r][i] = vi_sub32(dot[r][i], xsum[r]);
        }
        for (int r = 0; r < MR; ++r) acc[r][p + i] = vfma(vmul(vi_to_float(dot[r][i]), xd[r]), s, acc[r][p + i]);
      }
    }
  }
  store_tile<Glu, MR, TV>(y, ldy, acc, 0, n, accumulate);
}

#endif  // AVX-512 or AVX2

// The same products one column at a time (the baseline level, and the reference the others
// follow): the same integer block dots, and the same float operations in the same order.
template <int Kind, bool Glu>
void quant_panel_scalar(float* y, int64_t ldy, const char* x, int64_t ldx_bytes, int64_t rows, const char* panel,
                        int64_t k, int64_t n, bool accumulate, const QuantInfo& q) {
  constexpr int64_t rec = quant_record_bytes(Kind);
  constexpr int64_t block_bytes = Kind == kGemmI8 ? kQuantBlock * kPanelCols : kQuantBlock * kPanelCols / 2;
  const int64_t header = quant_header_bytes(q), group_bytes = header + q.group / kQuantBlock * block_bytes;
  const int64_t nb = (k + kQuantBlock - 1) / kQuantBlock, per_group = q.group / kQuantBlock;
  const auto column = [&](const char* xrow, int64_t c) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const char* g = panel + (b / per_group) * group_bytes;
      const char* w = g + header + (b % per_group) * block_bytes;
      const char* record = xrow + b * rec;
      int32_t dot = 0;
      for (int64_t i = 0; i < kQuantBlock; ++i)
        dot += quant_code(Kind == kGemmI8 ? DType::I8 : DType::I4, w, i, c) * int32_t(int8_t(record[8 + i]));
      const int32_t offset = q.offsets ? int32_t(reinterpret_cast<const int8_t*>(g + header - kPanelCols)[c])
                                       : Kind == kGemmI4 ? 8 : 0;
      dot -= offset * load32(record + 4);
      acc = std::fma(float(dot) * reinterpret_cast<const float*>(record)[0], scale_at(g, q.scale_dtype, c), acc);
    }
    return acc;
  };
  const int64_t half = kPanelCols / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const char* xrow = x + r * ldx_bytes;
    for (int64_t c = 0; c < n; ++c) {
      float v = Glu ? 0.f : column(xrow, c);
      if constexpr (Glu) {
        const float gate = column(xrow, c), up = column(xrow, half + c);
        v = gate / (1.f + std::exp(-gate)) * up;
      }
      y[r * ldy + c] = accumulate ? y[r * ldy + c] + v : v;
    }
  }
}

// One quantized panel for `rows` rows (kGemmI8, kGemmI4), tile by tile.
template <int Kind, bool Glu>
void quant_gemm_panel(float* y, int64_t ldy, const void* x, int64_t ldx, int64_t rows, const void* panel, int64_t k,
                      int64_t n, bool accumulate, const QuantInfo& q) {
  const char* xb = static_cast<const char*>(x);
  const char* p = static_cast<const char*>(panel);
#if defined(__AVX512F__) || defined(__AVX2__)
  row_tiles<kQuantTileRows>(rows, [&](auto mr, int64_t r) __attribute__((always_inline)) {
    constexpr int MR = decltype(mr)::value;
    quant_tile<Kind, Glu, MR>(y + r * ldy, ldy, xb + r * ldx * 4, ldx * 4, p, k, n, accumulate, q, r == 0);
  });
#else
  quant_panel_scalar<Kind, Glu>(y, ldy, xb, ldx * 4, rows, p, k, n, accumulate, q);
#endif
}

// FP8 panels: codes widened to float in registers against float32 activations; per group
// acc += (sum over the group of x * code) * scale.
template <bool Glu, int MR, int TV>
CORRAL_INLINE void fp8_tile(float* y, int64_t ldy, const float* x, int64_t ldx, const char* panel, int64_t k, int t,
                            int64_t n, bool accumulate, const QuantInfo& q) {
  const int64_t header = quant_header_bytes(q), group_bytes = header + q.group * kPanelCols;
  int64_t off[TV];
  for (int v = 0; v < TV; ++v) off[v] = int64_t(tile_vector<TV>(Glu, t, v)) * kVecWidth;
  VecF acc[MR][TV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < TV; ++v) acc[r][v] = vzero();
  for (int64_t k0 = 0, g = 0; k0 < k; k0 += q.group, ++g) {
    const char* hdr = panel + g * group_bytes;
    const fp8_e4m3* w = reinterpret_cast<const fp8_e4m3*>(hdr + header);
    VecF part[MR][TV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < TV; ++v) part[r][v] = vzero();
    const int64_t kn = k - k0 < q.group ? k - k0 : q.group;
    for (int64_t i = 0; i < kn; ++i, w += kPanelCols)
      for (int v = 0; v < TV; ++v) {
        const VecF wv = vload(w + off[v]);
        for (int r = 0; r < MR; ++r) part[r][v] = vfma(vset1(x[r * ldx + k0 + i]), wv, part[r][v]);
      }
    for (int v = 0; v < TV; ++v) {
      const VecF s = vload_scales(hdr, q.scale_dtype, off[v]);
      for (int r = 0; r < MR; ++r) acc[r][v] = vfma(part[r][v], s, acc[r][v]);
    }
  }
  store_tile<Glu, MR, TV>(y, ldy, acc, t, n, accumulate);
}

template <bool Glu>
void fp8_gemm_panel(float* y, int64_t ldy, const void* x, int64_t ldx, int64_t rows, const void* panel, int64_t k,
                    int64_t n, bool accumulate, const QuantInfo& q) {
  constexpr int TV = kPanelVecs < 4 ? kPanelVecs : 4;
  row_tiles<2>(rows, [&](auto mr, int64_t r) __attribute__((always_inline)) {
    constexpr int MR = decltype(mr)::value;
    constexpr int outs_per_tile = (Glu ? TV / 2 : TV) * kVecWidth;
    for (int t = 0; t < kPanelVecs / TV && t * outs_per_tile < n; ++t)
      fp8_tile<Glu, MR, TV>(y + r * ldy, ldy, static_cast<const float*>(x) + r * ldx, ldx,
                            static_cast<const char*>(panel), k, t, n, accumulate, q);
  });
}

}  // namespace corral::cpu::CORRAL_ISA_NS
