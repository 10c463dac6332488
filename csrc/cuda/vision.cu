// The vision encoder's ops on CUDA (contracts: corral/kernels/norm.h layer_norm, activation.h gelu,
// linear.h add_rows, rope.h rope_2d, attention.h attention_dense, image.h unfold_patches and
// pixel_shuffle). Float32 arithmetic in the CPU code's order (explicit _rn intrinsics where nvcc
// would otherwise contract a multiply and an add), so the element-wise ops round as the CPU does;
// the reductions (LayerNorm's statistics, attention's sums) run in other orders.
//
// Every kernel walks its rows (and columns) in grid-stride loops: grids are capped, so no input
// size overflows a launch dimension.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "check.h"
#include "convert.cuh"
#include "corral/error.h"
#include "device_limits.h"
#include "launch.cuh"
#include "ops.h"
#include "rope.cuh"

namespace corral::cuda {

namespace {

// ---- LayerNorm -----------------------------------------------------------------------------------

// The sum of every thread's v, returned to all threads (a multiple of 32 threads; `partial` holds
// 32 doubles of shared memory). Every thread adds the warps' sums in the same order.
__device__ double block_sum(double v, double* partial) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();  // the previous call's readers are done with `partial`
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  double s = 0.0;
  for (int i = 0; i < int(blockDim.x / 32); ++i) s += partial[i];
  return s;
}

// A block per row: mean, then the biased variance around it (both in double), then one pass in
// float32 as the CPU computes it. Every x of a row is read before any y of it is written, so y may
// alias x.
template <class W>
__global__ void layer_norm_kernel(float* y, const float* x, const W* w, const W* b, int64_t rows, int64_t dim,
                                  float eps) {
  __shared__ double partial[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* xr = x + row * dim;
    float* yr = y + row * dim;
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += double(xr[i]);
    const double mean = block_sum(sum, partial) / double(dim);
    double sq = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const double d = double(xr[i]) - mean;
      sq += d * d;
    }
    const double var = block_sum(sq, partial) / double(dim);
    const float m = float(mean), inv = float(1.0 / sqrt(var + double(eps)));
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float n = __fmul_rn(__fmul_rn(__fsub_rn(xr[i], m), inv), to_f32(w[i]));
      yr[i] = b ? __fadd_rn(n, to_f32(b[i])) : n;
    }
  }
}

// ---- element-wise ops ----------------------------------------------------------------------------

// x * (1 + erf(x / sqrt(2))) / 2 as the CPU rounds it: (0.5 * x) * (1 + erf(x * 0.70710677)).
__global__ void gelu_kernel(float* x, int64_t ld, int64_t rows, int64_t n) {
  const float kRsqrt2 = 0.70710678118654752440f;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float* xr = x + r * ld;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
      const float v = xr[i];
      xr[i] = __fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.0f, erff(__fmul_rn(v, kRsqrt2))));
    }
  }
}

template <class T>
__global__ void add_rows_kernel(float* y, int64_t ldy, int64_t rows, const T* src, int64_t n, int64_t src_rows) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float* yr = y + r * ldy;
    const T* s = src + (r % src_rows) * n;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
      yr[i] = __fadd_rn(yr[i], to_f32(s[i]));
  }
}

// ---- dense attention ---------------------------------------------------------------------------

// A block per (sequence, head, tile of kAttnRows query rows), with an online softmax over tiles of
// kAttnKeys keys: a warp owns kAttnRowsPerWarp rows; for the scores a lane owns a key, for the
// output a lane owns columns lane + 32 c (c < NC). Shared memory: the q tile [kAttnRows][d4], the
// K tile [kAttnKeys][ks] (ks = 4 x odd: float4 reads of 8 lanes' keys hit distinct banks), the V
// tile [kAttnKeys][d4] and the tile's probabilities [kAttnRows][kAttnKeys]; d4 = head_dim rounded
// up to 4, zero padded.
constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kAttnRowsPerWarp = 4;
constexpr int kAttnRows = kAttnWarps * kAttnRowsPerWarp;
constexpr int kAttnKeys = 32;
constexpr int kAttnMaxHeadDim = 256;

struct DenseGeo {
  int d4, ks;
  size_t smem;
};

