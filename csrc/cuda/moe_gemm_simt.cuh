// The grouped GEMM of the MoE on CUDA cores, all in float32: float32 activations, weights of any
// float dtype converted on load, float32 output. Serves float32 expert weights (exactness over
// speed), the router logits and kernels::linear's float32 activations. Same tiling of rows as the
// tensor-core kernel (kTileM x kTileN tiles, one expert per tile, the same routing tables); 256
// threads, 4 x 4 outputs each (per matrix), element-wise guarded loads (any shape, stride and
// alignment).
#pragma once

#include "moe_common.cuh"

namespace corral::cuda::moe_detail {

namespace simt {

constexpr int BM = kTileM, BN = kTileN, BK = 16;
constexpr int kThreads = 256;

template <class W, bool Swiglu>
__device__ __forceinline__ void tile(const Operand& op, const Tile& t, int64_t n0) {
  constexpr int NB = Swiglu ? 2 : 1;
  __shared__ float As[BK][BM + 4];      // As[k][m]
  __shared__ float Bs[NB][BK][BN + 4];  // Bs[k][n]

  const int64_t K = op.k, N = op.n, lda = op.lda, ldb = op.ldb;
  const float* A = static_cast<const float*>(op.a) + t.row * lda;
  const int64_t b_off = t.shared ? 0 : int64_t(t.expert) * op.b_stride;
  const W* B[NB];
  B[0] = static_cast<const W*>(op.b0) + b_off;
  if constexpr (Swiglu) B[1] = static_cast<const W*>(op.b1) + b_off;
  const bool n_major = op.n_major != 0;
  const int rows = t.rows;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;

  float acc[NB][4][4];
#pragma unroll
  for (int m = 0; m < NB; ++m)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[m][i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
    for (int q = 0; q < (BM * BK) / kThreads; ++q) {
      const int idx = tid + q * kThreads;
      const int m = idx / BK, kk = idx % BK;  // consecutive threads along a row of A
      const int64_t k = k0 + kk;
      As[kk][m] = m < rows && k < K ? A[m * lda + k] : 0.0f;
    }
#pragma unroll
    for (int mat = 0; mat < NB; ++mat) {
#pragma unroll
      for (int q = 0; q < (BN * BK) / kThreads; ++q) {
        const int idx = tid + q * kThreads;
        // Consecutive threads along B's contiguous axis.
        const int n = n_major ? idx / BK : idx % BN;
        const int kk = n_major ? idx % BK : idx / BN;
        const int64_t gn = n0 + n, gk = k0 + kk;
        float v = 0.0f;
        if (gn < N && gk < K) v = load_f32(B[mat] + (n_major ? gn * ldb + gk : gk * ldb + gn));
        Bs[mat][kk][n] = v;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int mat = 0; mat < NB; ++mat)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float b = Bs[mat][kk][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mat][i][j] = fmaf(a[i], b, acc[mat][i][j]);
        }
    }
    __syncthreads();
  }

  float* C = static_cast<float*>(op.c) + t.row * op.ldc;
  const int64_t col_end = Swiglu ? op.ldc : N;  // SwiGLU also zero-fills the padding [N, ldc)
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= col_end) continue;
      float v = acc[0][i][j];
      if constexpr (Swiglu) v = col < N ? silu(v) * acc[1][i][j] : 0.0f;
      else if (op.accumulate) v += C[r * op.ldc + col];
      C[r * op.ldc + col] = v;
    }
  }
}

}  // namespace simt

// Grid: x = M tiles (routed experts', then the shared expert's), y = N tiles of kTileN columns.
template <class W, bool Swiglu>
__global__ void __launch_bounds__(simt::kThreads) grouped_gemm_simt(Groups g, Operand routed, Operand shared) {
  Tile t;
  if (!gemm_tile(g, blockIdx.x, t)) return;
  const Operand op = t.shared ? shared : routed;
  const int64_t n0 = int64_t(blockIdx.y) * simt::BN;
  if (n0 >= op.n) return;
  simt::tile<W, Swiglu>(op, t, n0);
}

}  // namespace corral::cuda::moe_detail
