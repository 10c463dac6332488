// Paged attention prefill on tensor cores: bfloat16 / float16 caches, head_dim 64 or 128, block
// size 16, 32 or 64 (flash-attention style, nvcuda::wmma m16n16k16 with float32 accumulation).
//
// One block (4 warps) per work item: kTcRows flattened rows (token, query head of the group) of one
// sequence and one KV head, 16 rows per warp, over KV tiles of kTcKeys keys (whole blocks, aligned
// to absolute key positions, so a row's arithmetic does not depend on the other rows of its tile).
// K tiles land in shared memory as K^T [head_dim][keys] (the cache's per-block layout, blocks side
// by side), so S = Q K^T reads K as stored through row_major B fragments; V tiles as [keys][dim].
// Two tiles in flight (cp.async). Per tile and warp:
//   S (16 x 64, float) = Q (bf16/f16 fragments held in registers, pre-scaled) . K^T;
//   S -> shared memory; each row's lanes mask it (keys lo..p of the row), take the max, and move
//   the running max only past a margin (kLazyMax); P = exp(S - m) is rounded to the cache type and
//   its rounded values summed into l;
//   when a row's max moved, the output fragments go through shared memory to be rescaled;
//   O (16 x head_dim, float fragments) += P . V.
// Blocks outside a tile's visible range are never read (zeros instead), so chunked (local) layers
// cost one chunk per row; V rows of keys outside the tile's range are zeroed (unwritten slots may
// hold anything, and 0 * NaN is NaN).
// Splits of 2048 keys as in the CUDA-core kernel: one item per split (partials merged by the merge
// kernel) or all splits in turn, merged in `out`.
#pragma once

#include <mma.h>

#include <type_traits>

#include "attention_common.cuh"

namespace corral::cuda::attn {

template <int D>
struct TcLayout {
  static constexpr int LDK = kTcKeys + 8;  // K^T tile [D][LDK] (elements)
  static constexpr int LDV = D + 8;        // V tile [kTcKeys][LDV]
  static constexpr int LDS = kTcKeys + 4;  // S / O staging [16][LDS] floats per warp
  static constexpr int LDP = kTcKeys + 8;  // P [16][LDP] per warp
  static constexpr int K_BYTES = D * LDK * 2;
  static constexpr int V_BYTES = kTcKeys * LDV * 2;
  static constexpr int OFF_K = 0;                           // [2] K^T tiles
  static constexpr int OFF_V = OFF_K + 2 * K_BYTES;         // [2] V tiles
  static constexpr int OFF_S = OFF_V + 2 * V_BYTES;         // [4 warps] S / O staging
  static constexpr int OFF_P = OFF_S + 4 * 16 * LDS * 4;    // [4 warps] P
  static constexpr int OFF_ROWS = OFF_P + 4 * 16 * LDP * 2;  // lo[64], hi[64], lo_min, hi_max
  static constexpr int SMEM = OFF_ROWS + (2 * kTcRows + 8) * 4;
  // The queries are staged ([kTcRows][LDV] elements) in the second K tile before the pipeline starts.
  static_assert(kTcRows * LDV * 2 <= K_BYTES, "query staging fits in a K tile");
  static_assert(D % 64 == 0, "output chunks of 64 columns");
};

template <class W>
struct TcType;
template <>
struct TcType<BF16> {
  using Frag = __nv_bfloat16;
  static __device__ __forceinline__ uint16_t bits(float x) { return f32_to_bf16_bits(x); }
  static __device__ __forceinline__ float value(uint16_t b) { return bf16_bits_to_f32(b); }
};
template <>
struct TcType<F16> {
  using Frag = __half;
  static __device__ __forceinline__ uint16_t bits(float x) { return f32_to_f16_bits(x); }
  static __device__ __forceinline__ float value(uint16_t b) { return f16_bits_to_f32(b); }
};

template <class W, int D>
__global__ void __launch_bounds__(kThreads, D == 64 ? 3 : 2) attn_tc_kernel(AttnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bfloat16 tensor cores and cp.async need sm_80
#else
  using namespace nvcuda;
  using L = TcLayout<D>;
  using E = typename TcType<W>::Frag;
  constexpr int KF = D / 16;  // k-steps of Q . K^T, and 16-column fragments of O
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int64_t item_slot;
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem + L::OFF_K);
  uint16_t* vs = reinterpret_cast<uint16_t*>(smem + L::OFF_V);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  float* so = reinterpret_cast<float*>(smem + L::OFF_S) + warp * 16 * L::LDS;
  uint16_t* ps = reinterpret_cast<uint16_t*>(smem + L::OFF_P) + warp * 16 * L::LDP;
  int32_t* s_lo = reinterpret_cast<int32_t*>(smem + L::OFF_ROWS);
  int32_t* s_hi = s_lo + kTcRows;
  int32_t* s_red = s_hi + kTcRows;  // [0..1] lo_min per warp 0/1, [2..3] hi_max, [4] lo_min, [5] hi_max
  const int bs = p.bs, nb = kTcKeys / bs, lbs = __ffs(bs) - 1;  // bs: 16, 32 or 64
  const int64_t head_bytes = int64_t(bs) * D * 2;
  const int64_t total = p.tc_off[p.num_seqs];
  // Softmax lanes: row r of the warp's 16, key columns j = 2 * jj + hf.
  const int r = lane >> 1, hf = lane & 1;

