// The decode path of the MoE: few rows per expert (at most R <= kMaxGemvRows), so the products
// are bound by reading the weights. Also the router logits, in chunks of R tokens, and
// kernels::linear's few rows. Each block streams a slice of one active expert's weights exactly
// once, in 16-byte loads, for all of that expert's rows; blockIdx.y is the active-expert slot
// (experts without tokens get no slot), the last slot the shared expert. Activations are float32
// (zero-padded rows, pitch a multiple of 8), accumulation float32, output float32.
//
// InOut weights (routed experts, x @ W, k-major): column threads x k-slices; a column thread owns
// V consecutive columns (one 16-byte load per row of W), a k-slice every KS-th group of 4 rows of
// W; k-slices are summed through shared memory in a fixed order (deterministic).
// OutIn weights (nn.Linear, n-major): a warp owns a few output columns (rows of W) and its lanes
// stride along k in 16-byte loads; warp shuffles sum the lanes.
#pragma once

#include "moe_common.cuh"

namespace corral::cuda::moe_detail {

namespace gemv {

constexpr int kThreads = 256;
// k-major: column threads per block (with SwiGLU half read the gate, half the up projection) and
// k-slices. Either way a block produces 8 * V output columns: narrow blocks, so that even one
// expert's down projection spreads over many SMs.
template <bool Swiglu>
constexpr int kmajor_ct() { return Swiglu ? 16 : 8; }
template <int V, bool Swiglu>
constexpr int kmajor_cols() { return 8 * V; }
// Loop unrolling: deeper for few rows; at 8 rows the registers go to accumulators.
template <int R>
constexpr int unroll() { return R <= 2 ? 2 : 1; }
template <bool Swiglu>
constexpr int nmajor_per_warp() { return Swiglu ? 2 : 4; }
template <bool Swiglu>
constexpr int nmajor_cols() { return (kThreads / 32) * nmajor_per_warp<Swiglu>(); }

template <class W, int R, bool Swiglu, int V>
__device__ __forceinline__ void kmajor(const Operand& op, const Tile& t) {
  constexpr int CT = kmajor_ct<Swiglu>(), KS = kThreads / CT;
  constexpr int COLS = kmajor_cols<V, Swiglu>();
  constexpr int RED = CT * V;  // partial sums per row: every column thread's V columns
  constexpr int UNROLL = unroll<R>();
  const int64_t n0 = int64_t(blockIdx.x) * COLS;
  if (n0 >= op.n) return;
  __shared__ float red[KS][RED];
  __shared__ float res[R][RED];

  const int64_t K = op.k, N = op.n, lda = op.lda, ldb = op.ldb;
  const int rows = t.rows;
  const int tid = threadIdx.x, ct = tid % CT, ks = tid / CT;
  const float* A = static_cast<const float*>(op.a) + t.row * lda;
  const int64_t b_off = t.shared ? 0 : int64_t(t.expert) * op.b_stride;
  // With SwiGLU the first CT / 2 column threads read the gate, the others the up projection.
  const W* B;
  int64_t col;
  if constexpr (Swiglu) {
    B = static_cast<const W*>(ct < CT / 2 ? op.b0 : op.b1) + b_off;
    col = n0 + int64_t(ct % (CT / 2)) * V;
  } else {
    B = static_cast<const W*>(op.b0) + b_off;
    col = n0 + int64_t(ct) * V;
  }
  const bool col_ok = col < N;  // V divides N when V > 1

  float acc[R][V];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[r][v] = 0.0f;

  if (col_ok) {
#pragma unroll UNROLL
    for (int64_t kb = int64_t(ks) * 4; kb < K; kb += KS * 4) {
      // Rows of A are zero-padded to lda (a multiple of 8 >= K): the 4 floats at kb are readable.
      float a[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < rows) q = __ldg(reinterpret_cast<const float4*>(A + r * lda + kb));
        a[r][0] = q.x;
        a[r][1] = q.y;
        a[r][2] = q.z;
        a[r][3] = q.w;
      }
      float w[4][V];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (kb + j < K) {
          load_weights<W, V>(B + (kb + j) * ldb + col, w[j]);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) w[j][v] = 0.0f;
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[r][v] = fmaf(a[r][j], w[j][v], acc[r][v]);
    }
  }

  // Sum the k-slices, one row at a time (rows is the same for the whole block).
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
#pragma unroll
    for (int v = 0; v < V; ++v) red[ks][ct * V + v] = acc[r][v];
    __syncthreads();
    for (int c = tid; c < RED; c += kThreads) {
      float s = 0.0f;
#pragma unroll
      for (int q = 0; q < KS; ++q) s += red[q][c];
      res[r][c] = s;
    }
    __syncthreads();
  }

