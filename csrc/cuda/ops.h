// The CUDA implementations behind the device switch in csrc/dispatch.cpp; each has the contract
// of the kernels:: function of the same name. `stream` is a cudaStream_t.
#pragma once

#include "corral/kernels/attention.h"
#include "corral/kernels/kv_cache.h"
#include "corral/kernels/linear.h"
#include "corral/kernels/moe.h"
#include "corral/kernels/sampling.h"
#include "corral/kernels/types.h"

namespace corral::cuda {

void rms_norm(void* stream, void* y, const void* x, DType act, const void* w, DType w_dtype,
              int64_t rows, int64_t dim, float eps);

// x, out and every weight pointer are device pointers; expert_tokens, when not null, is a device
// int64 array [experts]. Weights: bfloat16 / float16 (tensor cores) or float32 (CUDA cores), or
// quantized experts packed as on the CPU (moe.h).
// Paged KV cache and attention: the cache pools, q, out, k, v, slots and every array of the
// batch are device pointers. Float32, bfloat16, float16 and float8_e4m3 caches.
void kv_cache_write(void* stream, const PagedKv& cache, const float* k, const float* v, int64_t ld,
                    int64_t tokens, const int64_t* slots);
// Tensor cores (bfloat16 / float16 inputs, float32 accumulation) for prefill rows of bfloat16 /
// float16 caches with head_dim 64 or 128 and block_size 16, 32 or 64; CUDA cores in float32
// otherwise (decode rows always). head_dim up to 256, block_size up to 128.
// A valid `plan` (see AttentionPlan) skips the plan kernel; its memory holds the plan, offsets,
// counters and partials, else they are scratch of the call.
void paged_attention(void* stream, float* out, const float* q, int64_t heads, const PagedKv& cache,
                     const AttentionBatch& batch, float scale, int64_t chunk_size, AttentionPlan* plan);
void attn_temperature_scale(void* stream, float* q, int64_t ld, int64_t rows, int64_t width,
                            const int32_t* positions, float attn_scale, float floor_scale);

// The vision encoder's ops (csrc/cuda/vision.cu); every pointer is a device pointer.
void layer_norm(void* stream, float* y, const float* x, const void* w, const void* b, DType w_dtype, int64_t rows,
                int64_t dim, float eps);
void gelu(void* stream, float* x, int64_t ld, int64_t rows, int64_t n);
void add_rows(void* stream, float* y, int64_t ldy, int64_t rows, const void* src, DType dtype, int64_t n,
              int64_t src_rows);
void rope_2d(void* stream, float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim,
             const int32_t* pos_x, const int32_t* pos_y, const float* inv_freq);
void attention_dense(void* stream, float* out, const float* q, const float* k, const float* v, int64_t ld,
                     int64_t seqs, int64_t len, int64_t heads, int64_t head_dim, float scale);
void unfold_patches(void* stream, float* out, const float* pixels, int64_t tiles, int64_t channels, int64_t size,
                    int64_t patch);
void pixel_shuffle(void* stream, float* out, const float* x, int64_t tiles, int64_t tile_rows, int64_t grid,
                   int64_t dim, int64_t s);

// The text model's element-wise ops (csrc/cuda/elementwise.cu), argmax, apply_penalties,
// apply_token_mask and logprobs (csrc/cuda/sampling.cu) and sample (csrc/cuda/sample.cu);
// every pointer is a device pointer. embedding cannot throw for an id outside [0, vocab) (the ids
// are on the device): it writes that token's row as zeros, reading nothing outside the table
// (callers validate ids beforehand, as the CPU's InvalidInputError contract asks).
void embedding(void* stream, float* out, const void* table, DType dtype, int64_t vocab, int64_t dim,
               const int32_t* ids, int64_t tokens);
void rope_interleaved(void* stream, float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim,
                      const int32_t* positions, const float* inv_freq);
void silu_mul(void* stream, float* out, int64_t ld_out, const float* gate, const float* up, int64_t ld_in,
              int64_t rows, int64_t n);
void kv_cache_copy_pages(void* stream, void* pool, int64_t page_bytes, const int32_t* src, const int32_t* dst,
                         int64_t count);
void block_table_set(void* stream, int32_t* tables, const int64_t* entries, int64_t count);
void argmax(void* stream, int32_t* out, const float* logits, int64_t rows, int64_t vocab);
// vocab in [1, 2^30] (InvalidInputError otherwise). The token is the CPU's for the same uniform
// number but where float64 sums rounded in another order (or exp's last bit) fall on the other side
// of a cut (sample.cu says which).
void sample(void* stream, int32_t* out, const float* logits, int64_t rows, int64_t vocab, const SamplerRow* settings,
            const float* uniform);
// Token ids, counts and offsets are on the device and unchecked there: an entry whose id is outside
// [0, vocab) is skipped. Entries repeating a token within a row (outside the contract) race.
void apply_penalties(void* stream, float* logits, int64_t rows, int64_t vocab, const int64_t* offsets,
                     const int32_t* token_ids, const int32_t* output_counts, const PenaltyRow* penalties);
void apply_token_mask(void* stream, float* logits, int64_t vocab, int64_t count, const int32_t* rows,
                      const uint32_t* mask);
// top_n up to kernels::kMaxDeviceLogprobs (NotSupportedError beyond) and at most vocab
// (InvalidInputError); a chosen id outside [0, vocab) gets a NaN log-probability.
void logprobs(void* stream, const float* logits, int64_t rows, int64_t vocab, const int32_t* chosen,
              float* chosen_logprob, int64_t top_n, int32_t* top_ids, float* top_logprobs);

void moe(void* stream, float* out, const float* x, int64_t tokens, const MoeWeights& w, int top_k,
         int64_t* expert_tokens);

// Dense products (csrc/cuda/linear.cu): x, y, out and the weights' data are device pointers; the
// weights unpacked (OutIn or InOut) float32, bfloat16 or float16, or quantized in the CPU's packed
// layout (NotSupportedError for packed float ones). swiglu_mlp's float gate_up is one matrix: the
// gate's outputs, then the up's; a quantized one is PackedGlu.
void linear(void* stream, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
            bool accumulate, kernels::Activations act);
void swiglu_mlp(void* stream, float* out, const float* x, int64_t rows, const MatrixRef& gate_up,
                const MatrixRef& down, kernels::Activations act);
// kernels::cuda_fp8_tensor_products (csrc/cuda/quantized_product.cu).
bool fp8_tensor_products(int64_t rows, int64_t in, int64_t out);

}  // namespace corral::cuda