  for (;;) {
    const int64_t item = next_item(&p.counters[1], total, &item_slot);
    if (item < 0) return;
    const int s = find_seq(p.tc_off, p.num_seqs, item);
    const SeqPlan pl = p.plan[s];
    const int nspi = pl.split ? pl.nsp : 1;
    const int64_t local = item - p.tc_off[s];
    const int spi = int(local % nspi);
    const int64_t rest = local / nspi;
    const int g = int(rest % p.kv_heads);
    const int32_t start = p.seq_starts[s], n = p.seq_starts[s + 1] - start;
    const int64_t rows_flat = int64_t(n) * p.group;
    const int64_t tiles = (rows_flat + kTcRows - 1) / kTcRows;
    const int64_t tile = tiles - 1 - rest / p.kv_heads;  // the longest (last) tiles first
    const int64_t f0 = tile * kTcRows;

    // Rows: visible ranges; queries scaled, rounded and staged, then loaded into fragments.
    if (tid < kTcRows) {
      int32_t lo = 0x7fffffff, hi = -1;
      if (f0 + tid < rows_flat) {
        const int32_t pos = p.positions[start + (f0 + tid) / p.group];
        lo = row_lo(p, pos);
        hi = pos;
      }
      s_lo[tid] = lo;
      s_hi[tid] = hi;
      int32_t lo_min = lo, hi_max = hi;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        lo_min = min(lo_min, __shfl_xor_sync(0xffffffffu, lo_min, o));
        hi_max = max(hi_max, __shfl_xor_sync(0xffffffffu, hi_max, o));
      }
      if (lane == 0) {
        s_red[warp] = lo_min;
        s_red[2 + warp] = hi_max;
      }
    }
    uint16_t* qstage = ks + D * L::LDK;  // the second K tile
    for (int idx = tid; idx < kTcRows * D; idx += kThreads) {
      const int rr = idx / D, i = idx - rr * D;
      const int64_t f = f0 + rr;
      float x = 0.f;
      if (f < rows_flat) {
        const int64_t tok = f / p.group;
        const int h = g * p.group + int(f - tok * p.group);
        x = __fmul_rn(p.q[((int64_t(start) + tok) * p.heads + h) * D + i], p.scale);
      }
      qstage[rr * L::LDV + i] = TcType<W>::bits(x);
    }
    __syncthreads();
    const int32_t lo_min = min(s_red[0], s_red[1]), hi_max = max(s_red[2], s_red[3]);
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> qa[KF];
#pragma unroll
    for (int k = 0; k < KF; ++k)
      wmma::load_matrix_sync(qa[k], reinterpret_cast<const E*>(qstage) + warp * 16 * L::LDV + k * 16, L::LDV);
    __syncthreads();  // the staging area is the pipeline's second K tile

    const int64_t first_block = lo_min / bs, last_block = hi_max / bs;
    const int64_t SB = p.split_blocks;
    int sp_begin, sp_end;
    if (pl.split) {
      sp_begin = sp_end = pl.sp0 + spi;
      if (int64_t(sp_begin + 1) * SB <= first_block || int64_t(sp_begin) * SB > last_block) continue;
    } else {
      sp_begin = int(first_block / SB);
      sp_end = int(last_block / SB);
    }
    const int32_t row_lo_v = s_lo[warp * 16 + r], row_hi_v = s_hi[warp * 16 + r];
    const int64_t my_f = f0 + warp * 16 + r;
    const bool row_valid = my_f < rows_flat;
    const int64_t my_tok = row_valid ? my_f / p.group : 0;
    const int my_h = g * p.group + int(my_f - my_tok * p.group);
    const int32_t* table = p.block_tables + int64_t(p.table_rows[s]) * p.max_blocks;
    const unsigned char* kbase = p.k + int64_t(g) * head_bytes;
    const unsigned char* vbase = p.v + int64_t(g) * head_bytes;
    float run_m = kNegInf, run_l = 0.f;  // splits merged so far (sequential mode), this lane's row

