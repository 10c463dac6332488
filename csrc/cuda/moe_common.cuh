// Pieces shared by the MoE kernels (csrc/cuda/moe*.cuh), whose grouped matrix products also serve
// dense products (grouped_product.cuh): how a block finds its expert and rows from the device-side
// routing tables, the operand descriptors of the products, and element conversions. Device code
// only; no host synchronisation anywhere.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "convert.cuh"

namespace corral::cuda::moe_detail {

// Rows per M tile of the grouped GEMMs (tensor-core and CUDA-core alike); the routing tables
// count each expert's tiles in these.
constexpr int kTileM = 64;
// Columns per N tile of the grouped GEMMs.
constexpr int kTileN = 64;
// The decode path (GEMV) serves at most this many rows per expert; the host picks R in 1, 2, 4, 8.
constexpr int kMaxGemvRows = 8;

// Which rows a block works on. Routed experts own expert-contiguous rows [row_start[e],
// row_start[e+1]) of A and C, found from device-side prefix sums; the shared expert, when a launch
// includes it, owns rows [0, shared_rows) of its own A and C.
struct Groups {
  const int* row_start = nullptr;   // [E + 1]
  const int* tile_start = nullptr;  // [E + 1]: prefix sums of ceil(rows_e / kTileM)
  const int* active = nullptr;      // [E]: the experts with rows, in id order (first num_active)
  const int* num_active = nullptr;  // [1]
  int num_experts = 0;              // E, or 0 when the launch has no routed experts
  int routed_slots = 0;             // GEMV: blockIdx.y slots for routed experts (min(E, pairs))
  int shared_rows = 0;              // tokens, or 0 when the launch has no shared expert
};

// One side (routed experts or shared expert) of a grouped product C = A . B, with an optional
// SwiGLU epilogue C = silu(A . B0) * (A . B1).
struct Operand {
  const void* a = nullptr;  // activations: row r at a + r * lda elements (zero-padded to lda)
  int64_t lda = 0;
  const void* b0 = nullptr;  // weights (the gate with SwiGLU) of expert 0
  const void* b1 = nullptr;  // the up projection with SwiGLU
  int64_t ldb = 0;
  int64_t b_stride = 0;  // elements from one expert's matrix to the next
  int n_major = 0;       // 1: B(k, n) at b[n * ldb + k] (nn.Linear, OutIn); 0: b[k * ldb + n] (InOut)
  void* c = nullptr;     // output: row r at c + r * ldc elements
  int64_t ldc = 0;
  int64_t n = 0, k = 0;  // C is rows x n, the reduction runs over k
  // With SwiGLU, columns [n, ldc) of C are written with zeros: C is the next product's A.
  int accumulate = 0;  // 1 (no SwiGLU): C += A . B, the product added to C's float32 value
};

// A block's share of the work: a run of rows of one expert (or of the shared expert).
struct Tile {
  int expert;
  int shared;
  int64_t row;  // first row of A and C
  int rows;     // rows in this tile
};

// GEMM blocks: blockIdx.x walks the routed experts' M tiles, then the shared expert's. Blocks past
// the last tile (the grid is sized for the worst case) do nothing.
__device__ __forceinline__ bool gemm_tile(const Groups& g, int64_t m, Tile& t) {
  const int routed = g.num_experts > 0 ? g.tile_start[g.num_experts] : 0;
  if (m < routed) {
    // The expert e with tile_start[e] <= m < tile_start[e + 1] (experts without rows own no tile).
    int lo = 0, hi = g.num_experts;
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (g.tile_start[mid] <= m) lo = mid;
      else hi = mid;
    }
    const int64_t begin = g.row_start[lo] + (m - g.tile_start[lo]) * int64_t(kTileM);
    const int64_t left = g.row_start[lo + 1] - begin;
    t = Tile{lo, 0, begin, int(left < kTileM ? left : kTileM)};
    return true;
  }
  m -= routed;
  const int64_t begin = m * kTileM;
  if (begin >= g.shared_rows) return false;
  const int64_t left = g.shared_rows - begin;
  t = Tile{0, 1, begin, int(left < kTileM ? left : kTileM)};
  return true;
}

// GEMV blocks: blockIdx.y slot s < routed_slots serves the s-th expert with rows (none if fewer
// are active); the slot after them the shared expert, whose rows may come in chunks of
// `chunk_rows` (blockIdx.z; routed experts are launched with one chunk).
__device__ __forceinline__ bool gemv_slot(const Groups& g, int slot, int chunk, int chunk_rows, Tile& t) {
  if (slot < g.routed_slots) {
    if (chunk > 0 || slot >= *g.num_active) return false;
    const int e = g.active[slot];
    const int begin = g.row_start[e];
    t = Tile{e, 0, begin, g.row_start[e + 1] - begin};
    return t.rows > 0;
  }
  const int64_t begin = int64_t(chunk) * chunk_rows;
  if (begin >= g.shared_rows) return false;
  const int64_t left = g.shared_rows - begin;
  t = Tile{0, 1, begin, int(left < chunk_rows ? left : chunk_rows)};
  return true;
}

// ---- elements ----------------------------------------------------------------------------------

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short u) {
  return __uint_as_float(uint32_t(u) << 16);
}
__device__ __forceinline__ float f16_bits_to_f32(unsigned short u) {
  return __half2float(__ushort_as_half(u));
}

// One weight element as float (read-only path).
__device__ __forceinline__ float load_f32(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) {
  return bf16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ float load_f32(const __half* p) {
  return f16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

// 16 bytes of weights (16-byte aligned) as floats: 4 float32 or 8 bfloat16 / float16.
template <class W>
struct Vec16;
template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ static __forceinline__ void load(const float* p, float* f) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
};
template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ static __forceinline__ void load(const __nv_bfloat16* p, float* f) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // little endian: element 2i in the low half
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
template <>
struct Vec16<__half> {
  static constexpr int kElems = 8;
  __device__ static __forceinline__ void load(const __half* p, float* f) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = f16_bits_to_f32(static_cast<unsigned short>(w[i] & 0xffffu));
      f[2 * i + 1] = f16_bits_to_f32(static_cast<unsigned short>(w[i] >> 16));
    }
  }
};

// V consecutive weights as floats: one 16-byte load when V is Vec16's width, else V scalar loads.
template <class W, int V>
__device__ __forceinline__ void load_weights(const W* p, float* f) {
  if constexpr (V == Vec16<W>::kElems) {
    Vec16<W>::load(p, f);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) f[v] = load_f32(p + v);
  }
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

}  // namespace corral::cuda::moe_detail
