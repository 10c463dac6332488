// The device switch: every kernels:: entry point checks its arguments' device once, here, and
// calls the CPU or the CUDA implementation. Nothing else in Corral tests for CUDA at compile time.
#include <string>

#include "corral/error.h"
#include "corral/kernels/activation.h"
#include "corral/kernels/attention.h"
#include "corral/kernels/embedding.h"
#include "corral/kernels/image.h"
#include "corral/kernels/kv_cache.h"
#include "corral/kernels/linear.h"
#include "corral/kernels/mlp.h"
#include "corral/kernels/moe.h"
#include "corral/kernels/norm.h"
#include "corral/kernels/rope.h"
#include "corral/kernels/sampling.h"
#include "cpu/ops.h"
#if CORRAL_WITH_CUDA
#include "cuda/cublaslt.h"
#include "cuda/ops.h"
#endif

namespace corral::kernels {

namespace {

bool is_cuda(const Stream& s) { return s.device.type == DeviceType::CUDA; }

#if !CORRAL_WITH_CUDA
[[noreturn]] void no_cuda(const char* op) {
  throw DeviceError(std::string(op) + ": this build of Corral has no CUDA backend");
}
#endif

}  // namespace

// Returns the CUDA implementation's result when the stream is on a GPU (no_cuda's error in a build
// without the CUDA backend); the CPU code after it runs otherwise.
#if CORRAL_WITH_CUDA
#define CORRAL_ON_CUDA(s, op, ...) \
  if (is_cuda(s)) return cuda::op((s).handle, __VA_ARGS__)
#else
#define CORRAL_ON_CUDA(s, op, ...) \
  if (is_cuda(s)) no_cuda(#op)
#endif

void linear(const Stream& s, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows,
            const MatrixRef& w, bool accumulate, Activations act) {
  CORRAL_ON_CUDA(s, linear, y, ldy, x, ldx, rows, w, accumulate, act);
  cpu::linear(y, ldy, x, ldx, rows, w, accumulate, act);
}

std::string cuda_blas_status() {
#if CORRAL_WITH_CUDA
  return cuda::cublaslt_status();
#else
  return "not built";
#endif
}

bool cuda_fp8_tensor_products(int64_t rows, int64_t in, int64_t out) {
#if CORRAL_WITH_CUDA
  return cuda::fp8_tensor_products(rows, in, out);
#else
  (void)rows, (void)in, (void)out;
  return false;
#endif
}

void rms_norm(const Stream& s, void* y, const void* x, DType act, const void* w, DType w_dtype,
              int64_t rows, int64_t dim, float eps) {
  CORRAL_ON_CUDA(s, rms_norm, y, x, act, w, w_dtype, rows, dim, eps);
  if (act != DType::F32)
    throw DTypeError(std::string("rms_norm: CPU activations are float32, got ") + dtype_name(act));
  cpu::rms_norm(static_cast<float*>(y), static_cast<const float*>(x), w, w_dtype, rows, dim, eps);
}

void silu_mul(const Stream& s, float* out, int64_t ld_out, const float* gate, const float* up,
              int64_t ld_in, int64_t rows, int64_t n) {
  CORRAL_ON_CUDA(s, silu_mul, out, ld_out, gate, up, ld_in, rows, n);
  cpu::silu_mul(out, ld_out, gate, up, ld_in, rows, n);
}

void rope_interleaved(const Stream& s, float* x, int64_t ld, int64_t tokens, int64_t heads,
                      int64_t head_dim, const int32_t* positions, const float* inv_freq) {
  CORRAL_ON_CUDA(s, rope_interleaved, x, ld, tokens, heads, head_dim, positions, inv_freq);
  cpu::rope_interleaved(x, ld, tokens, heads, head_dim, positions, inv_freq);
}

void embedding(const Stream& s, float* out, const void* table, DType dtype, int64_t vocab,
               int64_t dim, const int32_t* ids, int64_t tokens) {
  // On CUDA the ids are device memory: an id outside [0, vocab) cannot throw there; its row is
  // written as zeros (nothing outside the table is read). Callers validate ids on the host first.
  CORRAL_ON_CUDA(s, embedding, out, table, dtype, vocab, dim, ids, tokens);
  cpu::embedding(out, table, dtype, vocab, dim, ids, tokens);
}

void argmax(const Stream& s, int32_t* out, const float* logits, int64_t rows, int64_t vocab) {
  CORRAL_ON_CUDA(s, argmax, out, logits, rows, vocab);
  cpu::argmax(out, logits, rows, vocab);
}

void sample(const Stream& s, int32_t* out, const float* logits, int64_t rows, int64_t vocab,
            const SamplerRow* settings, const float* uniform) {
  if (rows > 0 && vocab < 1) throw InvalidInputError("sample: vocab " + std::to_string(vocab) + " must be at least 1");
  CORRAL_ON_CUDA(s, sample, out, logits, rows, vocab, settings, uniform);
  cpu::sample(out, logits, rows, vocab, settings, uniform);
}

void apply_penalties(const Stream& s, float* logits, int64_t rows, int64_t vocab, const int64_t* offsets,
                     const int32_t* token_ids, const int32_t* output_counts, const PenaltyRow* penalties) {
  CORRAL_ON_CUDA(s, apply_penalties, logits, rows, vocab, offsets, token_ids, output_counts, penalties);
  cpu::apply_penalties(logits, rows, vocab, offsets, token_ids, output_counts, penalties);
}

void apply_token_mask(const Stream& s, float* logits, int64_t vocab, int64_t count, const int32_t* rows,
                      const uint32_t* mask) {
  CORRAL_ON_CUDA(s, apply_token_mask, logits, vocab, count, rows, mask);
  cpu::apply_token_mask(logits, vocab, count, rows, mask);
}

void logprobs(const Stream& s, const float* logits, int64_t rows, int64_t vocab, const int32_t* chosen,
              float* chosen_logprob, int64_t top_n, int32_t* top_ids, float* top_logprobs) {
  if (rows > 0 && (vocab < 1 || top_n < 0 || top_n > vocab))
    throw InvalidInputError("logprobs: top_n " + std::to_string(top_n) + " must be in [0, vocab = " +
                            std::to_string(vocab) + "]");
  CORRAL_ON_CUDA(s, logprobs, logits, rows, vocab, chosen, chosen_logprob, top_n, top_ids, top_logprobs);
  cpu::logprobs(logits, rows, vocab, chosen, chosen_logprob, top_n, top_ids, top_logprobs);
}

void kv_cache_write(const Stream& s, const PagedKv& cache, const float* k, const float* v,
                    int64_t ld, int64_t tokens, const int64_t* slots) {
  CORRAL_ON_CUDA(s, kv_cache_write, cache, k, v, ld, tokens, slots);
  cpu::kv_cache_write(cache, k, v, ld, tokens, slots);
}

void kv_cache_copy_pages(const Stream& s, void* pool, int64_t page_bytes, const int32_t* src,
                         const int32_t* dst, int64_t count) {
  CORRAL_ON_CUDA(s, kv_cache_copy_pages, pool, page_bytes, src, dst, count);
  cpu::kv_cache_copy_pages(pool, page_bytes, src, dst, count);
}

void block_table_set(const Stream& s, int32_t* tables, const int64_t* entries, int64_t count) {
  CORRAL_ON_CUDA(s, block_table_set, tables, entries, count);
  cpu::block_table_set(tables, entries, count);
}

void paged_attention(const Stream& s, float* out, const float* q, int64_t heads,
                     const PagedKv& cache, const AttentionBatch& batch, float scale,
                     int64_t chunk_size, AttentionPlan* plan) {
  CORRAL_ON_CUDA(s, paged_attention, out, q, heads, cache, batch, scale, chunk_size, plan);
  (void)plan;  // the CPU plans nothing
  cpu::paged_attention(out, q, heads, cache, batch, scale, chunk_size);
}

void attn_temperature_scale(const Stream& s, float* q, int64_t ld, int64_t rows, int64_t width,
                            const int32_t* positions, float attn_scale, float floor_scale) {
  CORRAL_ON_CUDA(s, attn_temperature_scale, q, ld, rows, width, positions, attn_scale, floor_scale);
  cpu::attn_temperature_scale(q, ld, rows, width, positions, attn_scale, floor_scale);
}

void swiglu_mlp(const Stream& s, float* out, const float* x, int64_t rows, const MatrixRef& gate_up,
                const MatrixRef& down, Activations act) {
  CORRAL_ON_CUDA(s, swiglu_mlp, out, x, rows, gate_up, down, act);
  cpu::swiglu_mlp(out, x, rows, gate_up, down, act);
}

void moe(const Stream& s, float* out, const float* x, int64_t tokens, const MoeWeights& w,
         int top_k, int64_t* expert_tokens, Activations act) {
  CORRAL_ON_CUDA(s, moe, out, x, tokens, w, top_k, expert_tokens);
  cpu::moe(out, x, tokens, w, top_k, expert_tokens, act);
}

void layer_norm(const Stream& s, float* y, const float* x, const void* w, const void* b, DType w_dtype,
                int64_t rows, int64_t dim, float eps) {
  if (!w) throw InvalidInputError("layer_norm: the weight is required (the bias may be null)");
  CORRAL_ON_CUDA(s, layer_norm, y, x, w, b, w_dtype, rows, dim, eps);
  cpu::layer_norm(y, x, w, b, w_dtype, rows, dim, eps);
}

void gelu(const Stream& s, float* x, int64_t ld, int64_t rows, int64_t n) {
  CORRAL_ON_CUDA(s, gelu, x, ld, rows, n);
  cpu::gelu(x, ld, rows, n);
}

void add_rows(const Stream& s, float* y, int64_t ldy, int64_t rows, const void* src, DType dtype, int64_t n,
              int64_t src_rows) {
  if (src_rows < 1) throw ShapeError("add_rows: src_rows must be >= 1, got " + std::to_string(src_rows));
  CORRAL_ON_CUDA(s, add_rows, y, ldy, rows, src, dtype, n, src_rows);
  cpu::add_rows(y, ldy, rows, src, dtype, n, src_rows);
}

void rope_2d(const Stream& s, float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim,
             const int32_t* pos_x, const int32_t* pos_y, const float* inv_freq) {
  if (head_dim % 4 != 0) throw ShapeError("rope_2d: head_dim must be a multiple of 4, got " + std::to_string(head_dim));
  CORRAL_ON_CUDA(s, rope_2d, x, ld, tokens, heads, head_dim, pos_x, pos_y, inv_freq);
  cpu::rope_2d(x, ld, tokens, heads, head_dim, pos_x, pos_y, inv_freq);
}

void attention_dense(const Stream& s, float* out, const float* q, const float* k, const float* v, int64_t ld,
                     int64_t seqs, int64_t len, int64_t heads, int64_t head_dim, float scale) {
  CORRAL_ON_CUDA(s, attention_dense, out, q, k, v, ld, seqs, len, heads, head_dim, scale);
  cpu::attention_dense(out, q, k, v, ld, seqs, len, heads, head_dim, scale);
}

void unfold_patches(const Stream& s, float* out, const float* pixels, int64_t tiles, int64_t channels, int64_t size,
                    int64_t patch) {
  if (patch <= 0 || size % patch != 0)
    throw ShapeError("unfold_patches: tile size " + std::to_string(size) + " is not a multiple of the patch size " +
                     std::to_string(patch));
  CORRAL_ON_CUDA(s, unfold_patches, out, pixels, tiles, channels, size, patch);
  cpu::unfold_patches(out, pixels, tiles, channels, size, patch);
}

void pixel_shuffle(const Stream& s, float* out, const float* x, int64_t tiles, int64_t tile_rows, int64_t grid,
                   int64_t dim, int64_t factor) {
  if (factor <= 0 || grid % factor != 0 || tile_rows < grid * grid)
    throw ShapeError("pixel_shuffle: a grid of " + std::to_string(grid) + " patches cannot fold by " +
                     std::to_string(factor) + " (tile rows " + std::to_string(tile_rows) + ")");
  CORRAL_ON_CUDA(s, pixel_shuffle, out, x, tiles, tile_rows, grid, dim, factor);
  cpu::pixel_shuffle(out, x, tiles, tile_rows, grid, dim, factor);
}

}  // namespace corral::kernels
