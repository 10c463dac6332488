// Attention over a paged KV cache for a ragged batch (many sequences, prefill and decode mixed).
#pragma once

#include "corral/kernels/kv_cache.h"

namespace corral {

// The sequence structure of a ragged batch. Sequence s owns query rows
// [seq_starts[s], seq_starts[s + 1]); row r is the token at absolute position positions[r], and
// the sequence's token at position p has its K/V in block
// block_tables[table_rows[s] * max_blocks + p / block_size]: the tables are a pool of rows
// (BlockTables, persistent across passes), table_rows picks each sequence's.
struct AttentionBatch {
  const int32_t* seq_starts = nullptr;  // [num_seqs + 1]
  int32_t num_seqs = 0;
  const int32_t* positions = nullptr;     // [rows]
  const int32_t* block_tables = nullptr;  // [pool rows, max_blocks]
  const int32_t* table_rows = nullptr;    // [num_seqs] each sequence's row of block_tables
  int32_t max_blocks = 0;
};

// paged_attention's work plan and scratch, kept by the caller across calls so that the layers of
// one kind in one pass plan once (CUDA: a plan kernel splits the batch's work, then persistent
// kernels take it and a merge folds split-KV partials; the CPU plans nothing and ignores it).
// A call given a plan that is not `valid` plans into it and marks it valid; a call given a valid
// plan made for the same batch arrays, chunk size and cache geometry reuses it (resetting its
// work counters only). The caller clears `valid` whenever the batch's contents change (each
// pass) and lends `bytes` of device memory at `data`; a call needing more sets `needed` and
// plans in scratch of its own, leaving the plan invalid (grow it for the next pass).
struct AttentionPlan {
  void* data = nullptr;
  size_t bytes = 0;
  size_t needed = 0;  // set by each call: the bytes it wanted
  bool valid = false;
  int64_t made_for[10] = {};  // what the plan was made for (paged_attention's own record)
};

namespace kernels {

// out[r, h, :] = sum_j softmax_j(q[r, h, :] . K[j] * scale) V[j] over the keys j the row sees:
// positions lo..p of its own sequence, with lo = 0 (global layers) or lo = p - p % chunk_size
// (chunked local layers, chunk_size > 0). Query head h reads KV head h / (heads / kv_heads).
// Only blocks holding visible keys are read (local layers may have freed earlier ones).
// q and out are [rows, heads * head_dim] float32; the softmax is exact (online, in float32).
// `plan` (optional) is reused across calls as AttentionPlan says.
void paged_attention(const Stream& stream, float* out, const float* q, int64_t heads,
                     const PagedKv& cache, const AttentionBatch& batch, float scale,
                     int64_t chunk_size, AttentionPlan* plan = nullptr);

// Llama 4's attention temperature tuning of NoPE layers: each row of q (width floats, rows ld
// apart) is scaled by 1 + attn_scale * log1p(floor((p + 1) / floor_scale)), p = positions[row].
void attn_temperature_scale(const Stream& stream, float* q, int64_t ld, int64_t rows, int64_t width,
                            const int32_t* positions, float attn_scale, float floor_scale);

// Attention without a mask or a cache (the vision encoder's): `seqs` sequences of `len` rows each;
// out[r, h, :] = sum_j softmax_j(q[r, h, :] . k[j, h, :] * scale) v[j, h, :] over every row j of
// r's sequence. q, k and v are [seqs * len, heads * head_dim] with rows ld floats apart; out is
// dense [seqs * len, heads * head_dim]. float32, exact softmax.
void attention_dense(const Stream& stream, float* out, const float* q, const float* k, const float* v, int64_t ld,
                     int64_t seqs, int64_t len, int64_t heads, int64_t head_dim, float scale);

}  // namespace kernels
}  // namespace corral
