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

}  // namespace corral::kernels
