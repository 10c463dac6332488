// Register-tiled inner loops of the weight products (linear, the MLPs, the MoE) on weights packed
// at load (cpu/pack.cpp): panels of kPanelCols output columns, each panel contiguous as
// [steps][kPanelCols][P] elements, a step being P consecutive k (P = 2 for bfloat16: the pairs
// vdpbf16ps reads; 1 otherwise). A GLU panel holds kPanelCols / 2 gate columns, then the same
// columns of up. Every output element sums its k steps in order, one step after the other, from
// zero, whatever the tile or the number of rows: a row's result never depends on the batch.
#pragma once

#include <cstdint>

#include "isa.h"
#include "simd/vec.h"

namespace corral::cpu::CORRAL_ISA_NS {

#if defined(__AVX512BF16__)
constexpr bool kDotBf16 = true;  // bf16 products run on vdpbf16ps
#else
constexpr bool kDotBf16 = false;  // bf16 products split the pairs and use float FMAs
#endif

// Vectors of output columns per register tile: kTileVecs, or for a single row as wide as the
// registers allow (at decode a panel narrower than the tile runs once, not one pass per tile
// while memory idles; 1 tile per panel on AVX-512 and AVX2, 2 on the baseline).
constexpr int kPanelVecs = int(kPanelCols) / kVecWidth;
constexpr int kTileVecs = 4;
constexpr int kWideVecs = kPanelVecs < 8 ? kPanelVecs : 8;
template <int MR>
constexpr int kTileVecsOf = MR == 1 ? kWideVecs : kTileVecs;

template <int Kind>
using WeightOf = std::conditional_t<Kind == kGemmF32, float, std::conditional_t<Kind == kGemmF16, f16, bf16>>;
template <int Kind>
constexpr int kStep = Kind == kGemmBf16 || Kind == kGemmBf16Exact ? 2 : 1;
template <int Kind>
constexpr bool kDot = Kind == kGemmBf16 && kDotBf16;

// Rows of x per tile: the accumulators (rows x kTileVecs vectors) and one step's operands fit in
// the vector registers (32 on AVX-512, 16 otherwise).
template <int Kind>
constexpr int kTileRows =
#if defined(__AVX512F__)
    kStep<Kind> == 1 || kDot<Kind> ? 6 : 4;
#else
    2;
#endif

// Bytes ahead of the current step that a streaming tile prefetches (the panel is contiguous).
constexpr int64_t kFetchAhead = 1024;

// The panel vector that vector v of tile t (TV vectors wide) reads: left to right, or for a GLU
// panel gate vector i paired with up vector i, so that a tile holds both operands of its SwiGLU
// outputs.
template <int TV>
CORRAL_INLINE int tile_vector(bool glu, int t, int v) {
  constexpr int half = TV / 2, panel_half = kPanelVecs / 2;
  if (!glu) return t * TV + v;
  return v < half ? t * half + v : panel_half + t * half + (v - half);
}

CORRAL_INLINE VecF vsilu(VecF g) { return vdiv(g, vadd(vset1(1.f), vexp(vsub(vzero(), g)))); }

// The tile's outputs to y (GLU: silu(gate) * up of the paired vectors).
template <bool Glu, int MR, int TV>
CORRAL_INLINE void store_tile(float* y, int64_t ldy, VecF (&acc)[MR][TV], int t, int64_t n, bool accumulate) {
  constexpr int outs = Glu ? TV / 2 : TV;
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < outs; ++v) {
      const int64_t c = int64_t(t * outs + v) * kVecWidth;
      if (c >= n) break;
      const int64_t cnt = n - c < kVecWidth ? n - c : kVecWidth;
      float* dst = y + r * ldy + c;
      VecF val = Glu ? vmul(vsilu(acc[r][v]), acc[r][v + outs]) : acc[r][v];
      if (accumulate) val = vadd(cnt == kVecWidth ? vload(dst) : vload_n(dst, cnt), val);
      if (cnt == kVecWidth) vstore(dst, val);
      else vstore_n(dst, val, cnt);
    }
}

