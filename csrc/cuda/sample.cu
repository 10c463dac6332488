// sample on CUDA (contract: corral/kernels/sampling.h), making csrc/cpu/sampling.cpp's decisions:
// one block per row (grid-stride), the row's weights w = exp(double(l - max) / T) computed as the
// CPU does (the float32 difference, the float64 product and exp; CUDA's exp may differ from the C
// library's in the last bit).
//
// Without truncation the walk goes in id order: each thread sums a contiguous chunk, a block scan
// gives each chunk the sum before it, and the warp of the first chunk whose end passes the target
// walks it again. With truncation the walk goes down the CPU's order (token_order.cuh's keys):
// - the top min(top_k, kListCap) tokens are found by a radix select on the keys, gathered into
//   shared memory and sorted; top-p and the walk scan that list (as above, over list positions)
//   when the tokens they keep are in it;
// - else (top_k over kListCap, or top-p's cut below the list) they are searches over keys, the
//   slow path: each pass sums the weights at or above kProbes keys over the whole row
//   (largest_reaching).
//
// The token is the CPU's for the same uniform number except where float64 sums of the same weights
// in different orders (the CPU sums in order; here chunks and tree reductions) fall on different
// sides of a cut or of u * total, or where exp's last bit does: cases of measure zero, not seen
// with random data. (u = 1, outside the contract, is not one: u * total is then the total itself,
// which the walk reaches or not by rounding alone.) NaN follows the CPU where its order is
// defined: a NaN weight is walked and stops every later cut being passed (the walk then ends on
// the last token walked), and a NaN top-p mass keeps one token. With truncation a NaN logit has no
// place in the CPU's order (its comparisons are not a strict weak order); here it ranks below -inf.
#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <string>

#include "block_reduce.cuh"
#include "check.h"
#include "corral/error.h"
#include "launch.cuh"
#include "ops.h"
#include "token_order.cuh"