    for (int sp = sp_begin; sp <= sp_end; ++sp) {
      const int64_t b0 = max(first_block, int64_t(sp) * SB);
      const int64_t b1 = min(last_block + 1, int64_t(sp + 1) * SB);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[KF];
#pragma unroll
      for (int n2 = 0; n2 < KF; ++n2) wmma::fill_fragment(o[n2], 0.f);
      float m_run = kNegInf, l_run = 0.f;

      if (b0 < b1) {
        const int64_t t0 = b0 / nb, t1 = (b1 - 1) / nb;  // KV tiles (whole blocks)
        // A KV tile: K^T [D][64 keys] and V [64 keys][D] in 16-byte pieces. Each thread's pieces
        // lie in one block of the tile for K and one for V: one table lookup each.
        //   K: piece (row i, keys 8 kc ..): kc = tid % 8, rows tid / 8 + 16 it;
        //   V: piece (key j, dims 8 vc ..): j = (tid / 2) % 64, vc = tid % 2 + 2 it (two threads
        //      read a key's 32 contiguous bytes).
        const int kc = tid & 7, k_slot = (kc * 8) >> lbs, k_col = (kc * 8) & (bs - 1);
        const int vj = (tid >> 1) & 63, v_slot = vj >> lbs, v_row = vj & (bs - 1);
        auto load_tile = [&](int buf, int64_t kt) {
          uint16_t* kd = ks + buf * D * L::LDK;
          uint16_t* vd = vs + buf * kTcKeys * L::LDV;
          const int64_t kblk = kt * nb + k_slot, vblk = kt * nb + v_slot;
          const bool kvalid = kblk >= b0 && kblk < b1, vvalid = vblk >= b0 && vblk < b1;
          const unsigned char* ksrc = kvalid ? kbase + int64_t(table[kblk]) * p.block_stride + k_col * 2 : p.k;
          const unsigned char* vsrc = vvalid ? vbase + int64_t(table[vblk]) * p.block_stride + v_row * D * 2 : p.v;
#pragma unroll
          for (int it = 0; it < D / 16; ++it) {
            const int i = (tid >> 3) + 16 * it;
            cp_async16(kd + i * L::LDK + kc * 8, kvalid ? ksrc + i * bs * 2 : ksrc, kvalid);
          }
#pragma unroll
          for (int it = 0; it < D / 16; ++it) {
            const int vc = (tid & 1) + 2 * it;
            cp_async16(vd + vj * L::LDV + vc * 8, vvalid ? vsrc + vc * 16 : vsrc, vvalid);
          }
        };
        load_tile(0, t0);
        cp_async_commit();
        for (int64_t kt = t0; kt <= t1; ++kt) {
          const int buf = int((kt - t0) & 1);
          if (kt < t1) load_tile(buf ^ 1, kt + 1);
          cp_async_commit();
          cp_async_wait_1();
          __syncthreads();
          const uint16_t* kd = ks + buf * D * L::LDK;
          uint16_t* vd = vs + buf * kTcKeys * L::LDV;
          const int32_t key0 = int32_t(kt * kTcKeys);  // positions are int32
          if (key0 < lo_min || key0 + (kTcKeys - 1) > hi_max) {  // zero V rows outside [lo_min, hi_max]
            for (int c = tid; c < kTcKeys * (D / 8); c += kThreads) {
              const int j = c / (D / 8), cc = c - j * (D / 8);
              const int32_t key = key0 + j;
              if (key < lo_min || key > hi_max)
                *reinterpret_cast<uint4*>(vd + j * L::LDV + cc * 8) = make_uint4(0u, 0u, 0u, 0u);
            }
            __syncthreads();
          }

          // S = Q . K^T for the warp's 16 rows.
          {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> sc[kTcKeys / 16];
#pragma unroll
            for (int n2 = 0; n2 < kTcKeys / 16; ++n2) wmma::fill_fragment(sc[n2], 0.f);
#pragma unroll
            for (int k = 0; k < KF; ++k) {
#pragma unroll
              for (int n2 = 0; n2 < kTcKeys / 16; ++n2) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> b;
                wmma::load_matrix_sync(b, reinterpret_cast<const E*>(kd) + k * 16 * L::LDK + n2 * 16, L::LDK);
                wmma::mma_sync(sc[n2], qa[k], b, sc[n2]);
              }
            }
#pragma unroll
            for (int n2 = 0; n2 < kTcKeys / 16; ++n2)
              wmma::store_matrix_sync(so + n2 * 16, sc[n2], L::LDS, wmma::mem_row_major);
          }
          __syncwarp();

          // Softmax of row r over keys 2 * jj + hf (both lanes of a row keep the same state).
          const float* srow = so + r * L::LDS;
          // Visible columns of this row: [vlo, vhi] (keys row_lo..row_hi).
          const int vlo = max(row_lo_v - key0, 0), vhi = min(row_hi_v - key0, kTcKeys - 1);
          float bmax = kNegInf;
#pragma unroll 8
          for (int jj = 0; jj < kTcKeys / 2; ++jj) {
            const int j = 2 * jj + hf;
            if (j >= vlo && j <= vhi) bmax = fmaxf(bmax, srow[j]);
          }
          bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 1));
          float m_new = m_run, corr = 1.f;
          if (bmax != kNegInf && (m_run == kNegInf || bmax > m_run + kLazyMax)) {
            m_new = bmax;
            corr = m_run == kNegInf ? 0.f : expf(m_run - m_new);
          }
          const bool rescale = m_run != kNegInf && m_new != m_run;
          float sum = 0.f;
          uint16_t* prow = ps + r * L::LDP;
#pragma unroll 8
          for (int jj = 0; jj < kTcKeys / 2; ++jj) {
            const int j = 2 * jj + hf;
            uint16_t pbits = 0;
            if (bmax != kNegInf && j >= vlo && j <= vhi) {
              pbits = TcType<W>::bits(expf(srow[j] - m_new));
              sum = __fadd_rn(sum, TcType<W>::value(pbits));
            }
            prow[j] = pbits;
          }
          sum = __fadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, 1));
          l_run = __fadd_rn(__fmul_rn(l_run, corr), sum);
          m_run = m_new;
          if (__any_sync(0xffffffffu, rescale)) {  // the output through shared memory, 64 columns at a time
#pragma unroll
            for (int ch = 0; ch < D / 64; ++ch) {
              __syncwarp();
#pragma unroll
              for (int n2 = 0; n2 < 4; ++n2)
                wmma::store_matrix_sync(so + n2 * 16, o[ch * 4 + n2], L::LDS, wmma::mem_row_major);
              __syncwarp();
              float* orow = so + r * L::LDS;
#pragma unroll 8
              for (int jj = 0; jj < 32; ++jj) orow[2 * jj + hf] = __fmul_rn(orow[2 * jj + hf], corr);
              __syncwarp();
#pragma unroll
              for (int n2 = 0; n2 < 4; ++n2)
                wmma::load_matrix_sync(o[ch * 4 + n2], so + n2 * 16, L::LDS, wmma::mem_row_major);
            }
          }
          __syncwarp();

          // O += P . V
