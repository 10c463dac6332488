#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <omp.h>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Query tokens per tile; all query heads of a KV head go together, so each K/V block read serves
// tokens x group rows.
constexpr int64_t kQueryTile = 16;
// Keys per split (rounded up to whole blocks): a row's softmax runs split by split, each split's
// (max, sum, output) merged in order. Splits are fixed by key position, so a row's result does
// not depend on the batch or on how its keys were spread over threads.
constexpr int64_t kSplitKeys = 2048;
// Tiles of at most this many query tokens (decode) take every KV head at once, reading whole
// pages, and run their splits on different threads.
constexpr int64_t kSplitTileTokens = 4;
// How many blocks ahead attention prefetches K and V.
constexpr int64_t kPrefetchBlocks = 2;

// KV heads [g0, g1) of query tokens [r0, r1) of sequence seq.
struct Tile {
  int64_t seq, r0, r1, g0, g1;
};

// Online-softmax state of a tile's rows (per KV head, its tokens x group rows): running max, sum
// and unnormalized output.
struct Partial {
  std::vector<float> m, l, acc;
  void reset(int64_t rows, int64_t d) {
    m.assign(rows, kNegInf);
    l.assign(rows, 0.f);
    acc.assign(rows * d, 0.f);
  }
};

// What a tile needs, set up once: its rows' scaled queries and the keys each token sees.
struct TileWork {
  const PagedKv& c;
  const AttentionBatch& b;
  int64_t heads, chunk;
  Tile t;
  int64_t group, tokens, rows_per_head, rows, d, bs;
  std::vector<float> q;         // [g1 - g0][tokens * group][d], pre-multiplied by the scale
  std::vector<int64_t> lo, hi;  // per token: visible keys [lo, hi]
  int64_t first_block, last_block, hi_max;

  TileWork(const PagedKv& cache, const AttentionBatch& batch, int64_t h, int64_t chunk_size, const float* qin,
           float scale, const Tile& tile)
      : c(cache), b(batch), heads(h), chunk(chunk_size), t(tile), group(h / cache.kv_heads), tokens(tile.r1 - tile.r0),
        rows_per_head(tokens * group), rows(rows_per_head * (tile.g1 - tile.g0)), d(cache.head_dim),
        bs(cache.block_size) {
    q.resize(rows * d);
    for (int64_t g = t.g0; g < t.g1; ++g)
      for (int64_t tok = 0; tok < tokens; ++tok)
        for (int64_t hh = 0; hh < group; ++hh)
          for (int64_t i = 0; i < d; ++i)
            q[(((g - t.g0) * tokens + tok) * group + hh) * d + i] =
                qin[(t.r0 + tok) * heads * d + (g * group + hh) * d + i] * scale;
    int64_t lo_min = std::numeric_limits<int64_t>::max();
    hi_max = 0;
    for (int64_t r = t.r0; r < t.r1; ++r) {
      const int64_t p = b.positions[r];
      lo.push_back(chunk > 0 ? p - p % chunk : 0);
      hi.push_back(p);
      lo_min = std::min(lo_min, lo.back());
      hi_max = std::max(hi_max, p);
    }
    first_block = lo_min / bs;
    last_block = hi_max / bs;
  }

  int64_t split_blocks() const { return (kSplitKeys + bs - 1) / bs; }
  int64_t first_split() const { return first_block / split_blocks(); }
  int64_t last_split() const { return last_block / split_blocks(); }

