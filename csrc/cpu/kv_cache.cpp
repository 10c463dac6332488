#include <cstring>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {

template <class T>
void write_rows(const PagedKv& c, const float* k, const float* v, int64_t ld, int64_t tokens,
                const int64_t* slots) {
  const int64_t d = c.head_dim, bs = c.block_size;
  parallel_for(tokens, 2 * c.kv_heads * d, [&](int64_t t) {
    const int64_t block = slots[t] / bs, off = slots[t] % bs;
    for (int64_t g = 0; g < c.kv_heads; ++g) {
      const int64_t at = block * c.block_stride + ((g * bs + off) * d) * int64_t(sizeof(T));
      T* kd = reinterpret_cast<T*>(static_cast<char*>(c.k) + at);
      T* vd = reinterpret_cast<T*>(static_cast<char*>(c.v) + at);
      for (int64_t i = 0; i < d; ++i) {
        kd[i] = from_float<T>(k[t * ld + g * d + i]);
        vd[i] = from_float<T>(v[t * ld + g * d + i]);
      }
    }
  });
}

}  // namespace

void kv_cache_write(const PagedKv& cache, const float* k, const float* v, int64_t ld, int64_t tokens,
                    const int64_t* slots) {
  switch (float_index(cache.dtype, "KV cache")) {
    case 0: return write_rows<float>(cache, k, v, ld, tokens, slots);
    case 1: return write_rows<bf16>(cache, k, v, ld, tokens, slots);
    default: return write_rows<f16>(cache, k, v, ld, tokens, slots);
  }
}

void kv_cache_copy_pages(void* pool, int64_t page_bytes, const int32_t* src, const int32_t* dst, int64_t count) {
  char* base = static_cast<char*>(pool);
  parallel_for(count, page_bytes / 4, [&](int64_t i) {
    std::memcpy(base + int64_t(dst[i]) * page_bytes, base + int64_t(src[i]) * page_bytes, size_t(page_bytes));
  });
}

}  // namespace corral::cpu
