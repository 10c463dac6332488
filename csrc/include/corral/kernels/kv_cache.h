// The paged KV cache as kernels see it: one layer's blocks in pages of a pool, and the ops that
// write and copy them.
#pragma once

#include "corral/kernels/types.h"

namespace corral {

// One layer's view of the KV cache. Block b of the layer holds, per KV head, block_size tokens
// of head_dim values: K at (char*)k + b * block_stride, laid out [kv_heads, head_dim, block_size]
// (transposed: a block's scores are then a product with no horizontal sums), and V at
// (char*)v + b * block_stride, laid out [kv_heads, block_size, head_dim]. With dtype F8_E4M3 each (block, KV head) has a float scale (the stored
// value times the scale is the real one), at (char*)k_scale + b * scale_stride, [kv_heads]
// (scale_stride 0: block_stride, scales inside the pages).
struct PagedKv {
  void* k = nullptr;
  void* v = nullptr;
  float* k_scale = nullptr;  // F8_E4M3 only
  float* v_scale = nullptr;
  int64_t block_stride = 0;  // bytes
  int64_t scale_stride = 0;  // bytes; 0: block_stride
  DType dtype = DType::F32;
  int64_t num_blocks = 0;
  int32_t block_size = 16;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;

  int64_t scale_step() const { return scale_stride ? scale_stride : block_stride; }
};

namespace kernels {

// Stores k[t, :] and v[t, :] (kv_heads * head_dim floats each, rows ld apart) at slot slots[t]
// = block * block_size + offset. Tokens of one block must come in increasing slot order, and a
// block's first write must be at offset 0. For F8_E4M3, a block's per-head scale is set by its
// first token (amax / 448) and doubled as often as a later token needs for its amax / 448, which
// re-quantizes the block's earlier tokens exactly: every value is stored to fp8 precision,
// rounded once, never clipped.
void kv_cache_write(const Stream& stream, const PagedKv& cache, const float* k, const float* v,
                    int64_t ld, int64_t tokens, const int64_t* slots);

// Copies whole pages (every layer of a layer group, scales included) of a pool: page src[i] to
// page dst[i], for copy-on-write of shared blocks.
void kv_cache_copy_pages(const Stream& stream, void* pool, int64_t page_bytes, const int32_t* src,
                         const int32_t* dst, int64_t count);

// Block-table entries from a list of (index, page) pairs with distinct indices:
// tables[entries[2i]] = entries[2i + 1] for i < count. The block manager's changes, applied to
// the persistent tables before a pass.
void block_table_set(const Stream& stream, int32_t* tables, const int64_t* entries, int64_t count);

}  // namespace kernels
}  // namespace corral
