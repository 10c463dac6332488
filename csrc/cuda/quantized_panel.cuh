// Products with the CPU's packed quantized weights (csrc/cpu/pack.cpp writes them; layout in
// csrc/cpu/simd/qgemm.h): per panel of 64 output columns, group after group, each group the scales
// of the panel's columns (F32 or BF16), their int8 offsets if the format has them, then the codes:
//   I8: [group / 4][64][4] int8, I4: [group / 8][64][4] bytes (byte i of a column: k = 8s + i in
//   its low nibble, 8s + 4 + i in its high one, codes 0..15), F8: [group][64] e4m3.
// The arithmetic is the CPU's (kernels/linear.h): integer weights multiply activations quantized per
// row and per kQuantBlock k to int8 records (quantize_rows: scale max|x| / 127, codes rounded to
// nearest even in float32), each block's dot product exact in int32 (__dp4a), then
// acc += float(dot - offset * sum of x codes) * x_scale * w_scale; fp8 weights multiply float32
// activations (rounded to fp8 per act_group run by round_fp8_rows where the format asks) per unit of
// 32 k, acc += unit sum * w_scale. Only the float summation order differs from the CPU's: a block's
// threads are 64 columns x L k lanes (lanes_for: 16 for one row, 4 for 64), lane l taking units
// l, l + L, ..., and the lanes' sums are added in lane order at the end.
// One kernel serves dense products and the MoE's grouped ones: blockIdx.x is a row tile found by
// moe_detail::gemm_tile (up to kTileM rows of one expert, or of the shared side), blockIdx.y a
// panel. Each block reads its panel once for all rows of its tile: decode streams every weight
// byte once, and many rows re-read it ceil(rows / 64) times. Activations are read from global
// memory (L1) per row, no tensor cores: a prefill runs far below int8 mma rates.
// A grid of fewer blocks than two per SM (decode of a matrix with few panels) cannot keep memory
// busy, so launch splits k (SplitK): quantized_product<..., Partial = true> runs `splits` blocks per
// (row tile, panel), blockIdx.z taking a fixed share of the kBlock units (split_units: whole units,
// chosen from the shapes and the SM count alone), and writes each row's lane sums of all kCols
// columns to scratch; quantized_split_sum then adds the splits in split order (deterministic), and
// applies the epilogue (silu(gate) * up after the full sum) and the accumulate. Unsplit launches
// run the Partial = false code as before.
#pragma once

#include <cstdint>

#include "block_reduce.cuh"
#include "convert.cuh"
#include "moe_common.cuh"
#include "quantized_product.cuh"

namespace corral::cuda::quant {

__device__ __forceinline__ int load_i32(const char* p) { return __ldg(reinterpret_cast<const int*>(p)); }

__device__ __forceinline__ float column_scale(const char* group, DType t, int col) {
  if (t == DType::BF16)
    return moe_detail::bf16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short*>(group) + col));
  return __ldg(reinterpret_cast<const float*>(group) + col);
}

// Records of x's rows (dst rows ld_dst bytes apart), a warp per (row, block): the CPU's
// prepare_quant_x (csrc/cpu/simd/qgemm.h) step by step; max and sum are exact in any order.
__global__ void __launch_bounds__(256) quantize_rows(char* dst, int64_t ld_dst, const float* x, int64_t ldx,
                                                    int64_t rows, int64_t k) {
  const int lane = threadIdx.x % 32;
  const int64_t nb = (k + kBlock - 1) / kBlock, warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t item = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; item < rows * nb; item += warps) {
    const int64_t r = item / nb, b = item % nb, kk = b * kBlock + lane;
    const float v = kk < k ? x[r * ldx + kk] : 0.0f;
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float d = amax / 127.0f, id = amax > 0.0f ? 1.0f / d : 0.0f;
    const int code = kk < k ? int(rintf(v * id)) : 0;
    int sum = code;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    char* rec = dst + r * ld_dst + b * kRecordBytes;
    rec[8 + lane] = char(int8_t(code));
    if (lane == 0) {
      *reinterpret_cast<float*>(rec) = d;
      *reinterpret_cast<int*>(rec + 4) = sum;
    }
  }
}

