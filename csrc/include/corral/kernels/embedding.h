// Token embedding lookup.
#pragma once

#include "corral/kernels/types.h"

namespace corral::kernels {

// out[t, :] = float(table[ids[t], :]) for t < tokens; table is [vocab, dim] of `dtype`.
// CPU: throws InvalidInputError for an id outside [0, vocab). CUDA (ids in device memory, read
// without a synchronization): such a token gets a row of zeros; callers check ids beforehand.
void embedding(const Stream& stream, float* out, const void* table, DType dtype, int64_t vocab,
               int64_t dim, const int32_t* ids, int64_t tokens);

}  // namespace corral::kernels
