// argmax, apply_penalties and logprobs on CUDA (contract: corral/kernels/sampling.h; CPU code:
// csrc/cpu/sampling.cpp). argmax gives the CPU's answer for every row: the lowest index among equal maxima; a NaN never wins over a number (NaN > x is
// false), and a NaN at index 0 wins the row, since the CPU's scan starts from index 0 and nothing
// compares greater than NaN. A row of -inf (or of NaN) gives 0, and so does every row of an
// empty vocabulary (nothing read).
#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <string>

#include "check.h"
#include "corral/error.h"
#include "launch.cuh"
#include "ops.h"

namespace corral::cuda {

namespace {

// A candidate: index -1 is none (every value seen was NaN).
struct Best {
  float v;
  int64_t i;
};

// Whether candidate a beats b: a number over none, a larger value, or an equal one at a lower index.
__device__ __forceinline__ bool beats(const Best& a, const Best& b) {
  if (a.i < 0) return false;
  if (b.i < 0) return true;
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

__device__ __forceinline__ Best warp_best(Best b) {
  for (int off = 16; off > 0; off >>= 1) {
    const Best o{__shfl_xor_sync(0xffffffffu, b.v, off), __shfl_xor_sync(0xffffffffu, b.i, off)};
    if (beats(o, b)) b = o;
  }
  return b;
}

// A block per row (grid-stride): each thread scans a strided slice, then warps and blocks reduce.
__global__ void argmax_kernel(int32_t* out, const float* logits, int64_t rows, int64_t vocab) {
  __shared__ Best partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = int(blockDim.x / 32);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* l = logits + r * vocab;
    Best b{0.f, -1};
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = l[i];
      if (v == v && (b.i < 0 || v > b.v)) b = Best{v, i};  // strided scan: later i only wins if larger
    }
    b = warp_best(b);
    __syncthreads();  // the previous row's readers are done with `partial`
    if (lane == 0) partial[warp] = b;
    __syncthreads();
    if (threadIdx.x == 0) {
      Best best = partial[0];
      for (int w = 1; w < warps; ++w)
        if (beats(partial[w], best)) best = partial[w];
      out[r] = best.i < 0 || isnan(l[0]) ? 0 : int32_t(best.i);
    }
  }
}

using u64 = unsigned long long;  // __shfl_xor_sync's 64-bit integer type

// ---- apply_penalties ---------------------------------------------------------------------------
// A block per row (grid-stride), its threads over the row's entries. The contract's entries name
// distinct tokens, so no two threads touch one logit; each logit gets the CPU's float32 steps in the
// CPU's order, each rounded once (_rn: no contraction), so the results are the CPU's bit for bit.
// A token id outside [0, vocab) cannot throw on the device: that entry is skipped (callers check ids
// on the host first, as the CPU's contract asks). Entries repeating a token within a row race here
// (the CPU applies them one after another); the contract rules them out.

__global__ void apply_penalties_kernel(float* logits, int64_t rows, int64_t vocab, const int64_t* offsets,
                                       const int32_t* token_ids, const int32_t* output_counts,
                                       const PenaltyRow* penalties) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t begin = offsets[r], end = offsets[r + 1];
    const PenaltyRow p = penalties[r];
    float* l = logits + r * vocab;
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
      const int32_t t = token_ids[e];
      if (t < 0 || t >= vocab) continue;
      float x = l[t];
      x = x > 0.f ? __fdiv_rn(x, p.repetition) : __fmul_rn(x, p.repetition);
      const int32_t c = output_counts[e];
      if (c > 0) {
        x = __fsub_rn(x, __fmul_rn(p.frequency, float(c)));
        x = __fsub_rn(x, p.presence);
      }
      l[t] = x;
    }
  }
}

// ---- logprobs ----------------------------------------------------------------------------------
// A block per row (grid-stride). log_softmax as the CPU computes it: the float maximum m (l[0] when
// that is NaN, else the largest number), the float64 sum of exp(double(l[i]) - m) (summed in another
// order than the CPU's, so the last bit of a float64 may differ, hardly ever the float32 result),
// log_total = log(sum) + m, and each log-probability float(double(l[i]) - log_total). A NaN or +inf
// logit, or a row of -inf, makes every log-probability of the row NaN, as on the CPU. A chosen id
// outside [0, vocab) (unchecked on the device) gets NaN.
// The top_n: top_n rounds of a block maximum over 64-bit keys (value order, then the lower id), each
// thread holding the best of its slice below the last pick, rescanning its slice only when its
// candidate was picked. NaN ranks below -inf (the CPU's order is unspecified for NaN).

