#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

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
      const int64_t head = block * c.block_stride + g * bs * d * int64_t(sizeof(T));
      T* kd = reinterpret_cast<T*>(static_cast<char*>(c.k) + head) + off;      // [d, bs]: a column
      T* vd = reinterpret_cast<T*>(static_cast<char*>(c.v) + head) + off * d;  // [bs, d]: a row
      for (int64_t i = 0; i < d; ++i) {
        kd[i * bs] = from_float<T>(k[t * ld + g * d + i]);
        vd[i] = from_float<T>(v[t * ld + g * d + i]);
      }
    }
  });
}

// float8_e4m3: each (block, KV head) of K and of V has its own scale, so a block's tokens are
// quantized one after the other, in slot order; work items are (block, head, K or V).
constexpr float kFp8Max = 448.0f;

// amax / 448: the scale that stores a head vector whose largest magnitude is amax without
// clipping; never 0 (an all-zero first token must leave a scale later tokens can grow from).
float fp8_scale_for(const float* x, int64_t d) {
  float amax = 0.f;
  for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));  // NaN is skipped
  return std::max(std::min(amax, FLT_MAX) / kFp8Max, FLT_MIN);
}

// The smallest scale * 2^k (k >= 1) that is at least `need`: growing by powers of two keeps the
// re-quantization of a block's earlier tokens exact (bar fp8 subnormals).
float grown_scale(float scale, float need) {
  while (scale < need) scale *= 2.f;
  return scale;
}

void write_fp8(const PagedKv& c, const float* k, const float* v, int64_t ld, int64_t tokens,
               const int64_t* slots) {
  if (c.k_scale == nullptr || c.v_scale == nullptr)
    throw InvalidInputError("kv_cache_write: a float8_e4m3 KV cache needs k_scale and v_scale");
  const int64_t d = c.head_dim, bs = c.block_size, heads = c.kv_heads;
  // Tokens grouped by block, each block's in slot order (the contract's order already; stable, so
  // a slot written twice in one call keeps the later value).
  std::vector<int64_t> order(size_t(tokens), 0);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return slots[a] < slots[b]; });
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < tokens; ++i)
    if (i == 0 || slots[order[i]] / bs != slots[order[i - 1]] / bs) starts.push_back(i);
  const int64_t segments = int64_t(starts.size());
  starts.push_back(tokens);
  if (segments == 0) return;
  parallel_for(segments * heads * 2, std::max<int64_t>(1, tokens / segments) * d, [&](int64_t item) {
    const int64_t seg = item / (2 * heads), g = (item / 2) % heads;
    const bool is_v = item % 2 == 1;
    const int64_t block = slots[order[starts[seg]]] / bs;
    const int64_t at = block * c.block_stride;
    fp8_e4m3* dst = reinterpret_cast<fp8_e4m3*>(static_cast<char*>(is_v ? c.v : c.k) + at) + g * bs * d;
    float* scale_at =
        reinterpret_cast<float*>(reinterpret_cast<char*>(is_v ? c.v_scale : c.k_scale) + block * c.scale_step()) + g;
    const float* src = is_v ? v : k;
    float scale = *scale_at;
    for (int64_t i = starts[seg]; i < starts[seg + 1]; ++i) {
      const int64_t t = order[i], off = slots[t] % bs;
      const float* x = src + t * ld + g * d;
      const float need = fp8_scale_for(x, d);
      // K is [d, bs] (a token is a column), V [bs, d] (a row): element (token j, dim i).
      const int64_t tok_step = is_v ? d : 1, dim_step = is_v ? 1 : bs;
      // The block's first token sets the scale; so does any token of a block whose scale was
      // never set (written from a later slot first: the pool's memory holds no valid scale).
      if (off == 0 || !(scale >= FLT_MIN && scale <= FLT_MAX)) {
        scale = need;
      } else if (need > scale) {
        // More range needed: re-quantize the block's earlier tokens with the grown scale.
        const float grown = grown_scale(scale, need), ratio = scale / grown;
        for (int64_t j = 0; j < off; ++j)
          for (int64_t i = 0; i < d; ++i) {
            fp8_e4m3& e = dst[j * tok_step + i * dim_step];
            e = to_fp8_e4m3(to_float(e) * ratio);
          }
        scale = grown;
      }
      for (int64_t i = 0; i < d; ++i) dst[off * tok_step + i * dim_step] = to_fp8_e4m3(x[i] / scale);
    }
    *scale_at = scale;
  });
}

}  // namespace

void kv_cache_write(const PagedKv& cache, const float* k, const float* v, int64_t ld, int64_t tokens,
                    const int64_t* slots) {
  switch (kv_index(cache.dtype, "KV cache")) {
    case 0: return write_rows<float>(cache, k, v, ld, tokens, slots);
    case 1: return write_rows<bf16>(cache, k, v, ld, tokens, slots);
    case 2: return write_rows<f16>(cache, k, v, ld, tokens, slots);
    default: return write_fp8(cache, k, v, ld, tokens, slots);
  }
}

void kv_cache_copy_pages(void* pool, int64_t page_bytes, const int32_t* src, const int32_t* dst, int64_t count) {
  char* base = static_cast<char*>(pool);
  parallel_for(count, page_bytes / 4, [&](int64_t i) {
    std::memcpy(base + int64_t(dst[i]) * page_bytes, base + int64_t(src[i]) * page_bytes, size_t(page_bytes));
  });
}

void block_table_set(int32_t* tables, const int64_t* entries, int64_t count) {
  for (int64_t i = 0; i < count; ++i) tables[entries[2 * i]] = int32_t(entries[2 * i + 1]);
}

}  // namespace corral::cpu
