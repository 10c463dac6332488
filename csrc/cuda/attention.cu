// Paged attention on CUDA (contract: corral/kernels/attention.h). Everything runs on the stream
// with no host round trip; the host knows the batch's sequence count and block-table width but not
// its rows, so the work is planned on the device:
//   1. plan (one block): per sequence its rows, its kernel (tensor cores for more than
//      kDecodeTokens rows when the cache allows, CUDA cores otherwise), its split range and
//      whether its splits run as separate work items (split-KV, partials in scratch: decode rows
//      and prefills with few tiles, while the partials fit in kPartialCapBytes); prefix sums of
//      work items, partial records and merge items;
//   2. the CUDA-core kernel (attention_simt.cuh) and the tensor-core kernel (attention_tc.cuh),
//      persistent blocks taking work items from a counter;
//   3. merge: each (row, head) of a split sequence folds its splits' partials in split order.
// A row's result does not depend on the rest of the batch: splits and key stages are fixed by
// absolute key position, and running a sequence's splits in turn (merged in place) uses the merge
// kernel's arithmetic.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "attention_common.cuh"
#include "attention_simt.cuh"
#include "attention_tc.cuh"
#include "check.h"
#include "corral/error.h"
#include "device_limits.h"
#include "ops.h"
#include "scratch.h"

namespace corral::cuda {

namespace {

using namespace attn;

constexpr int kPlanThreads = 1024;

// Inclusive block-wide prefix sums of N int64 values per thread (kPlanThreads threads); totals in
// *total. Uses `scratch` [32][N] of shared memory.
template <int N>
__device__ void block_scan(int64_t (&v)[N], int64_t (&total)[N], int64_t (*scratch)[N]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k)
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(0xffffffffu, v[k], o);
      if (lane >= o) v[k] += y;
    }
  if (lane == 31)
#pragma unroll
    for (int k = 0; k < N; ++k) scratch[warp][k] = v[k];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      int64_t w = scratch[lane][k];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      scratch[lane][k] = w;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (warp > 0) v[k] += scratch[warp - 1][k];
    total[k] = scratch[31][k];
  }
  __syncthreads();
}