DenseGeo dense_geometry(int64_t head_dim) {
  DenseGeo g{};
  g.d4 = int((head_dim + 3) / 4 * 4);
  g.ks = (g.d4 / 4) % 2 ? g.d4 : g.d4 + 4;
  g.smem = size_t(kAttnRows * g.d4 + kAttnKeys * g.ks + kAttnKeys * g.d4 + kAttnRows * kAttnKeys) * sizeof(float);
  return g;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <int NC>
__global__ void __launch_bounds__(kAttnThreads)
    attention_dense_kernel(float* out, const float* q, const float* k, const float* v, int64_t ld, int64_t seqs,
                           int64_t len, int64_t heads, int d, int d4, int ks, float scale) {
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);
  float* kt = qs + kAttnRows * d4;
  float* vt = kt + kAttnKeys * ks;
  float* pt = vt + kAttnKeys * d4;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t q_tiles = (len + kAttnRows - 1) / kAttnRows, items = seqs * heads * q_tiles;
  const int64_t width = heads * d;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    // Query tiles vary fastest: the blocks running together read one (sequence, head)'s K and V.
    const int64_t qt = item % q_tiles, sh = item / q_tiles, h = sh % heads, seq = sh / heads;
    const int64_t row0 = seq * len, q0 = qt * kAttnRows;
    const int nq = int(std::min<int64_t>(kAttnRows, len - q0));
    __syncthreads();  // the previous item is done with shared memory
    for (int r = warp; r < kAttnRows; r += kAttnWarps)
      for (int c = lane; c < d4; c += 32)
        qs[r * d4 + c] = r < nq && c < d ? q[(row0 + q0 + r) * ld + h * d + c] : 0.f;

    float m[kAttnRowsPerWarp], l[kAttnRowsPerWarp], acc[kAttnRowsPerWarp][NC];
#pragma unroll
    for (int r = 0; r < kAttnRowsPerWarp; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) acc[r][c] = 0.f;
    }
    for (int64_t j0 = 0; j0 < len; j0 += kAttnKeys) {
      const int nk = int(std::min<int64_t>(kAttnKeys, len - j0));
      __syncthreads();  // the q tile is written; the previous key tile is consumed
      for (int j = warp; j < kAttnKeys; j += kAttnWarps) {
        const int64_t at = (row0 + j0 + j) * ld + h * d;
        for (int c = lane; c < d4; c += 32) {
          const bool in = j < nk && c < d;
          kt[j * ks + c] = in ? k[at + c] : 0.f;
          vt[j * d4 + c] = in ? v[at + c] : 0.f;
        }
      }
      __syncthreads();

      // Scores of key `lane` for the warp's rows.
      float s[kAttnRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kAttnRowsPerWarp; ++r) s[r] = 0.f;
      const float4* k4 = reinterpret_cast<const float4*>(kt + lane * ks);
      for (int c4 = 0; c4 < d4 / 4; ++c4) {
        const float4 kv = k4[c4];
#pragma unroll
        for (int r = 0; r < kAttnRowsPerWarp; ++r) {
          const float4 qv = reinterpret_cast<const float4*>(qs + (warp * kAttnRowsPerWarp + r) * d4)[c4];
          s[r] = fmaf(qv.x, kv.x, s[r]);
          s[r] = fmaf(qv.y, kv.y, s[r]);
          s[r] = fmaf(qv.z, kv.z, s[r]);
          s[r] = fmaf(qv.w, kv.w, s[r]);
        }
      }
      // Online softmax: the running max moves to the tile's, the sums and outputs rescale.
#pragma unroll
      for (int r = 0; r < kAttnRowsPerWarp; ++r) {
        const float sc = lane < nk ? s[r] * scale : -INFINITY;
        const float m_new = fmaxf(m[r], warp_max(sc));
        const float alpha = m[r] == m_new ? 1.f : expf(m[r] - m_new);
        const float p = sc == -INFINITY ? 0.f : expf(sc - m_new);
        l[r] = l[r] * alpha + warp_sum(p);
        m[r] = m_new;
        pt[(warp * kAttnRowsPerWarp + r) * kAttnKeys + lane] = p;
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[r][c] *= alpha;
      }
      __syncwarp();
      for (int j = 0; j < nk; ++j) {
        float vv[NC];
#pragma unroll
        for (int c = 0; c < NC; ++c) vv[c] = lane + 32 * c < d ? vt[j * d4 + lane + 32 * c] : 0.f;
#pragma unroll
        for (int r = 0; r < kAttnRowsPerWarp; ++r) {
          const float p = pt[(warp * kAttnRowsPerWarp + r) * kAttnKeys + j];
#pragma unroll
          for (int c = 0; c < NC; ++c) acc[r][c] = fmaf(p, vv[c], acc[r][c]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kAttnRowsPerWarp; ++r) {
      const int row = warp * kAttnRowsPerWarp + r;
      if (row >= nq) continue;
      const float inv = 1.f / l[r];
      float* o = out + (row0 + q0 + row) * width + h * d;
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (lane + 32 * c < d) o[lane + 32 * c] = acc[r][c] * inv;
    }
  }
}

template <int NC>
void launch_attention_dense(cudaStream_t s, float* out, const float* q, const float* k, const float* v, int64_t ld,
                            int64_t seqs, int64_t len, int64_t heads, int64_t head_dim, float scale) {
  const DenseGeo g = dense_geometry(head_dim);
  allow_shared_memory(attention_dense_kernel<NC>, g.smem, "attention_dense");
  const int64_t items = seqs * heads * ((len + kAttnRows - 1) / kAttnRows);
  attention_dense_kernel<NC><<<blocks_for(items), kAttnThreads, g.smem, s>>>(out, q, k, v, ld, seqs, len, heads,
                                                                              int(head_dim), g.d4, g.ks, scale);
  CORRAL_CUDA_CHECK_LAUNCH();
}

// ---- layout ops ----------------------------------------------------------------------------------

// A thread per output element: row t * grid^2 + gy * grid + gx, column c * patch^2 + ky * patch + kx.
__global__ void unfold_patches_kernel(float* out, const float* pixels, int64_t rows, int64_t channels, int64_t size,
                                      int64_t patch) {
  const int64_t grid = size / patch, pp = patch * patch, cols = channels * pp;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t t = row / (grid * grid), gy = row % (grid * grid) / grid, gx = row % grid;
    const float* tile = pixels + t * channels * size * size + gy * patch * size + gx * patch;
    float* o = out + row * cols;
    for (int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; col < cols;
         col += int64_t(gridDim.x) * blockDim.x) {
      const int64_t c = col / pp, ky = col % pp / patch, kx = col % patch;
      o[col] = tile[(c * size + ky) * size + kx];
    }
  }
}