// x rounded to fp8 per row and run of `group` k, scaled by the run's max|x| / 448 (the CPU's
// round_fp8, csrc/cpu/linear.cpp): a block per (row, run). Codes = false: the rounded values into
// dst as float32 (rows k floats apart). Codes = true (group >= k: one run per row): the e4m3 codes
// into dst (rows ld bytes apart, zero from k to ld) and each row's max|x| / 448 into scales, as
// cuBLASLt's fp8 product reads them (quantized_product.cu).
template <bool Codes>
__global__ void __launch_bounds__(256) round_fp8_rows(void* dst, int64_t ld, float* scales, const float* x,
                                                      int64_t ldx, int64_t rows, int64_t k, int64_t group) {
  __shared__ float scratch[kMaxWarps];
  const int64_t runs = (k + group - 1) / group;
  for (int64_t item = blockIdx.x; item < rows * runs; item += gridDim.x) {
    const int64_t r = item / runs, k0 = (item % runs) * group, n = k - k0 < group ? k - k0 : group;
    const float* src = x + r * ldx + k0;
    float amax = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) amax = fmaxf(amax, fabsf(src[i]));
    amax = block_reduce(amax, scratch, MaxF{});
    const float s = amax / 448.0f;
    if constexpr (Codes) {
      unsigned char* row = static_cast<unsigned char*>(dst) + r * ld;
      for (int64_t i = threadIdx.x; i < ld; i += blockDim.x)
        row[i] = i < k && amax > 0.0f ? (unsigned char)f32_to_fp8(src[i] / s) : 0;
      if (threadIdx.x == 0) scales[r] = s;
    } else {
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        static_cast<float*>(dst)[r * k + k0 + i] = amax > 0.0f ? __fmul_rn(fp8_to_f32(f32_to_fp8(src[i] / s)), s) : 0.0f;
    }
  }
}

// The fp8 codes of a packed matrix of one group (a scale per output) as plain OutIn rows, as
// cuBLASLt's fp8 product reads them: dst [rows, ld] e4m3 (zero from k to ld), scales [rows]
// float32. Panel p's column c is output row p * 64 + c, or with Glu (columns 0..31 gates, 32..63 ups
// of outputs p * 32 + c) gate rows [0, n) and up rows [n, 2n). A block per (64 k, panel): the codes
// ([k][64 columns] in the panel) are transposed through shared memory, read and written in runs.
template <bool Glu>
__global__ void __launch_bounds__(256) unpack_fp8_rows(unsigned char* dst, int64_t ld, float* scales, const char* w,
                                                       int64_t panel_bytes, int64_t header, DType scale_dtype, int64_t k,
                                                       int64_t n) {
  __shared__ unsigned char tile[64][kCols + 4];
  const char* panel = w + int64_t(blockIdx.y) * panel_bytes;
  const unsigned char* codes = reinterpret_cast<const unsigned char*>(panel + header);
  const int64_t k0 = int64_t(blockIdx.x) * 64;
  // The output row of panel column c, or -1 past the matrix.
  auto row_of = [&](int c) -> int64_t {
    const int64_t per = Glu ? kCols / 2 : kCols, o = int64_t(blockIdx.y) * per + c % per;
    if (o >= n) return -1;
    return Glu && c >= per ? n + o : o;
  };
  for (int e = threadIdx.x; e < 64 * kCols; e += blockDim.x) {
    const int kk = e / kCols, c = e % kCols;
    tile[kk][c] = k0 + kk < k ? __ldg(codes + (k0 + kk) * kCols + c) : 0;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kCols * 64; e += blockDim.x) {
    const int c = e / 64, kk = e % 64;
    const int64_t row = row_of(c);
    if (row >= 0 && k0 + kk < ld) dst[row * ld + k0 + kk] = tile[kk][c];
  }
  if (blockIdx.x == 0 && threadIdx.x < kCols) {
    const int64_t row = row_of(threadIdx.x);
    if (row >= 0) scales[row] = column_scale(panel, scale_dtype, threadIdx.x);
  }
}

// acc[r] += the products of one block (kBlock k) of integer codes of column `col` with rows r of
// the records at a (rows lda bytes apart, `rec` the block's record offset).
template <int Kind, int TR>
__device__ __forceinline__ void int_unit(float (&acc)[TR], const char* codes, int col, int offset, float scale,
                                         const char* a, int64_t lda, int64_t rec, int rows) {
  int w[8];  // w[s]: the column's codes of k = 4s .. 4s + 3, as bytes of one word
  if constexpr (Kind == kI8) {
#pragma unroll
    for (int s = 0; s < 8; ++s) w[s] = load_i32(codes + (s * kCols + col) * 4);
  } else {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int b = load_i32(codes + (s * kCols + col) * 4);
      w[2 * s] = b & 0x0f0f0f0f;
      w[2 * s + 1] = (b >> 4) & 0x0f0f0f0f;
    }
  }
