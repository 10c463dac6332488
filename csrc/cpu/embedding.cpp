#include <string>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {
template <class T>
void gather_rows(float* out, const T* table, int64_t dim, const int32_t* ids, int64_t tokens) {
  parallel_for(tokens, dim, [&](int64_t t) {
    const T* row = table + int64_t(ids[t]) * dim;
    for (int64_t i = 0; i < dim; ++i) out[t * dim + i] = to_float_unaligned(row + i);
  });
}
}  // namespace

void embedding(float* out, const void* table, DType dtype, int64_t vocab, int64_t dim,
               const int32_t* ids, int64_t tokens) {
  for (int64_t t = 0; t < tokens; ++t)
    if (ids[t] < 0 || ids[t] >= vocab)
      throw InvalidInputError("token id " + std::to_string(ids[t]) + " at index " +
                              std::to_string(t) + " is outside the vocabulary [0, " +
                              std::to_string(vocab) + ")");
  switch (float_index(dtype, "embedding table")) {
    case 0: return gather_rows(out, static_cast<const float*>(table), dim, ids, tokens);
    case 1: return gather_rows(out, static_cast<const bf16*>(table), dim, ids, tokens);
    default: return gather_rows(out, static_cast<const f16*>(table), dim, ids, tokens);
  }
}

}  // namespace corral::cpu