namespace corral::cuda {

namespace {

constexpr int kThreads = 512;   // leaves each thread registers for kProbes float64 sums
constexpr int kListCap = 4096;  // tokens sorted in shared memory (32 KiB of keys)
constexpr int kProbes = 16;     // keys a pass of largest_reaching sums at
constexpr u64 kNoKey = ~0ull;   // above every token's key (+inf's value bits are 0xff800000)
// Positions and ids are ints, with room for a stride past the last.
constexpr int64_t kMaxVocab = int64_t(1) << 30;

struct Shared {
  u64 list[kListCap];  // the top tokens' keys, most likely first
  union {
    double d[kMaxWarps];
    u64 u[kMaxWarps];
    int i[kMaxWarps];
    Best best[kMaxWarps];
  } red;  // block_reduce's and block_exclusive_scan's scratch
  double probe[kMaxWarps * kProbes];
  double probe_total[kProbes];
  int hist[256];  // top_threshold's digit counts
  int digit, digit_above, digit_count;
  int count;  // gather_sorted's next slot
  int found;  // first_reached's position
  double found_acc;
};

// A row's weights as the CPU computes them: the most likely token weighs 1.
struct Weights {
  float top;     // the row's largest logit
  double inv_t;  // 1 / temperature
  __device__ double operator()(float v) const { return exp(__dmul_rn(double(__fsub_rn(v, top)), inv_t)); }
};

// The walk's rules: a token counts towards the total when w >= min_w and is walked unless w < min_w
// or w == 0, so a NaN weight is walked but not counted; the walk stops where its running sum passes
// u * total. The CPU tests that only at walked tokens, where the sum is positive (or NaN), so a
// negative target (u < 0, outside the contract) acts as 0 here, where every position is tested.
struct Draw {
  double min_w;
  float u;
  __device__ bool counted(double w) const { return w >= min_w; }
  __device__ bool walked(double w) const { return !(w < min_w) && w != 0.0; }
  __device__ double target(double total) const {
    const double t = __dmul_rn(double(u), total);
    return t < 0.0 ? 0.0 : t;
  }
};

// ---- walks over positions 0, 1, ... ----------------------------------------------------------

// What a walk adds at a position, and what the total it aims at counts there.
struct Terms {
  double walk, total;
};

struct Reached {
  int first;   // the first position whose running sum reaches, -1 if none
  double acc;  // the running sum there
  int last;    // the last position with a nonzero walk term, -1 if none
};

// The first position p in [0, n) at which reaches(acc_p, total) holds, where acc_p sums terms_at(q).walk
// over q <= p and total sums terms_at(q).total over [0, n), both in float64. `reaches` must hold at
// every position after one where it holds (acc only grows, or turns NaN for good). Each thread sums
// a contiguous chunk in order; acc_p = (the chunks before, block-scanned) + (the chunk up to p).
template <class TermsAt, class Reaches>
__device__ Reached first_reached(int n, TermsAt terms_at, Reaches reaches, Shared& sh) {
  const int64_t chunk = (int64_t(n) + blockDim.x - 1) / blockDim.x;
  const auto at_most_n = [&](int64_t p) { return int(p < n ? p : n); };
  const int begin = at_most_n(threadIdx.x * chunk), end = at_most_n(begin + chunk);
  double run = 0.0, total = 0.0;
  int last = -1;
  for (int p = begin; p < end; ++p) {
    const Terms t = terms_at(p);
    run = __dadd_rn(run, t.walk);
    total = __dadd_rn(total, t.total);
    if (t.walk != 0.0) last = p;
  }
  total = block_reduce(total, sh.red.d, SumD{});
  if (threadIdx.x == 0) sh.found = -1;  // every thread is past the last call's read (block_reduce synced)
  last = block_reduce(last, sh.red.i, Max{});
  const double before = block_exclusive_scan(run, 0.0, sh.red.d, SumD{});
  const bool hit = begin < end && reaches(__dadd_rn(before, run), total);
  const int first_thread = block_reduce(hit ? int(threadIdx.x) : INT_MAX, sh.red.i, Min{});
  if (first_thread == INT_MAX) return Reached{-1, 0.0, last};
  // That thread's warp walks its chunk again: the lanes compute the terms, and every lane adds them
  // in order, so the running sum is the first pass's, bit for bit, and its end reaches.
  if (threadIdx.x / 32 == unsigned(first_thread) / 32) {
    const int lane = threadIdx.x % 32;
    const double base = __shfl_sync(0xffffffffu, before, first_thread % 32);
    const int b = at_most_n(first_thread * chunk), e = at_most_n(b + chunk);
    double acc = 0.0;
    for (int p0 = b; p0 < e; p0 += 32) {
      const double x = p0 + lane < e ? terms_at(p0 + lane).walk : 0.0;
      const int count = min(32, e - p0);
      int j = 0;
      for (; j < count; ++j) {  // the same j in every lane
        acc = __dadd_rn(acc, __shfl_sync(0xffffffffu, x, j));
        if (reaches(__dadd_rn(base, acc), total)) break;
      }
      if (j < count) {
        if (lane == 0) {
          sh.found = p0 + j;
          sh.found_acc = __dadd_rn(base, acc);
        }
        break;
      }
    }
  }
  __syncthreads();
  return Reached{sh.found, sh.found_acc, last};
}

// The token of the positions [0, n) that the walk picks: the first whose running sum of walked
// weights passes u * total (total: the counted weights); else, as the CPU's loop ends without a
// break (a NaN passed first, or u >= 1), the last token walked, else the argmax.
template <class ValueAt, class IdAt>
__device__ int walk(int n, ValueAt value_at, IdAt id_at, const Weights& wt, const Draw& d, int best, Shared& sh) {
  const Reached r = first_reached(
      n,
      [&](int p) {
        const double w = wt(value_at(p));
        return Terms{d.walked(w) ? w : 0.0, d.counted(w) ? w : 0.0};
      },
      [&](double acc, double total) { return acc > d.target(total) || isnan(acc); }, sh);
  if (r.first >= 0 && !isnan(r.acc)) return id_at(r.first);
  return r.last >= 0 ? id_at(r.last) : best;
}

// ---- the top tokens in shared memory -----------------------------------------------------------

// Warp 0: the digit (of `hist`, counts by digit) holding the need-th largest key, counting from
// digit 255 down; lane j looks at digits 255 - 8j - [0, 8).
__device__ void pick_digit(int need, Shared& sh) {
  const int lane = threadIdx.x;
  int c[8], sum = 0;
#pragma unroll
  for (int q = 0; q < 8; ++q) sum += c[q] = sh.hist[255 - 8 * lane - q];
  int incl = sum;
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += y;
  }
  int above = incl - sum;
  if (above < need && need <= incl) {  // exactly one lane
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if (above + c[q] >= need) {
        sh.digit = 255 - 8 * lane - q;
        sh.digit_above = above;
        sh.digit_count = c[q];
        break;
      }
      above += c[q];
    }
  }
}

