#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {

// Query tokens per work item; all query heads of one KV head go together, so each K/V block
// read serves tokens x group rows.
constexpr int64_t kQueryTile = 16;

// One work item: query tokens [r0, r1) of sequence s against KV head g.
struct Scratch {
  std::vector<float> q, scores, acc, max, sum;
};

void attend_tile(float* out, const float* q, int64_t heads, const PagedKv& c,
                 const AttentionBatch& b, float scale, int64_t chunk, int64_t s, int64_t g,
                 int64_t r0, int64_t r1, Scratch& w) {
  const int64_t d = c.head_dim, bs = c.block_size, group = heads / c.kv_heads;
  const int64_t rows = (r1 - r0) * group;
  const int fi = kv_index(c.dtype, "KV cache");
  const GemmPanelFn scores_fn = isa().gemm_outin[fi], accum_fn = isa().gemm_inout[fi];
  const bool fp8 = c.dtype == DType::F8_E4M3;  // the loops read codes; scales are applied here
  const size_t es = dtype_size(c.dtype);
  w.q.resize(rows * d);
  w.scores.resize(rows * bs);
  w.acc.assign(rows * d, 0.f);
  w.max.assign(rows, -std::numeric_limits<float>::infinity());
  w.sum.assign(rows, 0.f);
  // Row (t, hh) holds query head g * group + hh of token r0 + t, pre-multiplied by the scale.
  for (int64_t t = 0; t < r1 - r0; ++t)
    for (int64_t hh = 0; hh < group; ++hh)
      for (int64_t i = 0; i < d; ++i)
        w.q[(t * group + hh) * d + i] = q[(r0 + t) * heads * d + (g * group + hh) * d + i] * scale;

  auto lo_of = [&](int64_t p) { return chunk > 0 ? p - p % chunk : int64_t(0); };
  const int64_t p_first = b.positions[r0], p_last = b.positions[r1 - 1];
  int64_t lo_min = lo_of(p_first), hi_max = p_last;
  for (int64_t r = r0; r < r1; ++r) {
    lo_min = std::min(lo_min, lo_of(b.positions[r]));
    hi_max = std::max<int64_t>(hi_max, b.positions[r]);
  }
  const int32_t* table = b.block_tables + s * int64_t(b.max_blocks);
  const char* kbase = static_cast<const char*>(c.k);
  const char* vbase = static_cast<const char*>(c.v);
  const int64_t head_offset = g * bs * d * int64_t(es);
  for (int64_t blk = lo_min / bs; blk <= hi_max / bs; ++blk) {
    const int64_t key0 = blk * bs, nk = std::min(bs, hi_max + 1 - key0);
    const int64_t offset = int64_t(table[blk]) * c.block_stride + head_offset;
    scores_fn(w.scores.data(), bs, w.q.data(), d, rows, kbase + offset, d, nk, d, false);
    // fp8: this block's scales for KV head g (stored value * scale = real value).
    float k_scale = 1.f, v_scale = 1.f;
    if (fp8) {
      const int64_t at = int64_t(table[blk]) * c.block_stride;
      k_scale = reinterpret_cast<const float*>(reinterpret_cast<const char*>(c.k_scale) + at)[g];
      v_scale = reinterpret_cast<const float*>(reinterpret_cast<const char*>(c.v_scale) + at)[g];
    }
    bool any = false;
    for (int64_t t = 0; t < r1 - r0; ++t) {
      const int64_t p = b.positions[r0 + t], lo = lo_of(p);
      for (int64_t hh = 0; hh < group; ++hh) {
        const int64_t row = t * group + hh;
        float* sc = w.scores.data() + row * bs;
        float m = -std::numeric_limits<float>::infinity();
        if (fp8)
          for (int64_t j = 0; j < nk; ++j) sc[j] *= k_scale;
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t key = key0 + j;
          if (key < lo || key > p) sc[j] = -std::numeric_limits<float>::infinity();
          m = std::max(m, sc[j]);
        }
        if (m == -std::numeric_limits<float>::infinity()) {  // no visible key in this block
          for (int64_t j = 0; j < nk; ++j) sc[j] = 0.f;
          continue;
        }
        any = true;
        const float m_new = std::max(w.max[row], m);
        const float correction = std::exp(w.max[row] - m_new);
        float sum = 0.f;
        for (int64_t j = 0; j < nk; ++j) {
          sc[j] = std::exp(sc[j] - m_new);
          sum += sc[j];
        }
        w.sum[row] = w.sum[row] * correction + sum;
        w.max[row] = m_new;
        if (fp8)  // P . (codes * v_scale) = (P * v_scale) . codes
          for (int64_t j = 0; j < nk; ++j) sc[j] *= v_scale;
        if (correction != 1.f)
          for (int64_t i = 0; i < d; ++i) w.acc[row * d + i] *= correction;
      }
    }
    if (any) accum_fn(w.acc.data(), d, w.scores.data(), bs, rows, vbase + offset, d, d, nk, true);
  }
  for (int64_t t = 0; t < r1 - r0; ++t)
    for (int64_t hh = 0; hh < group; ++hh) {
      const int64_t row = t * group + hh;
      const float inv = 1.0f / w.sum[row];
      float* o = out + (r0 + t) * heads * d + (g * group + hh) * d;
      for (int64_t i = 0; i < d; ++i) o[i] = w.acc[row * d + i] * inv;
    }
}

}  // namespace

void paged_attention(float* out, const float* q, int64_t heads, const PagedKv& cache,
                     const AttentionBatch& batch, float scale, int64_t chunk_size) {
  if (cache.kv_heads <= 0 || heads % cache.kv_heads != 0)
    throw ShapeError("paged_attention: " + std::to_string(heads) +
                     " query heads are not a multiple of " + std::to_string(cache.kv_heads) +
                     " KV heads");
  kv_index(cache.dtype, "KV cache");
  if (cache.dtype == DType::F8_E4M3 && (cache.k_scale == nullptr || cache.v_scale == nullptr))
    throw InvalidInputError("paged_attention: a float8_e4m3 KV cache needs k_scale and v_scale");
  struct Item {
    int64_t seq, r0, r1;
  };
  std::vector<Item> items;
  for (int64_t s = 0; s < batch.num_seqs; ++s)
    for (int64_t r = batch.seq_starts[s]; r < batch.seq_starts[s + 1]; r += kQueryTile)
      items.push_back({s, r, std::min<int64_t>(r + kQueryTile, batch.seq_starts[s + 1])});
  const int64_t n = int64_t(items.size()) * cache.kv_heads;
#pragma omp parallel
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) {
      const Item& it = items[i / cache.kv_heads];
      attend_tile(out, q, heads, cache, batch, scale, chunk_size, it.seq, i % cache.kv_heads,
                  it.r0, it.r1, scratch);
    }
  }
}

void attn_temperature_scale(float* q, int64_t ld, int64_t rows, int64_t width,
                            const int32_t* positions, float attn_scale, float floor_scale) {
  parallel_for(rows, width, [&](int64_t r) {
    // float32 throughout, in transformers' order of operations.
    const float steps = std::floor((float(positions[r]) + 1.0f) / floor_scale);
    const float factor = std::log1p(steps) * attn_scale + 1.0f;
    for (int64_t i = 0; i < width; ++i) q[r * ld + i] *= factor;
  });
}

}  // namespace corral::cpu
