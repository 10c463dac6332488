// Routing kernels of the MoE: top-k per token with sigmoid scores and the per-expert histogram,
// the prefix sums that make each expert's rows contiguous, the scatter of the scaled input rows,
// and the final combine. All on the stream, sized from host-known bounds, no host round trip.
#pragma once

#include <cstdint>

#include "corral/kernels/types.h"
#include "moe_common.cuh"

namespace corral::cuda::moe_detail {

// One warp per token: top_k rounds of a warp-wide arg-max over the logits that come after the
// previous pick in the order (logit descending, expert id ascending), so ties go to the lower id
// and no pick repeats. NaN logits count as -inf. Writes chosen[t, k], score[t, k] =
// sigmoid(logit) and counts[e] += 1.
__global__ void __launch_bounds__(256) route_topk(const float* logits, int64_t tokens, int experts, int top_k,
                                                  int* chosen, float* score, int* counts) {
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= tokens) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31;
  const float* l = logits + t * experts;
  float prev_l = INFINITY;
  int prev_e = -1;
  for (int k = 0; k < top_k; ++k) {
    float best_l = -INFINITY;
    int best_e = 0x7fffffff;  // loses to every real candidate, -inf ones included
    for (int e = lane; e < experts; e += 32) {
      float v = l[e];
      if (v != v) v = -INFINITY;
      const bool after = v < prev_l || (v == prev_l && e > prev_e);
      if (after && (v > best_l || (v == best_l && e < best_e))) {
        best_l = v;
        best_e = e;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ol = __shfl_xor_sync(0xffffffffu, best_l, off);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, off);
      if (ol > best_l || (ol == best_l && oe < best_e)) {
        best_l = ol;
        best_e = oe;
      }
    }
    // top_k <= experts, so a candidate always remains: best_e is a real expert on every lane.
    if (lane == 0) {
      chosen[t * top_k + k] = best_e;
      score[t * top_k + k] = 1.0f / (1.0f + expf(-best_l));
      atomicAdd(counts + best_e, 1);
    }
    prev_l = best_l;
    prev_e = best_e;
  }
}

// Inclusive scan of one int per thread over the block (blockDim.x a multiple of 32, <= 1024).
// `warp_sums` is 32 ints of shared memory; returns the inclusive prefix, *total the block's sum.
__device__ __forceinline__ int block_inclusive_scan(int v, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += y;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int s = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, off);
      if (lane >= off) s += y;
    }
    warp_sums[lane] = s;
  }
  __syncthreads();
  const int result = v + (warp > 0 ? warp_sums[warp - 1] : 0);
  *total = warp_sums[nwarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return result;
}

// One block: from counts[E], the exclusive prefix sums row_start (rows) and tile_start (kTileM
// tiles), the list of experts with rows, scatter cursors, and expert_tokens[e] += counts[e].
__global__ void __launch_bounds__(1024) route_scan(const int* counts, int experts, int* row_start, int* tile_start,
                                                   int* active, int* num_active, int* cursor,
                                                   int64_t* expert_tokens) {
  __shared__ int warp_sums[32];
  int carry_rows = 0, carry_tiles = 0, carry_active = 0;  // the same in every thread
  for (int base = 0; base < experts; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int c = e < experts ? counts[e] : 0;
    const int tiles = (c + kTileM - 1) / kTileM, has = c > 0 ? 1 : 0;
    int sum_rows, sum_tiles, sum_active;
    const int rows_incl = block_inclusive_scan(c, warp_sums, &sum_rows);
    const int tiles_incl = block_inclusive_scan(tiles, warp_sums, &sum_tiles);
    const int active_incl = block_inclusive_scan(has, warp_sums, &sum_active);
    if (e < experts) {
      const int rs = carry_rows + rows_incl - c;
      row_start[e] = rs;
      cursor[e] = rs;
      tile_start[e] = carry_tiles + tiles_incl - tiles;
      if (has) active[carry_active + active_incl - 1] = e;
      if (expert_tokens) expert_tokens[e] += c;
    }
    carry_rows += sum_rows;
    carry_tiles += sum_tiles;
    carry_active += sum_active;
  }
  if (threadIdx.x == 0) {
    row_start[experts] = carry_rows;
    tile_start[experts] = carry_tiles;
    *num_active = carry_active;
  }
}

template <class T>
__device__ __forceinline__ void store_row(void* dst, int64_t row, int64_t pitch, const float* x, int64_t hidden,
                                          float scale) {
  T* d = static_cast<T*>(dst) + row * pitch;
  for (int64_t j = threadIdx.x; j < pitch; j += blockDim.x) d[j] = from_f32<T>(j < hidden ? x[j] * scale : 0.0f);
}

__device__ __forceinline__ void store_row_as(DType type, void* dst, int64_t row, int64_t pitch, const float* x,
                                             int64_t hidden, float scale) {
  switch (type) {
    case DType::BF16: return store_row<__nv_bfloat16>(dst, row, pitch, x, hidden, scale);
    case DType::F16: return store_row<__half>(dst, row, pitch, x, hidden, scale);
    default: return store_row<float>(dst, row, pitch, x, hidden, scale);
  }
}

// Blocks [0, pairs): pair p = t * top_k + k takes the next row of its expert, records it in
// pair_row[p], and writes score[p] * x[t] there (as routed_type). Blocks [pairs, pairs + tokens):
// token t's row of the shared expert's input, x[t] (as shared_type). Rows are zero-padded to the
// pitch. The order of rows within an expert does not change any result (rows are independent).
__global__ void __launch_bounds__(256) route_gather(const float* x, int64_t hidden, int top_k, int64_t pairs,
                                                    const int* chosen, const float* score, int* cursor,
                                                    int* pair_row, void* routed_rows, DType routed_type,
                                                    void* shared_rows, DType shared_type, int64_t pitch) {
  const int64_t b = blockIdx.x;
  if (b < pairs) {
    __shared__ int row;
    if (threadIdx.x == 0) {
      row = atomicAdd(cursor + chosen[b], 1);
      pair_row[b] = row;
    }
    __syncthreads();
    const int64_t t = b / top_k;
    store_row_as(routed_type, routed_rows, row, pitch, x + t * hidden, hidden, score[b]);
  } else {
    const int64_t t = b - pairs;
    store_row_as(shared_type, shared_rows, t, pitch, x + t * hidden, hidden, 1.0f);
  }
}

// out[t] += shared[t] + sum over k, in order, of routed[pair_row[t * top_k + k]] (deterministic).
__global__ void __launch_bounds__(256) route_combine(float* out, const float* routed, const float* shared,
                                                     const int* pair_row, int64_t hidden, int top_k) {
  const int64_t t = blockIdx.x;
  const int* pr = pair_row + t * top_k;
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    float s = shared[t * hidden + j];
    for (int k = 0; k < top_k; ++k) s += routed[int64_t(pr[k]) * hidden + j];
    out[t * hidden + j] += s;
  }
}

}  // namespace corral::cuda::moe_detail
