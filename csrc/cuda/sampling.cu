// argmax, apply_penalties, apply_token_mask and logprobs on CUDA (contract: corral/kernels/sampling.h; CPU code:
// csrc/cpu/sampling.cpp); sample is in sample.cu. argmax gives the CPU's answer for every row
// (token_order.cuh's block_argmax).
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

// A block per row (grid-stride).
__global__ void argmax_kernel(int32_t* out, const float* logits, int64_t rows, int64_t vocab) {
  __shared__ Best scratch[kMaxWarps];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t best = block_argmax(logits + r * vocab, vocab, scratch);
    if (threadIdx.x == 0) out[r] = int32_t(best);
  }
}

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

// ---- apply_token_mask --------------------------------------------------------------------------
// A block per masked row (grid-stride), its threads over the row's tokens.
__global__ void apply_token_mask_kernel(float* logits, int64_t vocab, int64_t count, const int32_t* rows,
                                        const uint32_t* mask) {
  const int64_t words = (vocab + 31) / 32;
  for (int64_t i = blockIdx.x; i < count; i += gridDim.x) {
    float* l = logits + int64_t(rows[i]) * vocab;
    const uint32_t* m = mask + i * words;
    for (int64_t t = threadIdx.x; t < vocab; t += blockDim.x)
      if (!((m[t >> 5] >> (t & 31)) & 1u)) l[t] = -INFINITY;
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

// The best key of this thread's slice below `limit` (0: none).
__device__ __forceinline__ u64 best_below(const float* l, int64_t vocab, u64 limit) {
  u64 best = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const u64 k = rank_key(l[i], i);
    if (k < limit && k > best) best = k;
  }
  return best;
}

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
      const unsigned long long w = block_reduce(cand, uscratch, Max{});
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

void apply_token_mask(void* stream, float* logits, int64_t vocab, int64_t count, const int32_t* rows,
                      const uint32_t* mask) {
  if (count <= 0 || vocab <= 0) return;
  if (!logits || !rows || !mask) throw InvalidInputError("apply_token_mask: a pointer is null");
  apply_token_mask_kernel<<<blocks_for(count), 256, 0, static_cast<cudaStream_t>(stream)>>>(logits, vocab, count,
                                                                                          rows, mask);
  CORRAL_CUDA_CHECK_LAUNCH();
}

void logprobs(void* stream, const float* logits, int64_t rows, int64_t vocab, const int32_t* chosen,
              float* chosen_logprob, int64_t top_n, int32_t* top_ids, float* top_logprobs) {
  if (rows <= 0) return;
  if (top_n > kernels::kMaxDeviceLogprobs)
    throw NotSupportedError("logprobs: top_n " + std::to_string(top_n) + " is over the CUDA kernel's limit of " +
                            std::to_string(kernels::kMaxDeviceLogprobs));
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