// A key t such that exactly m of the row's tokens have keys >= t (1 <= m): a radix select over the
// keys, 8 bits a pass from the top, with exact counts (shared-memory atomics); it stops once every
// token under the digits chosen is taken, the bits below them left 0.
__device__ u64 top_threshold(const float* l, int vocab, int m, Shared& sh) {
  if (m >= vocab) return 0;
  u64 prefix = 0;  // the digits chosen so far
  int need = m;    // how many tokens under `prefix` are still to take
  for (int shift = 56;; shift -= 8) {
    const u64 chosen = shift == 56 ? 0 : ~0ull << (shift + 8);
    __syncthreads();  // the last pass's readers of hist and digit are done
    for (int d = threadIdx.x; d < 256; d += blockDim.x) sh.hist[d] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const u64 key = rank_key(l[i], i);
      if ((key & chosen) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) pick_digit(need, sh);
    __syncthreads();
    prefix |= u64(sh.digit) << shift;
    need -= sh.digit_above;
    if (sh.digit_count == need || shift == 0) return prefix;
  }
}

// Puts the m tokens with keys >= lo (m <= kListCap) in sh.list, most likely first: gathered in any
// order, then a bitonic sort (the keys are distinct, so the result does not depend on that order).
__device__ void gather_sorted(const float* l, int vocab, u64 lo, int m, Shared& sh) {
  int n = 1;
  while (n < m) n <<= 1;
  __syncthreads();  // earlier readers of the list and of count are done
  if (threadIdx.x == 0) sh.count = 0;
  for (int p = m + threadIdx.x; p < n; p += blockDim.x) sh.list[p] = 0;  // padding, below every token
  __syncthreads();
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const u64 key = rank_key(l[i], i);
    if (key >= lo) sh.list[atomicAdd(&sh.count, 1)] = key;
  }
  __syncthreads();
  for (int size = 2; size <= n; size <<= 1)
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const int a = 2 * i - (i & (stride - 1)), b = a + stride;  // a's bit `stride` is 0
        const u64 x = sh.list[a], y = sh.list[b];
        if ((x < y) == ((a & size) == 0)) {  // descending where bit `size` of a is 0
          sh.list[a] = y;
          sh.list[b] = x;
        }
      }
      __syncthreads();
    }
}

// ---- searches over the whole row -----------------------------------------------------------

struct Found {
  bool ok;     // whether `reaches` holds anywhere
  u64 key;     // the largest key where it holds (lo when nowhere)
  double sum;  // the sum there
};

