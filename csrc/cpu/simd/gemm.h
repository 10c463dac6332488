// Register-tiled inner loops of kernels::linear: one panel of output columns for all rows.
#pragma once

#include "isa.h"
#include "simd/vec.h"

namespace corral::cpu::CORRAL_ISA_NS {

// Rows of x per register tile (rows x 4 accumulators): AVX-512 has 32 vector registers, AVX2 and
// the baseline 16. Every row's sums run in the same order whatever tile it falls in, so a row's
// result does not depend on how many rows come with it.
#if defined(__AVX512F__)
constexpr int kRowsPerTile = 6;
#else
constexpr int kRowsPerTile = 2;
#endif

// W stored [out, in]: y[r, j] = dot(x[r, :], w[j, :]) for r < rows, j < n; w rows ldw apart.
// MR rows of x against 4 rows of W share every vector load.
template <class W, int MR, int NR>
CORRAL_INLINE void dot_tile(float* y, int64_t ldy, const float* x, int64_t ldx, const W* w,
                            int64_t ldw, int64_t k, bool accumulate) {
  VecF acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vzero();
  int64_t p = 0;
  for (; p + kVecWidth <= k; p += kVecWidth) {
    VecF wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = vload(w + j * ldw + p);
    for (int i = 0; i < MR; ++i) {
      const VecF xv = vload(x + i * ldx + p);
      for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = vsum(acc[i][j]);
      for (int64_t q = p; q < k; ++q) s += x[i * ldx + q] * to_float(w[j * ldw + q]);
      y[i * ldy + j] = accumulate ? y[i * ldy + j] + s : s;
    }
  }
}

template <class W, int MR>
CORRAL_INLINE void dot_rows(float* y, int64_t ldy, const float* x, int64_t ldx, const W* w,
                            int64_t ldw, int64_t n, int64_t k, bool accumulate) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) dot_tile<W, MR, 4>(y + j, ldy, x, ldx, w + j * ldw, ldw, k, accumulate);
  for (; j < n; ++j) dot_tile<W, MR, 1>(y + j, ldy, x, ldx, w + j * ldw, ldw, k, accumulate);
}

template <class W>
void gemm_outin(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const void* wv,
                int64_t ldw, int64_t n, int64_t k, bool accumulate) {
  const W* w = static_cast<const W*>(wv);
  row_tiles<kRowsPerTile>(rows, [&](auto mr, int64_t r) __attribute__((always_inline)) {
    dot_rows<W, decltype(mr)::value>(y + r * ldy, ldy, x + r * ldx, ldx, w, ldw, n, k, accumulate);
  });
}

// Rows of W ahead that the InOut kernels prefetch: each row segment starts a new page, where the
// hardware prefetchers stall; one prefetch per cache line keeps enough reads in flight.
constexpr int64_t kPrefetchRows = 8;