// A thread per output element: token t * g^2 + r * g + c (g = grid / s), column (dy * s + dx) * dim + ch.
__global__ void pixel_shuffle_kernel(float* out, const float* x, int64_t rows, int64_t tile_rows, int64_t grid,
                                     int64_t dim, int64_t s) {
  const int64_t g = grid / s, width = s * s * dim;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t t = row / (g * g), r = row % (g * g) / g, c = row % g;
    const float* src = x + (t * tile_rows + s * r * grid + s * c) * dim;
    float* o = out + row * width;
    for (int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; col < width;
         col += int64_t(gridDim.x) * blockDim.x) {
      const int64_t q = col / dim, ch = col % dim, dy = q / s, dx = q % s;
      o[col] = src[(dy * grid + dx) * dim + ch];
    }
  }
}

}  // namespace

void layer_norm(void* stream, float* y, const float* x, const void* w, const void* b, DType w_dtype, int64_t rows,
                int64_t dim, float eps) {
  if (rows <= 0 || dim <= 0) return;
  if (!y || !x || !w) throw InvalidInputError("layer_norm: a pointer is null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  with_float_type(w_dtype, "layer_norm weight", [&](auto tag) {
    using W = typename decltype(tag)::type;
    layer_norm_kernel<W><<<blocks_for(rows), threads_for_row(dim), 0, s>>>(
        y, x, static_cast<const W*>(w), static_cast<const W*>(b), rows, dim, eps);
    CORRAL_CUDA_CHECK_LAUNCH();
  });
}

void gelu(void* stream, float* x, int64_t ld, int64_t rows, int64_t n) {
  if (rows <= 0 || n <= 0) return;
  if (!x) throw InvalidInputError("gelu: x is null");
  constexpr int threads = 256;
  gelu_kernel<<<rows_cols_grid(rows, n, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(x, ld, rows, n);
  CORRAL_CUDA_CHECK_LAUNCH();
}

void add_rows(void* stream, float* y, int64_t ldy, int64_t rows, const void* src, DType dtype, int64_t n,
              int64_t src_rows) {
  if (rows <= 0 || n <= 0) return;
  if (src_rows <= 0) throw ShapeError("add_rows: the source has no rows");
  if (!y || !src) throw InvalidInputError("add_rows: a pointer is null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  with_float_type(dtype, "add_rows source", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int threads = 256;
    add_rows_kernel<T><<<rows_cols_grid(rows, n, threads), threads, 0, s>>>(y, ldy, rows, static_cast<const T*>(src),
                                                                            n, src_rows);
    CORRAL_CUDA_CHECK_LAUNCH();
  });
}