#pragma unroll
          for (int k = 0; k < kTcKeys / 16; ++k) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
            wmma::load_matrix_sync(a, reinterpret_cast<const E*>(ps) + k * 16, L::LDP);
#pragma unroll
            for (int n2 = 0; n2 < KF; ++n2) {
              wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> b;
              wmma::load_matrix_sync(b, reinterpret_cast<const E*>(vd) + k * 16 * L::LDV + n2 * 16, L::LDV);
              wmma::mma_sync(o[n2], a, b, o[n2]);
            }
          }
          __syncthreads();  // both tiles' buffers are reused
        }
      }

      // The split's output, 64 columns at a time through the warp's staging area.
      const bool last = sp == sp_end;
      const MergeFactors mf = merge_factors(run_m, m_run);
      float new_m = run_m, new_l = run_l;
      merge_stats(mf, new_m, new_l, m_run, l_run);
#pragma unroll
      for (int ch = 0; ch < D / 64; ++ch) {
        __syncwarp();
#pragma unroll
        for (int n2 = 0; n2 < 4; ++n2)
          wmma::store_matrix_sync(so + n2 * 16, o[ch * 4 + n2], L::LDS, wmma::mem_row_major);
        __syncwarp();
        if (row_valid) {
          const float* orow = so + r * L::LDS;
          if (pl.split) {
            float* rec = part_record(p, s, pl, n, sp, my_tok, my_h);
#pragma unroll 4
            for (int jj = 0; jj < 32; ++jj) rec[ch * 64 + 2 * jj + hf] = orow[2 * jj + hf];
            if (ch == 0 && hf == 0) {
              rec[p.rec - 2] = m_run;
              rec[p.rec - 1] = l_run;
            }
          } else {
            float* out = p.out + ((int64_t(start) + my_tok) * p.heads + my_h) * D + ch * 64;
#pragma unroll 4
            for (int jj = 0; jj < 32; ++jj) {
              const int c = 2 * jj + hf;
              const float racc = merge_value(mf, run_m == kNegInf ? 0.f : out[c], orow[c]);
              if (last) out[c] = normalize(racc, new_l);
              else if (new_m != kNegInf) out[c] = racc;
            }
          }
        }
      }
      run_m = new_m;
      run_l = new_l;
    }
  }
#endif
}

}  // namespace corral::cuda::attn
