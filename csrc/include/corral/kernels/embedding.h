// Token embedding lookup.
#pragma once

#include "corral/kernels/types.h"

namespace corral::kernels {

// out[t, :] = float(table[ids[t], :]) for t < tokens; table is [vocab, dim] of `dtype`.
// Throws InvalidInputError for an id outside [0, vocab).
void embedding(const Stream& stream, float* out, const void* table, DType dtype, int64_t vocab,
               int64_t dim, const int32_t* ids, int64_t tokens);

}  // namespace corral::kernels