  // The online softmax of the rows over the blocks of split `split`, from a fresh state.
  void attend_split(int64_t split, Partial& p, std::vector<float>& scores, std::vector<float>& corr) const {
    p.reset(rows, d);
    scores.resize(rows_per_head * bs);
    corr.resize(rows_per_head);
    const IsaKernels& k = isa();
    const int fi = kv_index(c.dtype, "KV cache");
    const int64_t es = int64_t(dtype_size(c.dtype)), head_bytes = bs * d * es;
    const int32_t* table = b.block_tables + int64_t(b.table_rows[t.seq]) * b.max_blocks;
    const int64_t b0 = std::max(first_block, split * split_blocks());
    const int64_t b1 = std::min(last_block + 1, (split + 1) * split_blocks());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t page = table[blk], key0 = blk * bs, nk = std::min(bs, hi_max + 1 - key0);
      // The kernels prefetch the same head's K and V of the block kPrefetchBlocks later as they go.
      const int64_t ahead = blk + kPrefetchBlocks < b1 ? (table[blk + kPrefetchBlocks] - page) * c.block_stride : 0;
      for (int64_t g = t.g0; g < t.g1; ++g) {
        const int64_t at = page * c.block_stride + g * head_bytes;
        const char* kt = static_cast<const char*>(c.k) + at;  // [d, bs]
        const char* vb = static_cast<const char*>(c.v) + at;  // [bs, d]
        const int64_t r0 = (g - t.g0) * rows_per_head;
        float* acc = p.acc.data() + r0 * d;
        // Scores of the whole block, keys past the last written one masked with the rest.
        k.attn_scores[fi](scores.data(), bs, q.data() + r0 * d, d, rows_per_head, kt, bs, d, ahead);
        for (int64_t tok = 0; tok < tokens; ++tok) {  // keys a row does not see
          if (lo[tok] <= key0 && key0 + bs - 1 <= hi[tok]) continue;
          for (int64_t hh = 0; hh < group; ++hh) {
            float* s = scores.data() + (tok * group + hh) * bs;
            for (int64_t j = 0; j < bs; ++j)
              if (key0 + j < lo[tok] || key0 + j > hi[tok]) s[j] = kNegInf;
          }
        }
        float k_scale = 1.f, v_scale = 1.f;  // fp8: the block's scales for this KV head
        if (c.dtype == DType::F8_E4M3) {
          k_scale = reinterpret_cast<const float*>(reinterpret_cast<const char*>(c.k_scale) + page * c.scale_step())[g];
          v_scale = reinterpret_cast<const float*>(reinterpret_cast<const char*>(c.v_scale) + page * c.scale_step())[g];
        }
        k.softmax_block(scores.data(), bs, rows_per_head, bs, k_scale, v_scale, p.m.data() + r0, p.l.data() + r0,
                        corr.data());
        for (int64_t r = 0; r < rows_per_head; ++r)
          if (corr[r] != 1.f)
            for (int64_t i = 0; i < d; ++i) acc[r * d + i] *= corr[r];
        k.attn_pv[fi](acc, d, scores.data(), bs, rows_per_head, vb, nk, d, ahead);  // V past nk: unwritten
      }
    }
  }

  // Folds split partial p into the running state (the first one with keys is copied).
  void merge(Partial& run, const Partial& p) const {
    for (int64_t r = 0; r < rows; ++r) {
      if (p.m[r] == kNegInf) continue;
      if (run.m[r] == kNegInf) {
        run.m[r] = p.m[r];
        run.l[r] = p.l[r];
        std::copy_n(p.acc.data() + r * d, d, run.acc.data() + r * d);
        continue;
      }
      const float m = std::max(run.m[r], p.m[r]);
      const float a = std::exp(run.m[r] - m), c2 = std::exp(p.m[r] - m);
      run.m[r] = m;
      run.l[r] = run.l[r] * a + p.l[r] * c2;
      for (int64_t i = 0; i < d; ++i) run.acc[r * d + i] = run.acc[r * d + i] * a + p.acc[r * d + i] * c2;
    }
  }

  void write(float* out, const Partial& run) const {
    for (int64_t g = t.g0; g < t.g1; ++g)
      for (int64_t tok = 0; tok < tokens; ++tok)
        for (int64_t hh = 0; hh < group; ++hh) {
          const int64_t row = ((g - t.g0) * tokens + tok) * group + hh;
          const float inv = 1.0f / run.l[row];
          float* o = out + (t.r0 + tok) * heads * d + (g * group + hh) * d;
          for (int64_t i = 0; i < d; ++i) o[i] = run.acc[row * d + i] * inv;
        }
  }
};

}  // namespace