// One block of kPlanThreads threads.
__global__ void __launch_bounds__(kPlanThreads) attn_plan_kernel(AttnParams p, int64_t need_cap) {
  __shared__ int64_t scratch4[32][4];
  __shared__ int64_t scratch1[32][1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Pass 1, a warp per sequence: rows, kernel, split range (partial needs parked in part_off).
  for (int s = warp; s < p.num_seqs; s += kPlanThreads / 32) {
    const int32_t start = p.seq_starts[s];
    const int32_t n = max(p.seq_starts[s + 1] - start, 0);
    const bool tc = p.tc && n > kDecodeTokens;
    const int64_t tiles = (int64_t(n) * p.group + (tc ? kTcRows : kSimtRows) - 1) / (tc ? kTcRows : kSimtRows);
    int32_t lo = 0x7fffffff, hi = -1;
    if (n <= kRangeScanRows)
      for (int i = lane; i < n; i += 32) {
        const int32_t pos = p.positions[start + i];
        lo = min(lo, row_lo(p, pos));
        hi = max(hi, pos);
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if (lane == 0) {
      SeqPlan pl{0, 1, 0, tc ? 1 : 0};
      int64_t need = 0;
      if (n > 0 && hi >= 0) {
        pl.sp0 = int32_t(int64_t(lo / p.bs) / p.split_blocks);
        pl.nsp = int32_t(int64_t(hi / p.bs) / p.split_blocks - pl.sp0 + 1);
        // Split-KV for decode rows, and for prefills too few tiles to fill the GPU otherwise.
        const bool few = n <= kDecodeTokens || tiles * p.kv_heads < 2 * int64_t(p.num_sms);
        const bool want = pl.nsp > 1 && few;
        if (want) need = int64_t(pl.nsp) * n * p.heads;
        if (need > need_cap) need = 0;
      }
      p.plan[s] = pl;
      p.part_off[s] = need;
    }
  }
  __syncthreads();
  // Pass 2, a thread per sequence: prefix sums (sequences in chunks of kPlanThreads).
  int64_t carry_part = 0, carry[3] = {0, 0, 0};
  for (int base = 0; base < p.num_seqs; base += kPlanThreads) {
    const int s = base + tid;
    const bool in = s < p.num_seqs;
    int64_t need[1] = {in ? p.part_off[s] : 0};
    const int64_t excl_part = need[0];
    int64_t tot1[1];
    block_scan<1>(need, tot1, scratch1);
    const int64_t part_start = carry_part + need[0] - excl_part;
    int64_t items[3] = {0, 0, 0};
    SeqPlan pl{0, 1, 0, 0};
    if (in) {
      pl = p.plan[s];
      pl.split = excl_part > 0 && carry_part + need[0] <= p.part_cap ? 1 : 0;
      const int32_t n = max(p.seq_starts[s + 1] - p.seq_starts[s], 0);
      const int64_t tiles = (int64_t(n) * p.group + (pl.tc ? kTcRows : kSimtRows) - 1) / (pl.tc ? kTcRows : kSimtRows);
      const int64_t per = tiles * p.kv_heads * (pl.split ? pl.nsp : 1);
      items[pl.tc ? 1 : 0] = per;
      items[2] = pl.split ? int64_t(n) * p.heads : 0;
    }
    const int64_t excl[3] = {items[0], items[1], items[2]};
    int64_t tot3[3];
    block_scan<3>(items, tot3, reinterpret_cast<int64_t(*)[3]>(scratch4));
    if (in) {
      p.plan[s] = pl;
      p.part_off[s] = part_start;
      p.simt_off[s] = carry[0] + items[0] - excl[0];
      p.tc_off[s] = carry[1] + items[1] - excl[1];
      p.merge_off[s] = carry[2] + items[2] - excl[2];
    }
    carry_part += tot1[0];
    for (int k = 0; k < 3; ++k) carry[k] += tot3[k];
  }
  if (tid == 0) {
    p.part_off[p.num_seqs] = carry_part;
    p.simt_off[p.num_seqs] = carry[0];
    p.tc_off[p.num_seqs] = carry[1];
    p.merge_off[p.num_seqs] = carry[2];
    for (int k = 0; k < 4; ++k) p.counters[k] = 0ull;
  }
}

// A block per (row, query head) of a split sequence: its splits' partials folded in split order,
// a thread per pair of dims. The fold is sequential; the loads of kMergeChunk splits at a time are
// issued together (each warp's lanes fetch the chunk's (max, sum) pairs, shuffled to all lanes).
constexpr int kMergeThreads = 128;  // dims 2 t, 2 t + 1: head_dim <= 256
constexpr int kMergeChunk = 16;

__global__ void __launch_bounds__(kMergeThreads) attn_merge_kernel(AttnParams p) {
  __shared__ int64_t item_slot;
  const int tid = threadIdx.x, lane = tid & 31;
  const int64_t total = p.merge_off[p.num_seqs];
  const int i0 = 2 * tid;
  for (;;) {
    const int64_t item = next_item(&p.counters[2], total, &item_slot);
    if (item < 0) return;
    const int s = find_seq(p.merge_off, p.num_seqs, item);
    const SeqPlan pl = p.plan[s];
    const int32_t start = p.seq_starts[s], n = p.seq_starts[s + 1] - start;
    const int64_t local = item - p.merge_off[s];
    const int64_t tok = local / p.heads;
    const int h = int(local - tok * p.heads);
    const int32_t pos = p.positions[start + tok];
    const int sp_lo = int(int64_t(row_lo(p, pos) / p.bs) / p.split_blocks);
    const int sp_hi = int(int64_t(pos / p.bs) / p.split_blocks);
    const float* rec0 = part_record(p, s, pl, n, sp_lo, tok, h);
    const int64_t stride = int64_t(n) * p.heads * p.rec;  // floats from one split's record to the next
    float rm = kNegInf, rl = 0.f, racc[2] = {0.f, 0.f};
    for (int c0 = sp_lo; c0 <= sp_hi; c0 += kMergeChunk) {
      const int cn = min(kMergeChunk, sp_hi + 1 - c0);
      const float* rc = rec0 + int64_t(c0 - sp_lo) * stride;
      float mine_m = kNegInf, mine_l = 0.f;
      if (lane < cn) {
        mine_m = rc[lane * stride + p.rec - 2];
        mine_l = rc[lane * stride + p.rec - 1];
      }
      float v[kMergeChunk][2];
#pragma unroll
      for (int k = 0; k < kMergeChunk; ++k) {
        v[k][0] = k < cn && i0 < p.d ? rc[k * stride + i0] : 0.f;
        v[k][1] = k < cn && i0 + 1 < p.d ? rc[k * stride + i0 + 1] : 0.f;
      }
#pragma unroll
      for (int k = 0; k < kMergeChunk; ++k) {
        const float m = __shfl_sync(0xffffffffu, mine_m, k), l = __shfl_sync(0xffffffffu, mine_l, k);
        if (k < cn) {
          const MergeFactors mf = merge_factors(rm, m);
          racc[0] = merge_value(mf, racc[0], v[k][0]);
          racc[1] = merge_value(mf, racc[1], v[k][1]);
          merge_stats(mf, rm, rl, m, l);
        }
      }
    }
    float* o = p.out + ((int64_t(start) + tok) * p.heads + h) * int64_t(p.d);
    if (i0 < p.d) o[i0] = normalize(racc[0], rl);
    if (i0 + 1 < p.d) o[i0 + 1] = normalize(racc[1], rl);
  }
}

__global__ void attn_temperature_kernel(float* q, int64_t ld, int64_t width, const int32_t* positions,
                                        float attn_scale, float floor_scale) {
  const int64_t row = blockIdx.x;
  // float32 in transformers' order: floor((p + 1) / floor_scale), log1p, * attn_scale, + 1.
  const float steps = floorf(__fdiv_rn(__fadd_rn(float(positions[row]), 1.0f), floor_scale));
  const float factor = __fadd_rn(__fmul_rn(log1pf(steps), attn_scale), 1.0f);
  float* x = q + row * ld;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) x[i] = __fmul_rn(x[i], factor);
}

// ---- host ----------------------------------------------------------------------------------------

// Persistent grid of `kernel` (blocks of `threads` with `smem` dynamic bytes): as many blocks as
// fit on the device at once.
template <class K>
unsigned persistent_grid(K kernel, int threads, size_t smem) {
  allow_shared_memory(kernel, smem, "paged_attention (this head_dim / block_size / dtype)");
  int per_sm = 0;
  CORRAL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  if (per_sm < 1) throw NotSupportedError("paged_attention: a kernel does not fit on this GPU (" +
                                          std::to_string(smem) + " bytes of shared memory)");
  return unsigned(per_sm) * unsigned(sm_count());
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
bool aligned(const void* p, int64_t a) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(a) == 0; }

SimtGeo simt_geometry(const PagedKv& c, int copy) {
  const int d = c.head_dim, bs = c.block_size, es = int(dtype_size(c.dtype));
  SimtGeo g{};
  const int target = std::min(64, std::max(1, 16384 / (2 * d * es)));  // keys per stage: ~16 KB of K + V
  g.nbs = std::max(1, target / bs);
  g.kt = g.nbs * bs;
  g.ktp = g.kt <= 32 ? 32 : g.kt <= 64 ? 64 : 128;
  g.parts = kThreads / g.ktp;
  g.dpp = int(round_up((d + g.parts - 1) / g.parts, 4));
  const int units = (d + 1) / 2;
  g.wu = (units + 31) / 32;
  g.kpv = 4 / g.wu;
  g.dq = int(round_up(d, 4));
  g.head_bytes = bs * d * es;
  g.slot = int(round_up(g.head_bytes, 16)) + 32;  // padded: consecutive blocks start in other banks
  g.copy = copy;
  int off = 0;
  auto take = [&](int64_t bytes) {
    const int at = off;
    off += int(round_up(bytes, 16));
    return at;
  };
  g.off_q = take(int64_t(kSimtRows) * g.dq * 4);
  g.off_sp = take(std::max<int64_t>(int64_t(g.parts) * kSimtRows * g.ktp, int64_t(kSimtRows) * d) * 4);
  g.off_p = take(int64_t(g.ktp) * kRtp * 4);
  g.off_rows = take(sizeof(SimtRows));
  g.off_stage = take(int64_t(2) * 2 * g.nbs * g.slot);
  g.smem = off;
  return g;
}

template <class T>
void launch_simt(cudaStream_t s, const AttnParams& p, const SimtGeo& geo) {
  const unsigned grid = persistent_grid(attn_simt_kernel<T>, kThreads, size_t(geo.smem));
  attn_simt_kernel<T><<<grid, kThreads, size_t(geo.smem), s>>>(p, geo);
  CORRAL_CUDA_CHECK_LAUNCH();
}

template <class W, int D>
void launch_tc_typed(cudaStream_t s, const AttnParams& p) {
  const size_t smem = size_t(TcLayout<D>::SMEM);
  const unsigned grid = persistent_grid(attn_tc_kernel<W, D>, kThreads, smem);
  attn_tc_kernel<W, D><<<grid, kThreads, smem, s>>>(p);
  CORRAL_CUDA_CHECK_LAUNCH();
}

void launch_tc(cudaStream_t s, const AttnParams& p, DType dtype) {
  const bool bf = dtype == DType::BF16;
  if (p.d == 64) return bf ? launch_tc_typed<BF16, 64>(s, p) : launch_tc_typed<F16, 64>(s, p);
  return bf ? launch_tc_typed<BF16, 128>(s, p) : launch_tc_typed<F16, 128>(s, p);
}

}  // namespace