void rope_2d(void* stream, float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim,
             const int32_t* pos_x, const int32_t* pos_y, const float* inv_freq) {
  if (head_dim % 4 != 0)
    throw ShapeError("rope_2d: head_dim must be a multiple of 4, got " + std::to_string(head_dim));
  if (tokens <= 0 || heads <= 0 || head_dim <= 0) return;
  if (!x || !pos_x || !pos_y || !inv_freq) throw InvalidInputError("rope_2d: a pointer is null");
  rope::launch(static_cast<cudaStream_t>(stream), x, ld, tokens, heads, head_dim,
               rope::Angles2d{pos_x, pos_y, inv_freq, head_dim / 4});
}

void attention_dense(void* stream, float* out, const float* q, const float* k, const float* v, int64_t ld,
                     int64_t seqs, int64_t len, int64_t heads, int64_t head_dim, float scale) {
  if (seqs <= 0 || len <= 0 || heads <= 0 || head_dim <= 0) return;
  if (head_dim > kAttnMaxHeadDim)
    throw NotSupportedError("attention_dense on CUDA: head_dim " + std::to_string(head_dim) + " (1 to " +
                            std::to_string(kAttnMaxHeadDim) + ")");
  if (!out || !q || !k || !v) throw InvalidInputError("attention_dense: a pointer is null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch ((head_dim + 31) / 32) {
    case 1: return launch_attention_dense<1>(s, out, q, k, v, ld, seqs, len, heads, head_dim, scale);
    case 2: return launch_attention_dense<2>(s, out, q, k, v, ld, seqs, len, heads, head_dim, scale);
    case 3: return launch_attention_dense<3>(s, out, q, k, v, ld, seqs, len, heads, head_dim, scale);
    case 4: return launch_attention_dense<4>(s, out, q, k, v, ld, seqs, len, heads, head_dim, scale);
    case 5: return launch_attention_dense<5>(s, out, q, k, v, ld, seqs, len, heads, head_dim, scale);
    case 6: return launch_attention_dense<6>(s, out, q, k, v, ld, seqs, len, heads, head_dim, scale);
    case 7: return launch_attention_dense<7>(s, out, q, k, v, ld, seqs, len, heads, head_dim, scale);
    default: return launch_attention_dense<8>(s, out, q, k, v, ld, seqs, len, heads, head_dim, scale);
  }
}

void unfold_patches(void* stream, float* out, const float* pixels, int64_t tiles, int64_t channels, int64_t size,
                    int64_t patch) {
  if (patch <= 0 || size % patch != 0)
    throw ShapeError("unfold_patches: tile size " + std::to_string(size) + " is not a multiple of the patch size " +
                     std::to_string(patch));
  const int64_t grid = size / patch, rows = tiles * grid * grid, cols = channels * patch * patch;
  if (tiles <= 0 || channels <= 0 || grid <= 0) return;
  if (!out || !pixels) throw InvalidInputError("unfold_patches: a pointer is null");
  constexpr int threads = 256;
  unfold_patches_kernel<<<rows_cols_grid(rows, cols, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, pixels, rows, channels, size, patch);
  CORRAL_CUDA_CHECK_LAUNCH();
}

void pixel_shuffle(void* stream, float* out, const float* x, int64_t tiles, int64_t tile_rows, int64_t grid,
                   int64_t dim, int64_t s) {
  if (s <= 0 || grid % s != 0 || tile_rows < grid * grid)
    throw ShapeError("pixel_shuffle: a grid of " + std::to_string(grid) + " patches cannot fold by " +
                     std::to_string(s) + " (tile rows " + std::to_string(tile_rows) + ")");
  const int64_t g = grid / s, rows = tiles * g * g, width = s * s * dim;
  if (tiles <= 0 || g <= 0 || dim <= 0) return;
  if (!out || !x) throw InvalidInputError("pixel_shuffle: a pointer is null");
  constexpr int threads = 256;
  pixel_shuffle_kernel<<<rows_cols_grid(rows, width, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, x, rows, tile_rows, grid, dim, s);
  CORRAL_CUDA_CHECK_LAUNCH();
}

}  // namespace corral::cuda
