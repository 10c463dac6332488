// Pieces shared by the paged-attention and KV-cache kernels (csrc/cuda/attention*.cu*,
// kv_cache.cu): bit-exact ports of the CPU's element conversions (corral/kernels/types.h), cp.async,
// the launch parameters, the per-sequence plan, and the merge step of split softmax results.
// Device code and plain structs; no host synchronisation anywhere.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "check.h"
#include "convert.cuh"

namespace corral::cuda::attn {

// ---- constants shared with the CPU design (csrc/cpu/attention.cpp) -------------------------------

// Keys per split (rounded up to whole blocks), by absolute key index: a row's softmax runs split by
// split and the splits' (max, sum, output) are merged in split order, at the CPU's split positions
// (csrc/cpu/attention.cpp, kSplitKeys).
constexpr int kSplitKeys = 2048;
// Sequences with at most this many query rows in the batch take the CUDA-core (decode) kernel.
constexpr int kDecodeTokens = 4;
// Flattened (token, query head of the group) rows per tile: CUDA-core and tensor-core kernels.
constexpr int kSimtRows = 16;
constexpr int kTcRows = 64;
// Keys per tensor-core KV tile (whole blocks: the block size divides it).
constexpr int kTcKeys = 64;
constexpr int kThreads = 128;
// The tensor-core kernel moves a row's running max only when a tile's max exceeds it by more than
// this (natural log units): exp(s - m) <= e^8 stays well inside bfloat16 / float16, and the
// accumulators are rescaled rarely. Any reference max gives the same softmax.
constexpr float kLazyMax = 8.0f;
// Upper bound of the partial-result scratch (split-KV). Sequences whose partials do not fit run
// their splits one after another in one block (same arithmetic, same bits).
constexpr int64_t kPartialCapBytes = int64_t(64) << 20;
// Key-range scans of sequences with more rows than this are skipped (they never split).
constexpr int kRangeScanRows = 1024;

// ---- element conversions: the same bits as the CPU's ----------------------------------------------

// Two adjacent fp8 codes (low byte first) -> floats, exact: the hardware converter on sm_89+.
__device__ __forceinline__ float2 fp8x2_to_f32(uint32_t two) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
  __half2 hh;
  hh = h;
  return __half22float2(hh);
#else
  return make_float2(fp8_to_f32(two & 0xffu), fp8_to_f32((two >> 8) & 0xffu));
#endif
}

// float -> bfloat16 bits, round to nearest even, NaN quieted (corral::to_bf16).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// float -> float16 bits (corral::to_f16): overflow to inf, subnormals rounded to nearest even.
__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);
  if (a < 0x38800000u) {
    const float v = __fmul_rn(__uint_as_float(a), 16777216.0f);
    return uint16_t(sign | uint16_t(rintf(v)));
  }
  uint32_t r = a - 0x38000000u;
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t b) { return __uint_as_float(b << 16); }
__device__ __forceinline__ float f16_bits_to_f32(uint32_t b) {
  __half_raw r;
  r.x = uint16_t(b);
  return __half2float(__half(r));
}

// Cache element types of the kernels (storage only; arithmetic in float).
struct F32 {
  using Storage = float;
  static constexpr int kBytes = 4;
};
struct BF16 {
  using Storage = uint16_t;
  static constexpr int kBytes = 2;
};
struct F16 {
  using Storage = uint16_t;
  static constexpr int kBytes = 2;
};
struct FP8 {
  using Storage = uint8_t;
  static constexpr int kBytes = 1;
};

// Element i of a cache array (in shared memory: int offsets) as float.
template <class T>
__device__ __forceinline__ float load_elem(const void* base, int i);
template <>
__device__ __forceinline__ float load_elem<F32>(const void* base, int i) {
  return static_cast<const float*>(base)[i];
}
template <>
__device__ __forceinline__ float load_elem<BF16>(const void* base, int i) {
  return bf16_bits_to_f32(static_cast<const uint16_t*>(base)[i]);
}
template <>
__device__ __forceinline__ float load_elem<F16>(const void* base, int i) {
  return f16_bits_to_f32(static_cast<const uint16_t*>(base)[i]);
}
template <>
__device__ __forceinline__ float load_elem<FP8>(const void* base, int i) {
  return fp8_to_f32(static_cast<const uint8_t*>(base)[i]);
}

// Elements i and i + 1 (i even, the array aligned to two elements).
template <class T>
__device__ __forceinline__ float2 load_pair(const void* base, int i);
template <>
__device__ __forceinline__ float2 load_pair<F32>(const void* base, int i) {
  return *reinterpret_cast<const float2*>(static_cast<const float*>(base) + i);
}
template <>
__device__ __forceinline__ float2 load_pair<BF16>(const void* base, int i) {
  const uint32_t w = *reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(base) + i);
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <>
__device__ __forceinline__ float2 load_pair<F16>(const void* base, int i) {
  const __half2 h = *reinterpret_cast<const __half2*>(static_cast<const uint16_t*>(base) + i);
  return __half22float2(h);
}
template <>
__device__ __forceinline__ float2 load_pair<FP8>(const void* base, int i) {
  return fp8x2_to_f32(*reinterpret_cast<const uint16_t*>(static_cast<const uint8_t*>(base) + i));
}

// float -> storage bits of T (the CPU's rounding).
template <class T>
__device__ __forceinline__ typename T::Storage store_elem(float x);
template <>
__device__ __forceinline__ float store_elem<F32>(float x) {
  return x;
}
template <>
__device__ __forceinline__ uint16_t store_elem<BF16>(float x) {
  return f32_to_bf16_bits(x);
}
template <>
__device__ __forceinline__ uint16_t store_elem<F16>(float x) {
  return f32_to_f16_bits(x);
}
template <>
__device__ __forceinline__ uint8_t store_elem<FP8>(float x) {
  return uint8_t(f32_to_fp8(x));
}