// The largest key t in [lo, hi] at which reaches(S(t)) holds, S(t) being the float64 sum of
// weight(w) over the tokens with keys in [t, hi]; `reaches` must hold at every key below one where
// it holds (S only grows as t falls; a NaN must count as reaching). Each pass sums S at kProbes keys
// spread over [lo, hi] and keeps the stretch from the last that reaches to the next: the sum above
// the stretch is carried, so later passes compute weights only inside it. Sums at one key made in
// different passes may round apart, so t need not be a token's key.
template <class Weight, class Reaches>
__device__ Found largest_reaching(const float* l, int vocab, u64 lo, u64 hi, Weight weight, Reaches reaches,
                                  const Weights& wt, Shared& sh) {
  Found found{false, lo, 0.0};
  double above = 0.0;  // the sum over the keys above hi
  for (;;) {
    const u64 step = (hi - lo) / kProbes + 1;  // probe j is lo + j * step, if <= hi
    double part[kProbes];
#pragma unroll
    for (int j = 0; j < kProbes; ++j) part[j] = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = l[i];
      const u64 key = rank_key(v, i);
      if (key < lo || key > hi) continue;
      const double x = weight(wt(v));
      u64 at = 0;
#pragma unroll
      for (int j = 0; j < kProbes; ++j, at += step)
        if (key - lo >= at) part[j] = __dadd_rn(part[j], x);
    }
    block_reduce_each(part, sh.probe, sh.probe_total, SumD{});
    // The last probe that reaches (lo's own verdict stands from the pass that chose it) and the
    // partial sum at the probe after it.
    int last = found.ok ? 0 : -1;
    double last_sum = 0.0, next = 0.0;
    u64 at = 0;
#pragma unroll
    for (int j = 0; j < kProbes; ++j, at += step) {
      const double s = __dadd_rn(above, part[j]);
      if (at <= hi - lo && (j > 0 || !found.ok) && reaches(s)) {
        last = j;
        last_sum = s;
      } else if (last == j - 1) {
        next = part[j];
      }
    }
    if (last < 0) return found;
    const u64 last_at = u64(last) * step;
    if (last > 0 || !found.ok) found = Found{true, lo + last_at, last_sum};
    if (last + 1 < kProbes && last_at + step <= hi - lo) {  // the next probe bounds the stretch
      above = __dadd_rn(above, next);
      hi = lo + last_at + step - 1;
    }
    lo += last_at;
    if (lo == hi) return found;
  }
}

// The float64 sum of term(w) over the tokens with keys >= lo.
template <class Term>
__device__ double sum_from(const float* l, int vocab, u64 lo, Term term, const Weights& wt, Shared& sh) {
  double s = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = l[i];
    if (rank_key(v, i) >= lo) s = __dadd_rn(s, term(wt(v)));
  }
  return block_reduce(s, sh.red.d, SumD{});
}

// The lowest key >= lo of a walked token (kNoKey if none): where a walk down to lo ends.
__device__ u64 lowest_walked(const float* l, int vocab, u64 lo, const Weights& wt, const Draw& d, Shared& sh) {
  u64 low = kNoKey;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = l[i];
    const u64 key = rank_key(v, i);
    if (key >= lo && key < low && d.walked(wt(v))) low = key;
  }
  return block_reduce(low, sh.red.u, Min{});
}

// The walk down the tokens with keys in [lo, top] when they are too many for the list.
__device__ int walk_row(const float* l, int vocab, u64 lo, u64 top, const Weights& wt, const Draw& d, int best,
                        Shared& sh) {
  const double target = d.target(sum_from(l, vocab, lo, [&](double w) { return d.counted(w) ? w : 0.0; }, wt, sh));
  const Found f = largest_reaching(
      l, vocab, lo, top, [&](double w) { return d.walked(w) ? w : 0.0; },
      [&](double acc) { return acc > target || isnan(acc); }, wt, sh);
  // The token found is the walked one at or above its key; else the walk ends on the last walked.
  const u64 key = lowest_walked(l, vocab, f.ok && !isnan(f.sum) ? f.key : lo, wt, d, sh);
  return key == kNoKey ? best : int(key_id(key));
}