// y[r, 0:n) (+)= the MR rows of x against tile t of one panel; GLU: y[r, 0:n) = silu(gate) * up
// of the tile's columns. x is as prepare_x left it (floats, or bf16 pairs for vdpbf16ps).
template <int Kind, bool Glu, int MR, int TV>
CORRAL_INLINE void panel_tile(float* y, int64_t ldy, const void* xv, int64_t ldx, const void* wv, int64_t k, int t,
                              int64_t n, bool accumulate, bool fetch) {
  using W = WeightOf<Kind>;
  constexpr int P = kStep<Kind>;
  constexpr int64_t unit = kPanelCols * P;  // elements of one step
  const W* w = static_cast<const W*>(wv);
  int64_t off[TV];
  for (int v = 0; v < TV; ++v) off[v] = int64_t(tile_vector<TV>(Glu, t, v)) * kVecWidth * P;
  VecF acc[MR][TV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < TV; ++v) acc[r][v] = vzero();
  const int64_t steps = (k + P - 1) / P;
  for (int64_t s = 0; s < steps; ++s, w += unit) {
    if (fetch)
      for (int64_t b = 0; b < unit * int64_t(sizeof(W)); b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(w) + kFetchAhead + b, 0, 0);
    if constexpr (kDot<Kind>) {
#if defined(__AVX512BF16__)
      const uint32_t* x = static_cast<const uint32_t*>(xv);
      __m512i wr[TV];
      for (int v = 0; v < TV; ++v) wr[v] = _mm512_loadu_si512(w + off[v]);
      for (int r = 0; r < MR; ++r) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(int32_t(x[r * ldx + s]));
        for (int v = 0; v < TV; ++v) acc[r][v].v = _mm512_dpbf16_ps(acc[r][v].v, (__m512bh)wr[v], xb);
      }
#endif
    } else if constexpr (P == 2) {
      const float* x = static_cast<const float*>(xv) + 2 * s;
      for (int v = 0; v < TV; ++v) {
        VecF even, odd;
        vload_pairs(w + off[v], even, odd);
        for (int r = 0; r < MR; ++r) {
          acc[r][v] = vfma(vset1(x[r * ldx]), even, acc[r][v]);
          acc[r][v] = vfma(vset1(x[r * ldx + 1]), odd, acc[r][v]);
        }
      }
    } else {
      const float* x = static_cast<const float*>(xv) + s;
      VecF wr[TV];
      for (int v = 0; v < TV; ++v) wr[v] = vload(w + off[v]);
      for (int r = 0; r < MR; ++r) {
        const VecF xb = vset1(x[r * ldx]);
        for (int v = 0; v < TV; ++v) acc[r][v] = vfma(xb, wr[v], acc[r][v]);
      }
    }
  }
  store_tile<Glu, MR, TV>(y, ldy, acc, t, n, accumulate);
}

// One panel for `rows` rows: y[r, 0:n) (+)= x[r] . W[:, panel columns] (GLU: the SwiGLU of the
// panel's n gate/up column pairs), tile by tile. The first row tile prefetches the panel ahead.
template <int Kind, bool Glu>
void gemm_panel(float* y, int64_t ldy, const void* x, int64_t ldx, int64_t rows, const void* panel, int64_t k,
                int64_t n, bool accumulate, const QuantInfo&) {
  row_tiles<kTileRows<Kind>>(rows, [&](auto mr, int64_t r) __attribute__((always_inline)) {
    constexpr int MR = decltype(mr)::value, TV = kTileVecsOf<MR>;
    constexpr int outs_per_tile = (Glu ? TV / 2 : TV) * kVecWidth;
    const void* xr = static_cast<const uint32_t*>(x) + r * ldx;  // 4-byte elements: floats or pairs
    for (int t = 0; t < kPanelVecs / TV && t * outs_per_tile < n; ++t)
      panel_tile<Kind, Glu, MR, TV>(y + r * ldy, ldy, xr, ldx, panel, k, t, n, accumulate, r == 0 && t == 0);
  });
}

// x rows as the products of Kind read them, into buf (rows x (k + 1) floats at most): as given
// for float32 and float16 weights; padded to whole pairs for bf16 (Bf16Exact keeps float32 values;
// Bf16 rounds them to bf16 first, and packs the pairs for vdpbf16ps where it runs).
template <int Kind>
PreparedX prepare_x(void* buf, const float* x, int64_t ldx, int64_t rows, int64_t k) {
  if constexpr (kStep<Kind> == 1) {
    return {x, ldx};
  } else {
    const int64_t kp = (k + 1) / 2 * 2;
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = x + r * ldx;
      int64_t i = 0;
      if constexpr (kDot<Kind>) {
#if defined(__AVX512BF16__)
        uint16_t* d = static_cast<uint16_t*>(buf) + r * kp;
        for (; i + kVecWidth <= k; i += kVecWidth) {
          const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(vround_bf16(vload(src + i)).v), 16);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtepi32_epi16(bits));
        }
        for (; i < kp; ++i) d[i] = i < k ? to_bf16(src[i]).bits : 0;
#endif
      } else {
        float* d = static_cast<float*>(buf) + r * kp;
        for (; i + kVecWidth <= k; i += kVecWidth)
          vstore(d + i, Kind == kGemmBf16 ? vround_bf16(vload(src + i)) : vload(src + i));
        for (; i < kp; ++i) d[i] = i >= k ? 0.f : Kind == kGemmBf16 ? to_float(to_bf16(src[i])) : src[i];
      }
    }
    return {buf, kDot<Kind> ? kp / 2 : kp};
  }
}

}  // namespace corral::cpu::CORRAL_ISA_NS