// A key whose unsigned order is the CPU's order: larger value first, then lower id; -0 == +0, NaN last.
__device__ __forceinline__ u64 rank_key(float v, int64_t i) {
  uint32_t k = 0;  // NaN
  if (v == v) {
    const uint32_t b = __float_as_uint(v == 0.f ? 0.f : v);
    k = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  return (u64(k) << 32) | u64(0xffffffffu - uint32_t(i));
}

__device__ __forceinline__ int64_t key_id(u64 key) { return int64_t(0xffffffffu - uint32_t(key)); }

// The best key of this thread's slice below `limit` (0: none).
__device__ __forceinline__ u64 best_below(const float* l, int64_t vocab, u64 limit) {
  u64 best = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const u64 k = rank_key(l[i], i);
    if (k < limit && k > best) best = k;
  }
  return best;
}

// Block-wide reductions; every thread gets the result. `scratch` holds 32 entries.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, Op op) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = int(blockDim.x / 32);
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();  // earlier readers of `scratch` are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < warps; ++w) r = op(r, scratch[w]);
  return r;
}

struct MaxF {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }  // a NaN loses
};
struct SumD {
  __device__ double operator()(double a, double b) const { return __dadd_rn(a, b); }
};
struct MaxU64 {
  __device__ u64 operator()(u64 a, u64 b) const { return a > b ? a : b; }
};

__global__ void logprobs_kernel(const float* logits, int64_t rows, int64_t vocab, const int32_t* chosen,
                                float* chosen_logprob, int64_t top_n, int32_t* top_ids, float* top_logprobs) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  __shared__ unsigned long long uscratch[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* l = logits + r * vocab;
    float m = -INFINITY;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, l[i]);
    m = block_reduce(m, fscratch, MaxF{});
    if (isnan(l[0])) m = l[0];
    const double dm = double(m);
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) s = __dadd_rn(s, exp(__dsub_rn(double(l[i]), dm)));
    s = block_reduce(s, dscratch, SumD{});
    const double log_total = __dadd_rn(log(s), dm);
    if (threadIdx.x == 0) {
      const int32_t c = chosen[r];
      chosen_logprob[r] = c >= 0 && c < vocab ? float(__dsub_rn(double(l[c]), log_total)) : __int_as_float(0x7fc00000);
    }
    if (top_n <= 0) continue;
    unsigned long long cand = best_below(l, vocab, ~0ull);
    for (int64_t k = 0; k < top_n; ++k) {
      const unsigned long long w = block_reduce(cand, uscratch, MaxU64{});
      const int64_t id = key_id(w);
      if (threadIdx.x == 0) {
        top_ids[r * top_n + k] = int32_t(id);
        top_logprobs[r * top_n + k] = float(__dsub_rn(double(l[id]), log_total));
      }
      if (cand == w) cand = best_below(l, vocab, w);
    }
  }
}

}  // namespace

void argmax(void* stream, int32_t* out, const float* logits, int64_t rows, int64_t vocab) {
  if (rows <= 0) return;
  if (!out || (vocab > 0 && !logits)) throw InvalidInputError("argmax: a pointer is null");
  argmax_kernel<<<blocks_for(rows), threads_for_row(vocab), 0, static_cast<cudaStream_t>(stream)>>>(out, logits,
                                                                                                   rows, vocab);
  CORRAL_CUDA_CHECK_LAUNCH();
}


void apply_penalties(void* stream, float* logits, int64_t rows, int64_t vocab, const int64_t* offsets,
                     const int32_t* token_ids, const int32_t* output_counts, const PenaltyRow* penalties) {
  if (rows <= 0 || vocab <= 0) return;
  if (!logits || !offsets || !penalties) throw InvalidInputError("apply_penalties: a pointer is null");
  apply_penalties_kernel<<<blocks_for(rows), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      logits, rows, vocab, offsets, token_ids, output_counts, penalties);
  CORRAL_CUDA_CHECK_LAUNCH();
}

void logprobs(void* stream, const float* logits, int64_t rows, int64_t vocab, const int32_t* chosen,
              float* chosen_logprob, int64_t top_n, int32_t* top_ids, float* top_logprobs) {
  if (rows <= 0) return;
  if (top_n > kMaxLogprobsTopN)
    throw NotSupportedError("logprobs: top_n " + std::to_string(top_n) + " is over the CUDA kernel's limit of " +
                            std::to_string(kMaxLogprobsTopN));
  if (vocab <= 0 || vocab > INT32_MAX)
    throw InvalidInputError("logprobs: vocab " + std::to_string(vocab) + " is not in [1, 2^31)");
  if (top_n > vocab)
    throw InvalidInputError("logprobs: top_n " + std::to_string(top_n) + " is over the vocabulary's " +
                            std::to_string(vocab) + " tokens");
  if (!logits || !chosen || !chosen_logprob || (top_n > 0 && (!top_ids || !top_logprobs)))
    throw InvalidInputError("logprobs: a pointer is null");
  logprobs_kernel<<<blocks_for(rows), threads_for_row(vocab), 0, static_cast<cudaStream_t>(stream)>>>(
      logits, rows, vocab, chosen, chosen_logprob, top_n, top_ids, top_logprobs);
  CORRAL_CUDA_CHECK_LAUNCH();
}

}  // namespace corral::cuda
