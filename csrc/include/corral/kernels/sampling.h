// Choosing the next token from logits.
#pragma once

#include "corral/kernels/types.h"

namespace corral {

// How one row is drawn (transformers' warpers, in their order): logits / temperature, then only
// the top_k most likely tokens (0: all), then the fewest most likely whose probability reaches
// top_p (1: all; renormalized after top-k), then those at least min_p times as likely as the most
// likely (0: all). A temperature of 0 is greedy: argmax, the rest ignored.
struct SamplerRow {
  float temperature = 0.f;
  int32_t top_k = 0;
  float top_p = 1.f;
  float min_p = 0.f;
};

// Penalties per row of apply_penalties().
struct PenaltyRow {
  float repetition = 1.f;
  float presence = 0.f;
  float frequency = 0.f;
};

namespace kernels {

// out[r] = index of the largest logits[r, :] (the lowest index among equal maxima).
void argmax(const Stream& stream, int32_t* out, const float* logits, int64_t rows, int64_t vocab);

// out[r] = the token the uniform number uniform[r] in [0, 1) picks by inverse CDF over the kept
// tokens of row r, walked from the most likely down (ties: lower id first) when top-k or top-p
// truncate, else in id order. Sums are float64; -inf logits are never drawn.
void sample(const Stream& stream, int32_t* out, const float* logits, int64_t rows, int64_t vocab,
            const SamplerRow* settings, const float* uniform);

// Penalties on generated text (vLLM's semantics), in place. Row r's entries
// [offsets[r], offsets[r + 1]) name distinct tokens of its prompt or output, output_counts[e] how
// often token_ids[e] is in the output. Every entry's logit is divided by `repetition` if positive,
// else multiplied by it; entries in the output then lose `presence` and `frequency` times their count.
void apply_penalties(const Stream& stream, float* logits, int64_t rows, int64_t vocab, const int64_t* offsets,
                     const int32_t* token_ids, const int32_t* output_counts, const PenaltyRow* penalties);

// Token masks (a grammar's allowed tokens, min_tokens' bans), in place: for i < count, row rows[i]
// of logits [*, vocab] keeps the tokens whose bit is set in mask[i] (bit t % 32 of word t / 32,
// ceil(vocab / 32) words per mask) and the others become -inf. The rows are distinct.
void apply_token_mask(const Stream& stream, float* logits, int64_t vocab, int64_t count, const int32_t* rows,
                      const uint32_t* mask);

// Log-probabilities of row r of log_softmax(logits): the chosen token's, chosen_logprob[r], and
// the top_n largest, top_ids[r, :top_n] / top_logprobs[r, :top_n] in descending order (ties:
// lower id first). Computed in float64, stored as float32. top_n in [0, vocab] (InvalidInputError
// otherwise); on CUDA at most kMaxDeviceLogprobs (NotSupportedError beyond).
constexpr int64_t kMaxDeviceLogprobs = 64;
void logprobs(const Stream& stream, const float* logits, int64_t rows, int64_t vocab, const int32_t* chosen,
              float* chosen_logprob, int64_t top_n, int32_t* top_ids, float* top_logprobs);

}  // namespace kernels
}  // namespace corral