#pragma unroll
  for (int r = 0; r < TR; ++r) {
    if (r >= rows) break;
    const char* x = a + r * lda + rec;
    int dot = 0;
#pragma unroll
    for (int s = 0; s < 8; ++s) dot = __dp4a(w[s], load_i32(x + 8 + 4 * s), dot);
    dot -= offset * load_i32(x + 4);
    acc[r] = fmaf(float(dot) * __ldg(reinterpret_cast<const float*>(x)), scale, acc[r]);
  }
}

// acc[r] += (sum over k0 .. k0 + kn of x[r, k] * w[k], in k order) * scale for fp8 codes of column
// `col`, decoded 8 at a time (fewer live registers than the whole unit).
template <int TR>
__device__ __forceinline__ void fp8_unit(float (&acc)[TR], const char* codes, int col, float scale, const char* a,
                                         int64_t lda, int64_t k0, int kn, int rows) {
  float part[TR];
#pragma unroll
  for (int r = 0; r < TR; ++r) part[r] = 0.0f;
#pragma unroll
  for (int i0 = 0; i0 < kBlock; i0 += 8) {
    if (i0 >= kn) break;
    float w[8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
      w[j] = i0 + j < kn ? fp8_to_f32(__ldg(reinterpret_cast<const unsigned char*>(codes) + (i0 + j) * kCols + col))
                         : 0.0f;
#pragma unroll
    for (int r = 0; r < TR; ++r) {
      if (r >= rows) break;
      const float* x = reinterpret_cast<const float*>(a + r * lda) + k0 + i0;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (i0 + j < kn) part[r] = fmaf(__ldg(x + j), w[j], part[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < TR; ++r) acc[r] = fmaf(part[r], scale, acc[r]);
}

// The float offset in split.partial of this block's (row tile, panel) for split `z`.
__device__ __forceinline__ int64_t partial_offset(const SplitK& split, int64_t z) {
  return ((z * gridDim.x + blockIdx.x) * gridDim.y + blockIdx.y) * split.rows * kCols;
}

// Column c's sums of the k lanes in red, added in lane order.
template <int L, int R>
__device__ __forceinline__ float lane_sum(const float (&red)[L][R][kCols], int i, int c) {
  float v = red[0][i][c];
  for (int l = 1; l < L; ++l) v += red[l][i][c];
  return v;
}

// Stores (or adds, with accumulate) output column col of a row of op.c: the full sum v, or with
// the PackedGlu epilogue silu(v) * up.
template <bool Glu>
__device__ __forceinline__ void store_output(const QuantOperand& op, int64_t row, int64_t col, float v, float up) {
  if constexpr (Glu) v = moe_detail::silu(v) * up;
  float* y = op.c + row * op.ldc + col;
  *y = op.accumulate ? *y + v : v;
}

// The product of one row tile (at most TR rows) with one panel; see the top of the file. Partial:
// the k split's first step, blockIdx.z taking its share of the units and writing its sums of
// all kCols columns (gate and up of a PackedGlu) to split.partial; the epilogue waits for
// quantized_split_sum.
template <int Kind, bool Glu, int TR, bool Partial>
__global__ void __launch_bounds__(kCols * lanes_for(TR)) quantized_product(moe_detail::Groups g, QuantOperand routed,
                                                                          QuantOperand shared, SplitK split) {
  constexpr int per = Glu ? kCols / 2 : kCols;  // outputs per panel
  constexpr int RC = TR < 16 ? TR : 16;         // rows per pass of the lane reduction
  constexpr int lanes = lanes_for(TR), threads = kCols * lanes;
  __shared__ float red[lanes][RC][kCols];
  moe_detail::Tile t;
  if (!moe_detail::gemm_tile(g, blockIdx.x, t)) return;
  const QuantOperand& op = t.shared ? shared : routed;
  const int64_t c0 = int64_t(blockIdx.y) * per;
  if (c0 >= op.n) return;
  const PanelShape ps = panel_shape(Kind, op.q, op.k);
  const char* panel = static_cast<const char*>(op.w) + t.expert * op.w_stride + blockIdx.y * ps.groups * ps.group_bytes;
  const char* a = static_cast<const char*>(op.a) + t.row * op.lda;
  const int col = threadIdx.x % kCols, lane = threadIdx.x / kCols;
  // The block's units [u0, u1): all, or split_units' share of blockIdx.z (maybe none).
  int64_t u0 = 0, u1 = ps.groups * ps.units;
  if constexpr (Partial) split_units(u1, split.splits, blockIdx.z, u0, u1);
  float acc[TR];
#pragma unroll
  for (int r = 0; r < TR; ++r) acc[r] = 0.0f;
  for (int64_t u = u0 + lane; u < u1; u += lanes) {
    // Partial divides in 32 bits (launch checks the units fit): a 64-bit division is a call, which
    // made it spill the registers the call saves. The unsplit code stays as it was.
    const int64_t grp = Partial ? int64_t(unsigned(u) / unsigned(ps.units)) : u / ps.units;
    const int64_t j = Partial ? int64_t(unsigned(u) % unsigned(ps.units)) : u % ps.units;
    const int64_t k0 = grp * op.q.group + j * kBlock;
    if (k0 >= op.k) continue;  // units past k in the last group
    const char* group = panel + grp * ps.group_bytes;
    const float scale = column_scale(group, op.q.scale_dtype, col);
    const char* codes = group + ps.header;
    if constexpr (Kind == kF8) {
      const int64_t end = (grp + 1) * op.q.group < op.k ? (grp + 1) * op.q.group : op.k;
      const int kn = end - k0 < kBlock ? int(end - k0) : kBlock;
      fp8_unit<TR>(acc, codes + j * kBlock * kCols, col, scale, a, op.lda, k0, kn, t.rows);
    } else {
      const int offset = op.q.offsets ? int(reinterpret_cast<const signed char*>(codes - kCols)[col])
                                      : Kind == kI4 ? 8 : 0;
      const int64_t block_bytes = Kind == kI8 ? kBlock * kCols : kBlock * kCols / 2;
      int_unit<Kind, TR>(acc, codes + j * block_bytes, col, offset, scale, a, op.lda, u * kRecordBytes, t.rows);
    }
  }
  // The lanes' sums, then the epilogue and the store (Partial: the sums alone), RC rows at a time.
#pragma unroll
  for (int r0 = 0; r0 < TR; r0 += RC) {
    if (r0 >= t.rows) break;  // uniform over the block
#pragma unroll
    for (int i = 0; i < RC; ++i) red[lane][i][col] = acc[r0 + i];
    __syncthreads();
    if constexpr (Partial) {
      float* part = split.partial + partial_offset(split, blockIdx.z) + int64_t(r0) * kCols;
      for (int e = threadIdx.x; e < RC * kCols; e += threads) {
        const int i = e / kCols, c = e % kCols;
        if (r0 + i < t.rows) part[i * kCols + c] = lane_sum(red, i, c);
      }
    } else {
      for (int e = threadIdx.x; e < RC * per; e += threads) {
        const int i = e / per, c = e % per;
        if (r0 + i >= t.rows || c0 + c >= op.n) continue;
        store_output<Glu>(op, t.row + r0 + i, c0 + c, lane_sum(red, i, c), Glu ? lane_sum(red, i, c + kCols / 2) : 0.0f);
      }
    }
    __syncthreads();
  }
}

// The k split's second step, per (row tile, panel) as quantized_product<..., true> left them: the
// splits' partial sums added in split order, then the epilogue and the store.
template <bool Glu>
__global__ void __launch_bounds__(256) quantized_split_sum(moe_detail::Groups g, QuantOperand routed,
                                                           QuantOperand shared, SplitK split) {
  constexpr int per = Glu ? kCols / 2 : kCols;
  moe_detail::Tile t;
  if (!moe_detail::gemm_tile(g, blockIdx.x, t)) return;
  const QuantOperand& op = t.shared ? shared : routed;
  const int64_t c0 = int64_t(blockIdx.y) * per;
  if (c0 >= op.n) return;
  const float* p = split.partial + partial_offset(split, 0);
  const int64_t stride = partial_offset(split, 1) - partial_offset(split, 0);  // from one split to the next
  for (int e = threadIdx.x; e < t.rows * per; e += blockDim.x) {
    const int i = e / per, c = e % per;
    if (c0 + c >= op.n) continue;
    const float* q = p + i * kCols + c;
    float v = q[0], up = Glu ? q[kCols / 2] : 0.0f;
    for (int z = 1; z < split.splits; ++z) {
      v += q[z * stride];
      if constexpr (Glu) up += q[z * stride + kCols / 2];
    }
    store_output<Glu>(op, t.row + i, c0 + c, v, up);
  }
}

}  // namespace corral::cuda::quant
