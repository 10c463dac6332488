// Paged attention on CUDA cores, for every cache dtype, head size (<= 256) and block size (<= 128):
// the decode kernel (sequences with at most kDecodeTokens rows) and the fallback of prefill tiles
// the tensor-core kernel does not take.
//
// One block (4 warps) per work item: kSimtRows flattened rows (token, query head of the group) of
// one sequence and one KV head, over one split of 2048 keys (split-KV: the partial (max, sum,
// output) goes to scratch, the merge kernel combines the splits in order) or over all of the rows'
// splits one after another (merged in place, in `out`, with the same arithmetic). All query heads
// of a KV head are rows of the same item, so each K/V block is read once for all of them.
//
// Keys go through shared memory in stages of whole blocks (cp.async, 16-byte pieces when aligned,
// two stages in flight). Stages are aligned to absolute block indices, so a row's arithmetic does
// not depend on the other rows of its item (batch invariance):
//   scores:  thread (key j, dim part) dots the rows' queries (float32, pre-scaled, in shared
//            memory) with K[:, j] over its dims; parts are summed in order;
//   softmax: a warp per row: mask, max, exp (expf), sum, the running max / sum; fp8 applies the
//            block's k_scale to the scores and v_scale to the probabilities, as the CPU does;
//   P . V:   thread (2 dims, key part) accumulates rows x 2 dims in registers; key parts are
//            summed in order at the end of a split.
// The number of rows per item (RT) is a template parameter chosen per item at run time.
#pragma once

#include "attention_common.cuh"