void paged_attention(void* stream, float* out, const float* q, int64_t heads, const PagedKv& c,
                     const AttentionBatch& b, float scale, int64_t chunk_size, AttentionPlan* plan) {
  if (c.kv_heads <= 0 || heads <= 0 || heads % c.kv_heads != 0)
    throw ShapeError("paged_attention: " + std::to_string(heads) + " query heads are not a multiple of " +
                     std::to_string(c.kv_heads) + " KV heads");
  if (c.dtype != DType::F32 && c.dtype != DType::BF16 && c.dtype != DType::F16 && c.dtype != DType::F8_E4M3)
    throw DTypeError(std::string("paged_attention: KV cache dtype ") + dtype_name(c.dtype) + " is not supported");
  const bool fp8 = c.dtype == DType::F8_E4M3;
  if (fp8 && (c.k_scale == nullptr || c.v_scale == nullptr))
    throw InvalidInputError("paged_attention: a float8_e4m3 KV cache needs k_scale and v_scale");
  if (c.head_dim < 1 || c.head_dim > 256)
    throw NotSupportedError("paged_attention on CUDA: head_dim " + std::to_string(c.head_dim) + " (1 to 256)");
  if (c.block_size < 1 || c.block_size > 128)
    throw NotSupportedError("paged_attention on CUDA: block_size " + std::to_string(c.block_size) + " (1 to 128)");
  if (heads > 0x7fffffff / 2 || b.num_seqs < 0 || b.max_blocks < 0)
    throw ShapeError("paged_attention: bad batch shape");
  if (b.num_seqs == 0) return;
  if (!c.k || !c.v || !b.seq_starts || !b.block_tables || !b.table_rows)
    throw InvalidInputError("paged_attention: a cache, seq_starts or block-table pointer is null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int d = c.head_dim, bs = c.block_size;
  const int64_t head_bytes = int64_t(bs) * d * int64_t(dtype_size(c.dtype));

  AttnParams p{};
  p.out = out;
  p.q = q;
  p.k = static_cast<const unsigned char*>(c.k);
  p.v = static_cast<const unsigned char*>(c.v);
  p.k_scale = fp8 ? reinterpret_cast<const unsigned char*>(c.k_scale) : nullptr;
  p.v_scale = fp8 ? reinterpret_cast<const unsigned char*>(c.v_scale) : nullptr;
  p.block_stride = c.block_stride;
  p.scale_step = c.scale_step();
  p.chunk = std::max<int64_t>(chunk_size, 0);
  p.seq_starts = b.seq_starts;
  p.positions = b.positions;
  p.block_tables = b.block_tables;
  p.table_rows = b.table_rows;
  p.num_seqs = b.num_seqs;
  p.max_blocks = b.max_blocks;
  p.heads = int32_t(heads);
  p.kv_heads = c.kv_heads;
  p.group = int32_t(heads / c.kv_heads);
  p.d = d;
  p.bs = bs;
  p.split_blocks = (kSplitKeys + bs - 1) / bs;
  p.num_sms = sm_count();
  p.scale = scale;
  p.rec = int32_t(round_up(d + 2, 4));

  // Copies in 16-byte pieces when every (block, head) of K and V starts 16-byte aligned.
  auto all_aligned = [&](int64_t a) {
    return aligned(c.k, a) && aligned(c.v, a) && c.block_stride % a == 0 && head_bytes % a == 0;
  };
  const int copy = all_aligned(16) ? 16 : all_aligned(4) ? 4 : 1;
  p.tc = (c.dtype == DType::BF16 || c.dtype == DType::F16) && (d == 64 || d == 128) &&
                 (bs == 16 || bs == 32 || bs == 64) && copy == 16
             ? 1
             : 0;
  const SimtGeo geo = simt_geometry(c, copy);

  // Scratch: the plan, and partial records when some sequence can span several splits.
  const int64_t S = b.num_seqs;
  const bool may_split = int64_t(b.max_blocks) > p.split_blocks;
  const int64_t cap = may_split ? kPartialCapBytes / (int64_t(p.rec) * 4) : 0;
  Scratch sc(s);
  const size_t o_plan = sc.reserve(size_t(S) * sizeof(SeqPlan)), o_simt = sc.reserve(size_t(S + 1) * 8),
               o_tc = sc.reserve(size_t(S + 1) * 8), o_merge = sc.reserve(size_t(S + 1) * 8),
               o_part = sc.reserve(size_t(S + 1) * 8), o_cnt = sc.reserve(4 * 8),
               o_parts = sc.reserve(size_t(cap) * size_t(p.rec) * 4);
  // A plan lent with room enough holds it all; its record says what it was made for.
  const bool lent = plan && plan->data && plan->bytes >= sc.size();
  if (plan) plan->needed = sc.size();
  const int64_t made_for[10] = {int64_t(reinterpret_cast<uintptr_t>(b.seq_starts)),
                                int64_t(reinterpret_cast<uintptr_t>(b.positions)),
                                S,
                                p.chunk,
                                heads,
                                c.kv_heads,
                                (int64_t(d) << 32) | bs,
                                p.tc,
                                cap,
                                int64_t(reinterpret_cast<uintptr_t>(plan ? plan->data : nullptr))};
  const bool reuse = lent && plan->valid && std::equal(made_for, made_for + 10, plan->made_for);
  if (!lent) sc.allocate();
  char* base = lent ? static_cast<char*>(plan->data) : sc.at<char>(0);
  p.plan = reinterpret_cast<SeqPlan*>(base + o_plan);
  p.simt_off = reinterpret_cast<int64_t*>(base + o_simt);
  p.tc_off = reinterpret_cast<int64_t*>(base + o_tc);
  p.merge_off = reinterpret_cast<int64_t*>(base + o_merge);
  p.part_off = reinterpret_cast<int64_t*>(base + o_part);
  p.counters = reinterpret_cast<unsigned long long*>(base + o_cnt);
  p.parts = cap > 0 ? reinterpret_cast<float*>(base + o_parts) : nullptr;
  p.part_cap = cap;

  if (reuse) {  // the plan stands; the persistent kernels count their work items from 0 again
    CORRAL_CUDA_CHECK(cudaMemsetAsync(p.counters, 0, 4 * sizeof(unsigned long long), s));
  } else {
    attn_plan_kernel<<<1, kPlanThreads, 0, s>>>(p, cap);
    CORRAL_CUDA_CHECK_LAUNCH();
    if (lent) {
      std::copy(made_for, made_for + 10, plan->made_for);
      plan->valid = true;
    }
  }
  switch (c.dtype) {
    case DType::F32: launch_simt<F32>(s, p, geo); break;
    case DType::BF16: launch_simt<BF16>(s, p, geo); break;
    case DType::F16: launch_simt<F16>(s, p, geo); break;
    default: launch_simt<FP8>(s, p, geo); break;
  }
  if (p.tc) launch_tc(s, p, c.dtype);
  if (cap > 0) {
    const unsigned grid = unsigned(sm_count()) * 8u;
    attn_merge_kernel<<<grid, kMergeThreads, 0, s>>>(p);
    CORRAL_CUDA_CHECK_LAUNCH();
  }
}

void attn_temperature_scale(void* stream, float* q, int64_t ld, int64_t rows, int64_t width,
                            const int32_t* positions, float attn_scale, float floor_scale) {
  if (rows <= 0 || width <= 0) return;
  if (rows > 0x7fffffff) throw ShapeError("attn_temperature_scale: too many rows for one CUDA launch");
  if (!q || !positions) throw InvalidInputError("attn_temperature_scale: a pointer is null");
  const int threads = width >= 1024 ? 256 : width >= 128 ? 128 : 32;
  attn_temperature_kernel<<<unsigned(rows), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      q, ld, width, positions, attn_scale, floor_scale);
  CORRAL_CUDA_CHECK_LAUNCH();
}

}  // namespace corral::cuda
