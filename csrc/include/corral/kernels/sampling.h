// Choosing the next token from logits.
#pragma once

#include "corral/kernels/types.h"

namespace corral::kernels {

// out[r] = index of the largest logits[r, :] (the lowest index among equal maxima).
void argmax(const Stream& stream, int32_t* out, const float* logits, int64_t rows, int64_t vocab);

// out[r] = a draw from softmax(logits[r, :] / temperature[r]) by inverse CDF of the uniform
// number uniform[r] in [0, 1). A temperature of 0 gives argmax.
void sample_temperature(const Stream& stream, int32_t* out, const float* logits, int64_t rows,
                        int64_t vocab, const float* temperature, const float* uniform);

// Log-probabilities of row r of log_softmax(logits): the chosen token's, chosen_logprob[r], and
// the top_n largest, top_ids[r, :top_n] / top_logprobs[r, :top_n] in descending order (ties:
// lower id first). Computed in float64, stored as float32.
void logprobs(const Stream& stream, const float* logits, int64_t rows, int64_t vocab, const int32_t* chosen,
              float* chosen_logprob, int64_t top_n, int32_t* top_ids, float* top_logprobs);

}  // namespace corral::kernels