// W stored [in, out] (rows ldw apart): y[r, 0:n] = sum_p x[r, p] * w[p, 0:n]. Each W row segment
// is loaded once per MR rows of x; NV vectors of columns per tile. fetch: prefetch W rows ahead
// (the first pass over a panel; later passes find it in cache).
template <class W, int MR, int NV>
CORRAL_INLINE void axpy_tile(float* y, int64_t ldy, const float* x, int64_t ldx, const W* w,
                             int64_t ldw, int64_t k, bool accumulate, bool fetch) {
  VecF acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vzero();
  for (int64_t p = 0; p < k; ++p) {
    if (fetch && p + kPrefetchRows < k)  // one prefetch per cache line
      for (int j = 0; j < NV; ++j)
        if ((j * kVecWidth * int64_t(sizeof(W))) % 64 == 0)
          __builtin_prefetch(w + (p + kPrefetchRows) * ldw + j * kVecWidth, 0, 3);
    VecF wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = vload(w + p * ldw + j * kVecWidth);
    for (int i = 0; i < MR; ++i) {
      const VecF xb = vset1(x[i * ldx + p]);
      for (int j = 0; j < NV; ++j) acc[i][j] = vfma(xb, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NV; ++j) {
      float* dst = y + i * ldy + j * kVecWidth;
      vstore(dst, accumulate ? vadd(vload(dst), acc[i][j]) : acc[i][j]);
    }
  }
}

template <class W, int MR>
CORRAL_INLINE void axpy_rows(float* y, int64_t ldy, const float* x, int64_t ldx, const W* w,
                             int64_t ldw, int64_t n, int64_t k, bool accumulate, bool fetch) {
  constexpr int kNV = 4;
  int64_t j = 0;
  for (; j + kNV * kVecWidth <= n; j += kNV * kVecWidth)
    axpy_tile<W, MR, kNV>(y + j, ldy, x, ldx, w + j, ldw, k, accumulate, fetch);
  for (; j + kVecWidth <= n; j += kVecWidth)
    axpy_tile<W, MR, 1>(y + j, ldy, x, ldx, w + j, ldw, k, accumulate, fetch);
  for (; j < n; ++j) {  // columns past the last full vector
    for (int i = 0; i < MR; ++i) {
      float s = 0.f;
      for (int64_t p = 0; p < k; ++p) s += x[i * ldx + p] * to_float(w[p * ldw + j]);
      y[i * ldy + j] = accumulate ? y[i * ldy + j] + s : s;
    }
  }
}

template <class W>
void gemm_inout(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const void* wv,
                int64_t ldw, int64_t n, int64_t k, bool accumulate) {
  const W* w = static_cast<const W*>(wv);
  row_tiles<kRowsPerTile>(rows, [&](auto mr, int64_t r) __attribute__((always_inline)) {
    axpy_rows<W, decltype(mr)::value>(y + r * ldy, ldy, x + r * ldx, ldx, w, ldw, n, k, accumulate, r == 0);
  });
}

// Column vectors of y that stream_rows updates per row of x: each broadcast of x then serves
// NV multiply-adds (the G x NV vectors of W stay in registers).
#if defined(__AVX512F__)
constexpr int kStreamVecs = 2;
#else
constexpr int kStreamVecs = 1;
#endif

// y[r, j:j + NV vectors] += sum_q x[r, p + q] * w[p + q, j:...] for the G rows of W from row p
// (w0), each loaded once for every row of x, each row of y loaded and stored once per G terms.
// Prefetches the rows 2G to 3G ahead, one prefetch per cache line.
template <class W, int G, int NV>
CORRAL_INLINE void stream_cols(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const W* w0,
                               int64_t ldw, int64_t j, int64_t p, int64_t k) {
  for (int v = 0; v < NV; ++v)
    if (p + 3 * G <= k && ((j + v * kVecWidth) * int64_t(sizeof(W))) % 64 == 0)
      for (int q = 2 * G; q < 3 * G; ++q) __builtin_prefetch(w0 + q * ldw + j + v * kVecWidth, 0, 1);
  VecF wv[G][NV];
  for (int q = 0; q < G; ++q)
    for (int v = 0; v < NV; ++v) wv[q][v] = vload(w0 + q * ldw + j + v * kVecWidth);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx + p;
    float* dst = y + r * ldy + j;
    VecF acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = vload(dst + v * kVecWidth);
    for (int q = 0; q < G; ++q) {
      const VecF xb = vset1(xr[q]);
      for (int v = 0; v < NV; ++v) acc[v] = vfma(xb, wv[q][v], acc[v]);
    }
    for (int v = 0; v < NV; ++v) vstore(dst + v * kVecWidth, acc[v]);
  }
}

// y[r, 0:n] += sum_q x[r, p + q] * w[p + q, 0:n] for the G rows of W from row p.
template <class W, int G>
CORRAL_INLINE void stream_rows(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const W* w,
                               int64_t ldw, int64_t n, int64_t p, int64_t k) {
  const W* w0 = w + p * ldw;
  int64_t j = 0;
  for (; j + kStreamVecs * kVecWidth <= n; j += kStreamVecs * kVecWidth)
    stream_cols<W, G, kStreamVecs>(y, ldy, x, ldx, rows, w0, ldw, j, p, k);
  for (; j + kVecWidth <= n; j += kVecWidth) stream_cols<W, G, 1>(y, ldy, x, ldx, rows, w0, ldw, j, p, k);
  for (; j < n; ++j)  // columns past the last full vector: as axpy_rows' tail, without FMA
    for (int64_t r = 0; r < rows; ++r)
      for (int q = 0; q < G; ++q) y[r * ldy + j] += x[r * ldx + p + q] * to_float(w0[q * ldw + j]);
}

// W stored [in, out] (rows ldw apart), for few rows of x (at most kStreamRows): y[r, 0:n] +=
// sum_p x[r, p] * w[p, 0:n], reading W row after row, each row contiguously, eight at a time
// (strided column panels of W wait on memory). Into a zeroed y it gives the bits gemm_inout gives
// for the same k range: every element sums over p in order, with fused multiply-adds on full
// vectors and plain ones on the columns past them.
template <class W>
void gemm_inout_stream(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const void* wv,
                       int64_t ldw, int64_t n, int64_t k, bool /*accumulate: always*/) {
  const W* w = static_cast<const W*>(wv);
  int64_t p = 0;
  for (; p + 8 <= k; p += 8) stream_rows<W, 8>(y, ldy, x, ldx, rows, w, ldw, n, p, k);
  for (; p < k; ++p) stream_rows<W, 1>(y, ldy, x, ldx, rows, w, ldw, n, p, k);
}

}  // namespace corral::cpu::CORRAL_ISA_NS