void paged_attention(float* out, const float* q, int64_t heads, const PagedKv& cache,
                     const AttentionBatch& batch, float scale, int64_t chunk_size) {
  if (cache.kv_heads <= 0 || heads % cache.kv_heads != 0)
    throw ShapeError("paged_attention: " + std::to_string(heads) + " query heads are not a multiple of " +
                     std::to_string(cache.kv_heads) + " KV heads");
  kv_index(cache.dtype, "KV cache");
  if (cache.dtype == DType::F8_E4M3 && (cache.k_scale == nullptr || cache.v_scale == nullptr))
    throw InvalidInputError("paged_attention: a float8_e4m3 KV cache needs k_scale and v_scale");
  if (batch.num_seqs > 0 && (!batch.block_tables || !batch.table_rows))
    throw InvalidInputError("paged_attention: block_tables or table_rows is null");
  std::vector<TileWork> tiles;
  for (int64_t s = 0; s < batch.num_seqs; ++s) {
    const int64_t n = batch.seq_starts[s + 1] - batch.seq_starts[s];
    for (int64_t r = batch.seq_starts[s]; r < batch.seq_starts[s + 1]; r += kQueryTile) {
      const int64_t r1 = std::min<int64_t>(r + kQueryTile, batch.seq_starts[s + 1]);
      if (n <= kSplitTileTokens) {  // decode: every KV head in one tile, whole pages read at once
        tiles.emplace_back(cache, batch, heads, chunk_size, q, scale, Tile{s, r, r1, 0, cache.kv_heads});
        // Fewer splits than threads (a short context): the KV heads in as many groups as keep
        // every thread busy, each group's heads together.
        const int64_t splits = tiles.back().last_split() - tiles.back().first_split() + 1;
        const int64_t groups = std::min<int64_t>(cache.kv_heads, (omp_get_max_threads() + splits - 1) / splits);
        if (groups <= 1) continue;
        tiles.pop_back();
        for (int64_t g = 0; g < groups; ++g)
          tiles.emplace_back(cache, batch, heads, chunk_size, q, scale,
                             Tile{s, r, r1, cache.kv_heads * g / groups, cache.kv_heads * (g + 1) / groups});
        continue;
      }
      for (int64_t g = 0; g < cache.kv_heads; ++g)
        tiles.emplace_back(cache, batch, heads, chunk_size, q, scale, Tile{s, r, r1, g, g + 1});
    }
  }
  // Decode tiles with several splits run one split per work item; the rest one tile per item.
  struct Item {
    int64_t tile, split;  // split -1: the whole tile
    int64_t partial;      // where a split's result goes
  };
  std::vector<Item> items;
  std::vector<int64_t> first_partial(tiles.size(), -1);
  int64_t partials = 0;
  for (int64_t i = 0; i < int64_t(tiles.size()); ++i) {
    const TileWork& t = tiles[i];
    if (t.tokens <= kSplitTileTokens && t.last_split() > t.first_split()) {
      first_partial[i] = partials;
      for (int64_t sp = t.first_split(); sp <= t.last_split(); ++sp) items.push_back({i, sp, partials++});
    } else {
      items.push_back({i, -1, -1});
    }
  }
  std::vector<Partial> split_results(partials);
  RegionErrors errors;  // the buffers below grow inside the region
#pragma omp parallel
  {
    Partial run, part;
    std::vector<float> scores, corr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(items.size()); ++i)
      errors.run([&] {
        const Item& it = items[i];
        const TileWork& t = tiles[it.tile];
        if (it.split >= 0) {
          t.attend_split(it.split, split_results[it.partial], scores, corr);
          return;
        }
        run.reset(t.rows, t.d);
        for (int64_t sp = t.first_split(); sp <= t.last_split(); ++sp) {
          t.attend_split(sp, part, scores, corr);
          t.merge(run, part);
        }
        t.write(out, run);
      });
    // Merge the split tiles' partials, split by split in order.
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(tiles.size()); ++i)
      errors.run([&] {
        if (first_partial[i] < 0) return;
        const TileWork& t = tiles[i];
        run.reset(t.rows, t.d);
        for (int64_t sp = 0; sp <= t.last_split() - t.first_split(); ++sp)
          t.merge(run, split_results[first_partial[i] + sp]);
        t.write(out, run);
      });
  }
  errors.rethrow();
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