// ---- cp.async -------------------------------------------------------------------------------------

// 16 bytes global -> shared; valid = false reads nothing and fills zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most one committed group (the newest) is still in flight.
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }

// ---- warp reductions (every lane ends with the same bits: a + b == b + a) -------------------------

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- split merge: one definition for the merge kernel and for blocks that run splits in turn ---

constexpr float kNegInf = -__builtin_huge_valf();

// Folds a split's (m, l, acc) into the running (rm, rl, racc), as the CPU's TileWork::merge: a
// split without keys (m = -inf) changes nothing, the first one with keys is copied, later ones
// are combined with the running state at the larger max. Explicit roundings: the same bits
// wherever it is inlined.
struct MergeFactors {
  float a, c;  // running and split weights; copy: a unused, c = 1
  int kind;    // 0: keep, 1: copy, 2: combine
};
__device__ __forceinline__ MergeFactors merge_factors(float rm, float m) {
  if (m == kNegInf) return MergeFactors{1.f, 0.f, 0};
  if (rm == kNegInf) return MergeFactors{0.f, 1.f, 1};
  const float mn = fmaxf(rm, m);
  return MergeFactors{expf(rm - mn), expf(m - mn), 2};
}
__device__ __forceinline__ float merge_value(const MergeFactors& f, float run, float x) {
  return f.kind == 0 ? run : f.kind == 1 ? x : __fmaf_rn(run, f.a, __fmul_rn(x, f.c));
}
__device__ __forceinline__ void merge_stats(const MergeFactors& f, float& rm, float& rl, float m, float l) {
  if (f.kind == 0) return;
  rl = merge_value(f, rl, l);
  rm = f.kind == 1 ? m : fmaxf(rm, m);
}
// The final output of a row: acc / l as the CPU writes it (acc times the rounded reciprocal).
__device__ __forceinline__ float normalize(float acc, float l) { return __fmul_rn(acc, __fdiv_rn(1.0f, l)); }

// ---- launch parameters and the per-sequence plan -----------------------------------------------

// What the plan kernel decides for each sequence.
struct SeqPlan {
  int32_t sp0;    // first split (absolute index) of the sequence's keys
  int32_t nsp;    // splits spanned by the sequence's keys
  int32_t split;  // 1: one work item per split, partials merged by the merge kernel
  int32_t tc;     // 1: the tensor-core kernel serves this sequence
};

struct AttnParams {
  float* out;
  const float* q;
  const unsigned char* k;
  const unsigned char* v;
  const unsigned char* k_scale;
  const unsigned char* v_scale;
  int64_t block_stride;  // bytes between blocks
  int64_t scale_step;    // bytes between blocks' scale rows
  int64_t chunk;         // chunk size of local layers, 0: global
  const int32_t* seq_starts;
  const int32_t* positions;
  const int32_t* block_tables;  // [pool rows, max_blocks]
  const int32_t* table_rows;    // [num_seqs] each sequence's row
  int32_t num_seqs, max_blocks;
  int32_t heads, kv_heads, group, d, bs;
  int32_t split_blocks;  // blocks per split
  int32_t tc;            // the tensor-core kernel is usable for this cache
  int32_t num_sms;
  float scale;
  // Plan (device scratch written by the plan kernel).
  SeqPlan* plan;               // [num_seqs]
  int64_t* simt_off;           // [num_seqs + 1] exclusive prefix sums of work items
  int64_t* tc_off;             // [num_seqs + 1]
  int64_t* merge_off;          // [num_seqs + 1] (row, head) pairs to merge
  int64_t* part_off;           // [num_seqs + 1] partial records
  unsigned long long* counters;  // [4]: next CUDA-core item, next tensor-core item, next merge item
  float* parts;                // partial records, `rec` floats each: acc[d], ..., m, l
  int64_t part_cap;            // records that fit (0: no split-KV in this call)
  int32_t rec;
};

// The sequence s holding work item `item` of a prefix-sum array off[0..num_seqs] (off[0] = 0,
// item < off[num_seqs]): the largest s with off[s] <= item.
__device__ __forceinline__ int find_seq(const int64_t* off, int num_seqs, int64_t item) {
  int lo = 0, hi = num_seqs;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (off[mid] <= item) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Visible keys of a row at position p: [lo, p].
__device__ __forceinline__ int32_t row_lo(const AttnParams& p, int32_t pos) {
  return p.chunk > 0 ? int32_t(pos - int64_t(pos) % p.chunk) : 0;
}

// Partial record of (split sp, token tok, query head h) of sequence s.
__device__ __forceinline__ float* part_record(const AttnParams& p, int s, const SeqPlan& pl, int32_t n, int sp,
                                              int64_t tok, int h) {
  const int64_t idx = p.part_off[s] + (int64_t(sp - pl.sp0) * n + tok) * p.heads + h;
  return p.parts + idx * p.rec;
}

// Grabs the next work item of a persistent kernel (one per block); -1 when none is left.
__device__ __forceinline__ int64_t next_item(unsigned long long* counter, int64_t total, int64_t* slot) {
  __syncthreads();  // the previous item is done with *slot
  if (threadIdx.x == 0) *slot = int64_t(atomicAdd(counter, 1ull));
  __syncthreads();
  const int64_t item = *slot;
  return item < total ? item : -1;
}

}  // namespace corral::cuda::attn