// ---- one row ---------------------------------------------------------------------------------

// A row with top-k (k < vocab) or top-p (top_p < 1); top is the key of the argmax `best`.
__device__ int sample_truncated(const float* l, int vocab, int k, float top_p, u64 top, const Weights& wt,
                                const Draw& d, int best, Shared& sh) {
  const int m = min(k, kListCap);
  gather_sorted(l, vocab, top_threshold(l, vocab, m, sh), m, sh);
  const auto value_at = [&](int p) { return key_value(sh.list[p]); };
  const auto id_at = [&](int p) { return int(key_id(sh.list[p])); };
  // top-p: the fewest tokens whose cumulative weight is not below top_p * mass (a NaN mass: one).
  const auto top_p_cut = [&](double mass, double cum) { return !(cum < __dmul_rn(double(top_p), mass)); };
  if (k == m) {  // the list is the top-k tokens
    int kept = k;
    if (top_p < 1.f) {
      const Reached r = first_reached(
          k,
          [&](int p) {
            const double w = wt(value_at(p));
            return Terms{w, w};
          },
          [&](double cum, double mass) { return top_p_cut(mass, cum); }, sh);
      if (r.first >= 0) kept = r.first + 1;
    }
    return walk(kept, value_at, id_at, wt, d, best, sh);
  }
  const u64 k_lo = top_threshold(l, vocab, k, sh);
  u64 kept_lo = k_lo;
  if (top_p < 1.f) {
    const double mass = sum_from(l, vocab, k_lo, [](double w) { return w; }, wt, sh);
    const Reached r = first_reached(
        m, [&](int p) { return Terms{wt(value_at(p)), 0.0}; },
        [&](double cum, double) { return top_p_cut(mass, cum); }, sh);
    if (r.first >= 0) return walk(r.first + 1, value_at, id_at, wt, d, best, sh);
    kept_lo = largest_reaching(
                  l, vocab, k_lo, top, [](double w) { return w; },
                  [&](double cum) { return top_p_cut(mass, cum); }, wt, sh)
                  .key;
  }
  return walk_row(l, vocab, kept_lo, top, wt, d, best, sh);
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(int32_t* out, const float* logits, int64_t rows, int vocab, const SamplerRow* settings,
                  const float* uniform) {
  __shared__ Shared sh;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* l = logits + r * vocab;
    const int best = int(block_argmax(l, vocab, sh.red.best));
    const SamplerRow s = settings[r];
    int pick = best;
    if (!(s.temperature <= 0.f) && isfinite(l[best])) {  // else greedy, as on the CPU
      const Weights wt{l[best], __ddiv_rn(1.0, double(s.temperature))};
      const Draw d{double(s.min_p), uniform[r]};
      const int k = s.top_k > 0 ? min(s.top_k, vocab) : vocab;
      if (k < vocab || s.top_p < 1.f)
        pick = sample_truncated(l, vocab, k, s.top_p, rank_key(l[best], best), wt, d, best, sh);
      else
        pick = walk(vocab, [&](int p) { return l[p]; }, [](int p) { return p; }, wt, d, best, sh);
    }
    if (threadIdx.x == 0) out[r] = pick;
  }
}

}  // namespace

void sample(void* stream, int32_t* out, const float* logits, int64_t rows, int64_t vocab, const SamplerRow* settings,
            const float* uniform) {
  if (rows <= 0) return;
  if (vocab < 1 || vocab > kMaxVocab)
    throw InvalidInputError("sample: vocab " + std::to_string(vocab) + " is not in [1, 2^30]");
  if (!out || !logits || !settings || !uniform) throw InvalidInputError("sample: a pointer is null");
  sample_kernel<<<blocks_for(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(out, logits, rows, int(vocab),
                                                                                     settings, uniform);
  CORRAL_CUDA_CHECK_LAUNCH();
}

}  // namespace corral::cuda