  float* C = static_cast<float*>(op.c) + t.row * op.ldc;
  for (int idx = tid; idx < rows * COLS; idx += kThreads) {
    const int r = idx / COLS, c = idx % COLS;
    const int64_t oc = n0 + c;
    if constexpr (Swiglu) {
      // Gate column c sits at res[r][c], its up column at res[r][COLS + c]. Padding [N, ldc) gets 0.
      if (oc < op.ldc) C[r * op.ldc + oc] = oc < N ? silu(res[r][c]) * res[r][COLS + c] : 0.0f;
    } else {
      if (oc < N) C[r * op.ldc + oc] = op.accumulate ? C[r * op.ldc + oc] + res[r][c] : res[r][c];
    }
  }
}

template <class W, int R, bool Swiglu, int V>
__device__ __forceinline__ void nmajor(const Operand& op, const Tile& t) {
  constexpr int NPW = nmajor_per_warp<Swiglu>();
  constexpr int COLS = nmajor_cols<Swiglu>();
  constexpr int NS = Swiglu ? 2 * NPW : NPW;  // weight rows streamed per warp: gates, then ups
  const int64_t n0 = int64_t(blockIdx.x) * COLS;
  if (n0 >= op.n) return;

  const int64_t K = op.k, N = op.n, lda = op.lda, ldb = op.ldb;
  const int rows = t.rows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* A = static_cast<const float*>(op.a) + t.row * lda;
  const int64_t b_off = t.shared ? 0 : int64_t(t.expert) * op.b_stride;
  const int64_t col0 = n0 + int64_t(warp) * NPW;

  const W* wrow[NS];
  bool ok[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int64_t c = col0 + s % NPW;
    ok[s] = c < N;
    wrow[s] = static_cast<const W*>(s < NPW ? op.b0 : op.b1) + b_off + (ok[s] ? c : 0) * ldb;
  }

  float acc[NS][R];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[s][r] = 0.0f;

  // V divides K when V > 1, so a lane's V weights at k are all in range.
  constexpr int UNROLL = unroll<R>();
#pragma unroll UNROLL
  for (int64_t k = int64_t(lane) * V; k < K; k += 32 * V) {
    float w[NS][V];
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      if (ok[s]) {
        load_weights<W, V>(wrow[s] + k, w[s]);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) w[s][v] = 0.0f;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows) break;
      float a[V];
      if constexpr (V % 4 == 0) {
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
          const float4 f = __ldg(reinterpret_cast<const float4*>(A + r * lda + k) + q);
          a[4 * q] = f.x;
          a[4 * q + 1] = f.y;
          a[4 * q + 2] = f.z;
          a[4 * q + 3] = f.w;
        }
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) a[v] = __ldg(A + r * lda + k + v);
      }
#pragma unroll
      for (int s = 0; s < NS; ++s)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[s][r] = fmaf(a[v], w[s][v], acc[s][r]);
    }
  }

#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[s][r] += __shfl_xor_sync(0xffffffffu, acc[s][r], off);

  if (lane != 0) return;
  float* C = static_cast<float*>(op.c) + t.row * op.ldc;
#pragma unroll
  for (int p = 0; p < NPW; ++p) {
    const int64_t oc = col0 + p;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows) break;
      if constexpr (Swiglu) {
        if (oc < op.ldc) C[r * op.ldc + oc] = oc < N ? silu(acc[p][r]) * acc[NPW + p][r] : 0.0f;
      } else {
        if (oc < N) C[r * op.ldc + oc] = op.accumulate ? C[r * op.ldc + oc] + acc[p][r] : acc[p][r];
      }
    }
  }
}

}  // namespace gemv

// Grid: x = column tiles (the most any included operand needs), y = active-expert slots then the
// shared expert, z = chunks of R rows of the shared expert (the router's tokens; 1 for the experts).
// Vec: 16-byte weight loads (the host checked alignment and divisibility).
template <class W, int R, bool Swiglu, bool Vec>
__global__ void __launch_bounds__(gemv::kThreads) grouped_gemv(Groups g, Operand routed, Operand shared) {
  constexpr int V = Vec ? Vec16<W>::kElems : 1;
  Tile t;
  if (!gemv_slot(g, blockIdx.y, blockIdx.z, R, t)) return;
  const Operand op = t.shared ? shared : routed;
  if (op.n_major) gemv::nmajor<W, R, Swiglu, V>(op, t);
  else gemv::kmajor<W, R, Swiglu, V>(op, t);
}

}  // namespace corral::cuda::moe_detail
