// The grouped GEMM of the MoE on tensor cores (bfloat16 or float16 weights and activations, float32
// accumulation): one launch covers every routed expert's rows and the shared expert's, each block
// a 64 x 64 tile of one expert (gate and up tiles side by side with the SwiGLU epilogue, applied in
// registers). nvcuda::wmma m16n16k16 fragments; a two-stage cp.async pipeline over K in steps of
// 32. B is read as stored: InOut (x @ W, routed experts) through row_major fragments, OutIn
// (nn.Linear, the shared expert) through col_major ones.
#pragma once

#include <mma.h>

#include <type_traits>

#include "moe_common.cuh"

namespace corral::cuda::moe_detail {

namespace tc {

constexpr int BM = kTileM, BN = kTileN, BK = 32;
constexpr int kThreads = 128;  // 4 warps in 2 x 2, each 32 x 32 of the tile
constexpr int LDA = BK + 8;    // smem row pitches (elements), padded against bank conflicts
constexpr int LDB_K = BN + 8;  // k-major B tile: [BK][LDB_K]
constexpr int LDB_N = BK + 8;  // n-major B tile: [BN][LDB_N]
constexpr int A_STAGE = BM * LDA;
constexpr int B_STAGE_MAX = BN * LDB_N > BK * LDB_K ? BN * LDB_N : BK * LDB_K;
// Two stages of A and of up to two B matrices (16-bit elements), then a 16 x 16 float staging
// tile per warp for the epilogue.
constexpr int kSmemBytes = (2 * A_STAGE + 2 * 2 * B_STAGE_MAX) * 2 + 4 * 256 * 4;
static_assert(kSmemBytes <= 48 * 1024, "static shared memory");

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: fills the 16 bytes with zeros, reads nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }

// One expert's (or the shared expert's) 64 x 64 tile. A: `rows` rows of the activations, zero
// padded to lda (a multiple of 8); B0/B1: the expert's weights. VecB: B's rows are 16-byte aligned
// and its contiguous extent a multiple of 8, so it is copied in 16-byte pieces (else element-wise).
template <class W, bool Swiglu, bool VecB, bool NMajor>
__device__ __forceinline__ void tile(const Operand& op, const Tile& t, int64_t n0, unsigned char* smem) {
  using namespace nvcuda;
  constexpr int NB = Swiglu ? 2 : 1;
  constexpr int LDB = NMajor ? LDB_N : LDB_K;
  constexpr int B_STAGE = NMajor ? BN * LDB_N : BK * LDB_K;
  using BLayout = typename std::conditional<NMajor, wmma::col_major, wmma::row_major>::type;

  W* As = reinterpret_cast<W*>(smem);  // [2][BM][LDA]
  W* Bs = As + 2 * A_STAGE;            // [2][NB][B_STAGE]
  float* Cs = reinterpret_cast<float*>(smem + (2 * A_STAGE + 2 * 2 * B_STAGE_MAX) * 2);

  const int64_t K = op.k, N = op.n, lda = op.lda, ldb = op.ldb;
  const W* A = static_cast<const W*>(op.a) + t.row * lda;
  const int64_t b_off = t.shared ? 0 : int64_t(t.expert) * op.b_stride;
  const W* B[NB];
  B[0] = static_cast<const W*>(op.b0) + b_off;
  if constexpr (Swiglu) B[1] = static_cast<const W*>(op.b1) + b_off;
  const int rows = t.rows;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp >> 1, wn = warp & 1;

  auto load_stage = [&](int stage, int64_t k0) {
    // A: BM rows x BK, in 16-byte pieces (lda is padded with zeros, so a piece starting below K
    // is whole); rows past the tile and pieces past K read as zeros.
    W* as = As + stage * A_STAGE;
#pragma unroll
    for (int i = 0; i < (BM * BK / 8) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int r = c / (BK / 8), kc = (c % (BK / 8)) * 8;
      const int64_t k = k0 + kc;
      const bool ok = r < rows && k < K;
      cp_async16(as + r * LDA + kc, ok ? A + r * lda + k : A, ok);
    }
#pragma unroll
    for (int m = 0; m < NB; ++m) {
      W* bs = Bs + (stage * NB + m) * B_STAGE;
      const W* b = B[m];
      if constexpr (VecB) {
#pragma unroll
        for (int i = 0; i < (BK * BN / 8) / kThreads; ++i) {
          const int c = tid + i * kThreads;
          if constexpr (NMajor) {  // BN rows (n) of BK / 8 pieces along k
            const int nr = c / (BK / 8), kc = (c % (BK / 8)) * 8;
            const int64_t n = n0 + nr, k = k0 + kc;
            const bool ok = n < N && k < K;
            cp_async16(bs + nr * LDB + kc, ok ? b + n * ldb + k : b, ok);
          } else {  // BK rows (k) of BN / 8 pieces along n
            const int kr = c / (BN / 8), nc = (c % (BN / 8)) * 8;
            const int64_t n = n0 + nc, k = k0 + kr;
            const bool ok = n < N && k < K;
            cp_async16(bs + kr * LDB + nc, ok ? b + k * ldb + n : b, ok);
          }
        }
      } else {
        const unsigned short* bu = reinterpret_cast<const unsigned short*>(b);
        unsigned short* su = reinterpret_cast<unsigned short*>(bs);
#pragma unroll 4
        for (int i = 0; i < (BK * BN) / kThreads; ++i) {
          const int c = tid + i * kThreads;
          if constexpr (NMajor) {
            const int nr = c / BK, kc = c % BK;
            const int64_t n = n0 + nr, k = k0 + kc;
            su[nr * LDB + kc] = n < N && k < K ? __ldg(bu + n * ldb + k) : (unsigned short)0;
          } else {
            const int kr = c / BN, nc = c % BN;
            const int64_t n = n0 + nc, k = k0 + kr;
            su[kr * LDB + nc] = n < N && k < K ? __ldg(bu + k * ldb + n) : (unsigned short)0;
          }
        }
      }
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NB][2][2];
#pragma unroll
  for (int m = 0; m < NB; ++m)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[m][i][j], 0.0f);

  const int64_t nk = (K + BK - 1) / BK;
  load_stage(0, 0);
  cp_async_commit();
  for (int64_t kt = 0; kt < nk; ++kt) {
    if (kt + 1 < nk) load_stage(int((kt + 1) & 1), (kt + 1) * BK);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning stage kt
    cp_async_wait_1();
    __syncthreads();
    const int s = int(kt & 1);
    const W* as = As + s * A_STAGE;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> a[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], as + (wm * 32 + i * 16) * LDA + kk, LDA);
#pragma unroll
      for (int m = 0; m < NB; ++m) {
        const W* bs = Bs + (s * NB + m) * B_STAGE;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, W, BLayout> b;
          const int nn = wn * 32 + j * 16;
          wmma::load_matrix_sync(b, NMajor ? bs + nn * LDB + kk : bs + kk * LDB + nn, LDB);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[m][i][j], a[i], b, acc[m][i][j]);
        }
      }
    }
    __syncthreads();  // stage s is refilled by the next iteration's loads
  }

  // Epilogue, one 16 x 16 fragment at a time through this warp's staging tile. SwiGLU combines
  // the gate and up fragments element by element (same fragment type: same element mapping).
  float* stage = Cs + warp * 256;
  using Out = typename std::conditional<Swiglu, W, float>::type;
  Out* C = static_cast<Out*>(op.c) + t.row * op.ldc;
  const int64_t col_end = Swiglu ? op.ldc : N;  // SwiGLU also zero-fills the padding [N, ldc)
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if constexpr (Swiglu) {
#pragma unroll
        for (int e = 0; e < acc[0][i][j].num_elements; ++e)
          acc[0][i][j].x[e] = silu(acc[0][i][j].x[e]) * acc[1][i][j].x[e];
      }
      wmma::store_matrix_sync(stage, acc[0][i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int rr = lane >> 1, cc = (lane & 1) * 8;
      const int r = wm * 32 + i * 16 + rr;
      const int64_t col0 = n0 + wn * 32 + j * 16 + cc;
      if (r < rows) {
#pragma unroll
        for (int v = 0; v < 8; ++v) {
          const int64_t col = col0 + v;
          if (col >= col_end) continue;
          float value = col < N ? stage[rr * 16 + cc + v] : 0.0f;
          if constexpr (!Swiglu) {
            if (op.accumulate) value += C[r * op.ldc + col];
          }
          C[r * op.ldc + col] = from_f32<Out>(value);
        }
      }
      __syncwarp();
    }
}

}  // namespace tc

// Grid: x = M tiles (routed experts', then the shared expert's), y = N tiles of kTileN columns.
template <class W, bool Swiglu, bool VecB>
__global__ void __launch_bounds__(tc::kThreads) grouped_gemm_tc(Groups g, Operand routed, Operand shared) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bfloat16 tensor cores and cp.async need sm_80
#else
  Tile t;
  if (!gemm_tile(g, blockIdx.x, t)) return;
  const Operand op = t.shared ? shared : routed;
  const int64_t n0 = int64_t(blockIdx.y) * tc::BN;
  if (n0 >= op.n) return;
  __shared__ __align__(128) unsigned char smem[tc::kSmemBytes];
  if (op.n_major) tc::tile<W, Swiglu, VecB, true>(op, t, n0, smem);
  else tc::tile<W, Swiglu, VecB, false>(op, t, n0, smem);
#endif
}

}  // namespace corral::cuda::moe_detail