namespace corral::cuda::attn {

// Geometry of the CUDA-core kernel, fixed per launch by the host.
struct SimtGeo {
  int nbs;          // blocks per stage
  int kt, ktp;      // keys per stage (nbs * bs) and that padded to 32, 64 or 128
  int parts, dpp;   // score threads: 128 / ktp dim parts of dpp dims (a multiple of 4)
  int wu, kpv;      // P . V threads: warps per key part, key parts
  int dq;           // row pitch (floats) of the queries in shared memory
  int slot;         // bytes per block in a stage (K or V), 16-byte multiple
  int copy;         // 16 or 4: cp.async piece size; 1: byte copies
  int head_bytes;   // bytes of one (block, KV head) of K (and of V)
  int off_q, off_sp, off_p, off_rows, off_stage;  // shared memory offsets (bytes)
  int smem;         // bytes of dynamic shared memory
};

constexpr int kRtp = kSimtRows + 4;  // row pitch (floats) of P[key][row]

// Per-row state in shared memory.
struct SimtRows {
  int32_t lo[kSimtRows], hi[kSimtRows];
  float m[kSimtRows], l[kSimtRows], corr[kSimtRows];  // running max / sum of the split, last rescale
  float run_m[kSimtRows], run_l[kSimtRows];            // splits merged so far (sequential mode)
  int32_t lo_min, hi_max;
  float scl[2][2][64];  // [stage buffer][K, V][block slot]: fp8 scales
};

// What the kernel body decided about its item.
struct SimtItem {
  int s;             // sequence
  SeqPlan pl;
  int32_t start, n;  // first row, rows of the sequence
  int g;             // KV head
  int64_t f0;        // first flattened row
  int R;             // rows
  int sp_begin, sp_end;  // splits to run (inclusive)
  int64_t first_block, last_block;
};

template <class T>
__device__ __forceinline__ void simt_load_stage(const AttnParams& p, const SimtGeo& geo, const SimtItem& it,
                                                unsigned char* smem, int buf, int64_t st, int64_t b0, int64_t b1) {
  SimtRows& rows = *reinterpret_cast<SimtRows*>(smem + geo.off_rows);
  unsigned char* kdst = smem + geo.off_stage + int64_t(buf) * 2 * geo.nbs * geo.slot;
  unsigned char* vdst = kdst + int64_t(geo.nbs) * geo.slot;
  const int32_t* table = p.block_tables + int64_t(p.table_rows[it.s]) * p.max_blocks;
  const int64_t head_off = int64_t(it.g) * geo.head_bytes;
  const int tid = threadIdx.x;
  if (geo.copy == 1) {
    const int total = geo.nbs * geo.head_bytes;
    for (int c = tid; c < total; c += kThreads) {
      const int slot = c / geo.head_bytes, off = c - slot * geo.head_bytes;
      const int64_t blk = st * geo.nbs + slot;
      const bool valid = blk >= b0 && blk < b1;
      unsigned char kb = 0, vb = 0;
      if (valid) {
        const int64_t at = int64_t(table[blk]) * p.block_stride + head_off + off;
        kb = p.k[at];
        vb = p.v[at];
      }
      kdst[slot * geo.slot + off] = kb;
      vdst[slot * geo.slot + off] = vb;
    }
  } else {
    const int piece = geo.copy, per_block = geo.head_bytes / piece, total = geo.nbs * per_block;
    for (int c = tid; c < total; c += kThreads) {
      const int slot = c / per_block, off = (c - slot * per_block) * piece;
      const int64_t blk = st * geo.nbs + slot;
      const bool valid = blk >= b0 && blk < b1;
      const int64_t at = valid ? int64_t(table[blk]) * p.block_stride + head_off + off : 0;
      if (piece == 16) {
        cp_async16(kdst + slot * geo.slot + off, p.k + at, valid);
        cp_async16(vdst + slot * geo.slot + off, p.v + at, valid);
      } else {
        cp_async4(kdst + slot * geo.slot + off, p.k + at, valid);
        cp_async4(vdst + slot * geo.slot + off, p.v + at, valid);
      }
    }
  }
  if (p.k_scale != nullptr && tid < geo.nbs) {
    const int64_t blk = st * geo.nbs + tid;
    float ks = 1.f, vs = 1.f;
    if (blk >= b0 && blk < b1) {
      const int64_t at = int64_t(table[blk]) * p.scale_step + int64_t(it.g) * 4;
      ks = *reinterpret_cast<const float*>(p.k_scale + at);
      vs = *reinterpret_cast<const float*>(p.v_scale + at);
    }
    rows.scl[buf][0][tid] = ks;
    rows.scl[buf][1][tid] = vs;
  }
}

template <class T, int RT>
__device__ __forceinline__ void simt_process(const AttnParams& p, const SimtGeo& geo, const SimtItem& it,
                                             unsigned char* smem) {
  SimtRows& rows = *reinterpret_cast<SimtRows*>(smem + geo.off_rows);
  const float* qs = reinterpret_cast<const float*>(smem + geo.off_q);
  float* sp_buf = reinterpret_cast<float*>(smem + geo.off_sp);  // [parts][kSimtRows][ktp]; later [RT][d]
  float* pb = reinterpret_cast<float*>(smem + geo.off_p);       // [ktp][kRtp]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int d = p.d, bs = p.bs, R = it.R;
  const bool fp8 = p.k_scale != nullptr;
  const bool even_d = (d & 1) == 0;
  const int64_t SB = p.split_blocks;
  const int32_t lo_min = rows.lo_min, hi_max = rows.hi_max;

  // P . V thread: dims 2u, 2u + 1, key part kp.
  const bool pv_active = warp < geo.kpv * geo.wu;
  const int u = (warp % geo.wu) * 32 + lane, kp = warp / geo.wu;
  const int i0 = 2 * u;
  // Score thread: key j of the stage, dims [di0, di1).
  const int sj = tid % geo.ktp, spart = tid / geo.ktp;
  const int di0 = spart * geo.dpp, di1 = min(d, di0 + geo.dpp);

  for (int sp = it.sp_begin; sp <= it.sp_end; ++sp) {
    const int64_t b0 = max(it.first_block, int64_t(sp) * SB);
    const int64_t b1 = min(it.last_block + 1, int64_t(sp + 1) * SB);
    float acc[RT][2];
#pragma unroll
    for (int r = 0; r < RT; ++r) acc[r][0] = acc[r][1] = 0.f;

    if (b0 < b1) {
      const int64_t st0 = b0 / geo.nbs, st1 = (b1 - 1) / geo.nbs;
      simt_load_stage<T>(p, geo, it, smem, 0, st0, b0, b1);
      cp_async_commit();
      for (int64_t st = st0; st <= st1; ++st) {
        const int buf = int((st - st0) & 1);
        if (st < st1) simt_load_stage<T>(p, geo, it, smem, buf ^ 1, st + 1, b0, b1);
        cp_async_commit();
        cp_async_wait_1();
        __syncthreads();
        const unsigned char* kst = smem + geo.off_stage + int64_t(buf) * 2 * geo.nbs * geo.slot;
        const unsigned char* vst = kst + int64_t(geo.nbs) * geo.slot;
        const int64_t key0 = st * geo.nbs * int64_t(bs);  // absolute key of the stage's first slot

        // Scores: thread (sj, spart) over dims [di0, di1) for every row.
        if (sj < geo.kt) {
          const int slot = sj / bs, off = sj - slot * bs;
          const void* kb = kst + slot * geo.slot;
          float a[RT];
#pragma unroll
          for (int r = 0; r < RT; ++r) a[r] = 0.f;
          int i = di0;
          for (; i + 4 <= di1; i += 4) {
            const float k0 = load_elem<T>(kb, i * bs + off);
            const float k1 = load_elem<T>(kb, (i + 1) * bs + off);
            const float k2 = load_elem<T>(kb, (i + 2) * bs + off);
            const float k3 = load_elem<T>(kb, (i + 3) * bs + off);
#pragma unroll
            for (int r = 0; r < RT; ++r) {
              const float4 qv = *reinterpret_cast<const float4*>(qs + r * geo.dq + i);
              a[r] = __fmaf_rn(qv.x, k0, a[r]);
              a[r] = __fmaf_rn(qv.y, k1, a[r]);
              a[r] = __fmaf_rn(qv.z, k2, a[r]);
              a[r] = __fmaf_rn(qv.w, k3, a[r]);
            }
          }
          for (; i < di1; ++i) {
            const float kx = load_elem<T>(kb, i * bs + off);
#pragma unroll
            for (int r = 0; r < RT; ++r) a[r] = __fmaf_rn(qs[r * geo.dq + i], kx, a[r]);
          }
#pragma unroll
          for (int r = 0; r < RT; ++r) sp_buf[(spart * kSimtRows + r) * geo.ktp + sj] = a[r];
        }
        __syncthreads();

        // Softmax: warp w takes rows w, w + 4, ... Keys j of the stage count when their block is
        // loaded (slots [slo, shi)) and the row sees them (j in [vlo, vhi]).
        const int slo = int(max(b0 - st * geo.nbs, int64_t(0))), shi = int(min(b1 - st * geo.nbs, int64_t(geo.nbs)));
        for (int r = warp; r < R; r += 4) {
          const int vlo = int(max(int64_t(rows.lo[r]) - key0, int64_t(0)));
          const int vhi = int(min(int64_t(rows.hi[r]) - key0, int64_t(geo.kt) - 1));
          float sv[4];
          float bmax = kNegInf;
#pragma unroll
          for (int uu = 0; uu < 4; ++uu) {
            const int j = lane + 32 * uu;
            float x = kNegInf;
            if (j < geo.kt) {
              const int slot = j / bs;
              if (slot >= slo && slot < shi && j >= vlo && j <= vhi) {
                x = sp_buf[r * geo.ktp + j];
                for (int q = 1; q < geo.parts; ++q) x = __fadd_rn(x, sp_buf[(q * kSimtRows + r) * geo.ktp + j]);
                if (fp8) x = __fmul_rn(x, rows.scl[buf][0][slot]);
              }
            }
            sv[uu] = x;
            bmax = fmaxf(bmax, x);
          }
          bmax = warp_max(bmax);
          if (bmax == kNegInf) {  // no visible key of this stage
#pragma unroll
            for (int uu = 0; uu < 4; ++uu) {
              const int j = lane + 32 * uu;
              if (j < geo.kt) pb[j * kRtp + r] = 0.f;
            }
            if (lane == 0) rows.corr[r] = 1.f;
            continue;
          }
          const float m_old = rows.m[r];
          const float m_new = fmaxf(m_old, bmax);
          const float corr = expf(m_old - m_new);
          float sum = 0.f;
#pragma unroll
          for (int uu = 0; uu < 4; ++uu) {
            const int j = lane + 32 * uu;
            const float e = expf(sv[uu] - m_new);
            sum = __fadd_rn(sum, e);
            if (j < geo.kt) pb[j * kRtp + r] = fp8 ? __fmul_rn(e, rows.scl[buf][1][j / bs]) : e;
          }
          sum = warp_sum(sum);
          __syncwarp();
          if (lane == 0) {
            rows.l[r] = __fadd_rn(__fmul_rn(rows.l[r], corr), sum);
            rows.m[r] = m_new;
            rows.corr[r] = corr;
          }
        }
        __syncthreads();

        // P . V: rescale, then the stage's visible keys (of this key part).
        if (pv_active) {
#pragma unroll
          for (int r = 0; r < RT; ++r) {
            const float c = rows.corr[r];
            acc[r][0] = __fmul_rn(acc[r][0], c);
            acc[r][1] = __fmul_rn(acc[r][1], c);
          }
          if (i0 < d) {
            const int64_t klo = max(b0 * bs, int64_t(lo_min)), khi = min(b1 * bs - 1, int64_t(hi_max));
            const int jlo = int(max(klo - key0, int64_t(0)));
            const int jhi = int(min(khi - key0 + 1, int64_t(geo.kt)));
            // Keys j = kp (mod kpv), by position in the aligned stage: the same keys per part for
            // every item; skipped keys have P = 0.
            int j = jlo + ((kp - jlo % geo.kpv) + geo.kpv) % geo.kpv;
            for (; j < jhi; j += geo.kpv) {
              const int slot = j / bs, off = j - slot * bs;
              const void* vb = vst + slot * geo.slot;
              const int e = off * d + i0;
              float2 v;
              if (even_d) {
                v = load_pair<T>(vb, e);
              } else {
                v.x = load_elem<T>(vb, e);
                v.y = i0 + 1 < d ? load_elem<T>(vb, e + 1) : 0.f;
              }
              const float* pr = pb + j * kRtp;
#pragma unroll
              for (int r4 = 0; r4 < (RT + 3) / 4; ++r4) {
                const float4 p4 = *reinterpret_cast<const float4*>(pr + 4 * r4);
                const float pv[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                  if (4 * r4 + k < RT) {
                    acc[4 * r4 + k][0] = __fmaf_rn(pv[k], v.x, acc[4 * r4 + k][0]);
                    acc[4 * r4 + k][1] = __fmaf_rn(pv[k], v.y, acc[4 * r4 + k][1]);
                  }
                }
              }
            }
          }
        }
        __syncthreads();  // the buffer and the score / P scratch are reused next
      }
    }

    // The split's output: key parts summed in order into red[r][d] (the score scratch).
    float* red = sp_buf;
    for (int k = 0; k < geo.kpv; ++k) {
      if (pv_active && kp == k && i0 < d) {
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          float* o = red + r * d + i0;
          o[0] = k == 0 ? acc[r][0] : __fadd_rn(o[0], acc[r][0]);
          if (i0 + 1 < d) o[1] = k == 0 ? acc[r][1] : __fadd_rn(o[1], acc[r][1]);
        }
      }
      __syncthreads();
    }
    const bool split_mode = it.pl.split != 0;
    const bool last = sp == it.sp_end;
    for (int idx = tid; idx < R * d; idx += kThreads) {
      const int r = idx / d, i = idx - r * d;
      const int64_t f = it.f0 + r;
      const int64_t tok = f / p.group;
      const int h = it.g * p.group + int(f - tok * p.group);
      const float m = rows.m[r], l = rows.l[r], a = red[r * d + i];
      if (split_mode) {
        float* rec = part_record(p, it.s, it.pl, it.n, sp, tok, h);
        rec[i] = a;
        if (i == 0) {
          rec[p.rec - 2] = m;
          rec[p.rec - 1] = l;
        }
      } else {
        float* o = p.out + ((int64_t(it.start) + tok) * p.heads + h) * int64_t(d) + i;
        float rm = rows.run_m[r], rl = rows.run_l[r];
        const MergeFactors mf = merge_factors(rm, m);
        const float racc = merge_value(mf, rm == kNegInf ? 0.f : *o, a);
        merge_stats(mf, rm, rl, m, l);
        if (last) *o = normalize(racc, rl);
        else if (rm != kNegInf) *o = racc;
      }
    }
    __syncthreads();
    if (tid < kSimtRows) {
      if (!split_mode && tid < R) {
        float rm = rows.run_m[tid], rl = rows.run_l[tid];
        merge_stats(merge_factors(rm, rows.m[tid]), rm, rl, rows.m[tid], rows.l[tid]);
        rows.run_m[tid] = rm;
        rows.run_l[tid] = rl;
      }
      rows.m[tid] = kNegInf;
      rows.l[tid] = 0.f;
      rows.corr[tid] = 1.f;
    }
    __syncthreads();
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, 4)
    attn_simt_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ SimtGeo geo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async needs sm_80
#else
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int64_t item_slot;
  __shared__ SimtItem item_info;
  SimtRows& rows = *reinterpret_cast<SimtRows*>(smem + geo.off_rows);
  float* qs = reinterpret_cast<float*>(smem + geo.off_q);
  float* pb = reinterpret_cast<float*>(smem + geo.off_p);
  const int tid = threadIdx.x;
  const int64_t total = p.simt_off[p.num_seqs];
  for (;;) {
    const int64_t item = next_item(&p.counters[0], total, &item_slot);
    if (item < 0) return;
    SimtItem it;
    it.s = find_seq(p.simt_off, p.num_seqs, item);
    it.pl = p.plan[it.s];
    const int nspi = it.pl.split ? it.pl.nsp : 1;
    const int64_t local = item - p.simt_off[it.s];
    const int spi = int(local % nspi);
    const int64_t rest = local / nspi;
    it.g = int(rest % p.kv_heads);
    const int64_t tile = rest / p.kv_heads;
    it.start = p.seq_starts[it.s];
    it.n = p.seq_starts[it.s + 1] - it.start;
    it.f0 = tile * kSimtRows;
    it.R = int(min(int64_t(kSimtRows), int64_t(it.n) * p.group - it.f0));

    // Rows: positions and visible key ranges (warp 0), queries pre-scaled (all threads).
    if (tid < 32) {
      int32_t lo = 0x7fffffff, hi = -1;
      if (tid < it.R) {
        const int64_t tok = (it.f0 + tid) / p.group;
        const int32_t pos = p.positions[it.start + tok];
        lo = row_lo(p, pos);
        hi = pos;
      }
      if (tid < kSimtRows) {
        rows.lo[tid] = lo;
        rows.hi[tid] = hi;
        rows.m[tid] = kNegInf;
        rows.l[tid] = 0.f;
        rows.corr[tid] = 1.f;
        rows.run_m[tid] = kNegInf;
        rows.run_l[tid] = 0.f;
      }
      int32_t lo_min = lo, hi_max = hi;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        lo_min = min(lo_min, __shfl_xor_sync(0xffffffffu, lo_min, o));
        hi_max = max(hi_max, __shfl_xor_sync(0xffffffffu, hi_max, o));
      }
      if (tid == 0) {
        rows.lo_min = lo_min;
        rows.hi_max = hi_max;
      }
    }
    for (int idx = tid; idx < kSimtRows * geo.dq; idx += kThreads) {
      const int r = idx / geo.dq, i = idx - r * geo.dq;
      float x = 0.f;
      if (r < it.R && i < p.d) {
        const int64_t f = it.f0 + r, tok = f / p.group;
        const int h = it.g * p.group + int(f - tok * p.group);
        x = __fmul_rn(p.q[((int64_t(it.start) + tok) * p.heads + h) * p.d + i], p.scale);
      }
      qs[idx] = x;
    }
    for (int idx = tid; idx < geo.ktp * kRtp; idx += kThreads) pb[idx] = 0.f;
    __syncthreads();
    it.first_block = rows.lo_min / p.bs;
    it.last_block = rows.hi_max / p.bs;
    if (it.pl.split) {
      it.sp_begin = it.sp_end = it.pl.sp0 + spi;
      // A split outside this tile's keys: nothing to do (no row of the tile reads its record).
      if (int64_t(it.sp_begin + 1) * p.split_blocks <= it.first_block ||
          int64_t(it.sp_begin) * p.split_blocks > it.last_block)
        continue;
    } else {
      it.sp_begin = int(it.first_block / p.split_blocks);
      it.sp_end = int(it.last_block / p.split_blocks);
    }
    if (tid == 0) item_info = it;
    __syncthreads();
    const int R = it.R;
    if (R <= 1) simt_process<T, 1>(p, geo, item_info, smem);
    else if (R <= 2) simt_process<T, 2>(p, geo, item_info, smem);
    else if (R <= 4) simt_process<T, 4>(p, geo, item_info, smem);
    else if (R <= 5) simt_process<T, 5>(p, geo, item_info, smem);
    else if (R <= 8) simt_process<T, 8>(p, geo, item_info, smem);
    else simt_process<T, 16>(p, geo, item_info, smem);
  }
#endif
}

}  // namespace corral::cuda::attn
