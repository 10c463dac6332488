// Attention over a paged KV cache for a ragged batch (many sequences, prefill and decode mixed).
#pragma once

#include "corral/kernels/types.h"

namespace corral {

// The KV cache of one layer. K and V are each [num_blocks, kv_heads, block_size, head_dim] of
// `dtype`; a token's K/V live at slot (block id * block_size + offset in the block).
struct PagedKv {
  void* k = nullptr;
  void* v = nullptr;
  DType dtype = DType::F32;
  int64_t num_blocks = 0;
  int32_t block_size = 16;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
};

// The sequence structure of a ragged batch. Sequence s owns query rows
// [seq_starts[s], seq_starts[s + 1]); row r is the token at absolute position positions[r], and
// the sequence's token at position p has its K/V in block block_tables[s * max_blocks + p / block_size].
struct AttentionBatch {
  const int32_t* seq_starts = nullptr;  // [num_seqs + 1]
  int32_t num_seqs = 0;
  const int32_t* positions = nullptr;     // [rows]
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks]
  int32_t max_blocks = 0;
};

namespace kernels {

// Stores k[t, :] and v[t, :] (kv_heads * head_dim floats each, rows ld apart) at slots[t].
void kv_cache_write(const Stream& stream, const PagedKv& cache, const float* k, const float* v,
                    int64_t ld, int64_t tokens, const int64_t* slots);

// out[r, h, :] = sum_j softmax_j(q[r, h, :] . K[j] * scale) V[j] over the keys j the row sees:
// positions lo..p of its own sequence, with lo = 0 (global layers) or lo = p - p % chunk_size
// (chunked local layers, chunk_size > 0). Query head h reads KV head h / (heads / kv_heads).
// q and out are [rows, heads * head_dim] float32; the softmax is exact (online, in float32).
void paged_attention(const Stream& stream, float* out, const float* q, int64_t heads,
                     const PagedKv& cache, const AttentionBatch& batch, float scale,
                     int64_t chunk_size);

// Llama 4's attention temperature tuning of NoPE layers: each row of q (width floats, rows ld
// apart) is scaled by 1 + attn_scale * log1p(floor((p + 1) / floor_scale)), p = positions[row].
void attn_temperature_scale(const Stream& stream, float* q, int64_t ld, int64_t rows, int64_t width,
                            const int32_t* positions, float attn_scale, float floor_scale);

}  // namespace kernels
}  // namespace corral
