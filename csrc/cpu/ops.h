// The CPU implementations behind the device switch in csrc/dispatch.cpp; each has the contract
// of the kernels:: function of the same name (csrc/include/corral/kernels/).
#pragma once

#include "corral/kernels/attention.h"
#include "corral/kernels/kv_cache.h"
#include "corral/kernels/linear.h"
#include "corral/kernels/moe.h"
#include "corral/kernels/rope.h"
#include "corral/kernels/sampling.h"
#include "isa.h"

namespace corral::cpu {

void linear(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
            bool accumulate);
void rms_norm(float* y, const float* x, const void* w, DType w_dtype, int64_t rows, int64_t dim,
              float eps);
void silu_mul(float* out, int64_t ld_out, const float* gate, const float* up, int64_t ld_in,
              int64_t rows, int64_t n);
void rope_interleaved(float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim,
                      const int32_t* positions, const float* inv_freq);
void embedding(float* out, const void* table, DType dtype, int64_t vocab, int64_t dim,
               const int32_t* ids, int64_t tokens);
void argmax(int32_t* out, const float* logits, int64_t rows, int64_t vocab);
void sample(int32_t* out, const float* logits, int64_t rows, int64_t vocab, const SamplerRow* settings,
            const float* uniform);
void apply_penalties(float* logits, int64_t rows, int64_t vocab, const int64_t* offsets, const int32_t* token_ids,
                     const int32_t* output_counts, const PenaltyRow* penalties);
void logprobs(const float* logits, int64_t rows, int64_t vocab, const int32_t* chosen, float* chosen_logprob,
              int64_t top_n, int32_t* top_ids, float* top_logprobs);
void kv_cache_write(const PagedKv& cache, const float* k, const float* v, int64_t ld,
                    int64_t tokens, const int64_t* slots);
void kv_cache_copy_pages(void* pool, int64_t page_bytes, const int32_t* src, const int32_t* dst, int64_t count);
void paged_attention(float* out, const float* q, int64_t heads, const PagedKv& cache,
                     const AttentionBatch& batch, float scale, int64_t chunk_size);
void attn_temperature_scale(float* q, int64_t ld, int64_t rows, int64_t width,
                            const int32_t* positions, float attn_scale, float floor_scale);
void swiglu_mlp(float* out, const float* x, int64_t rows, const MatrixRef& gate, const MatrixRef& up,
                const MatrixRef& down);
void moe(float* out, const float* x, int64_t tokens, const MoeWeights& w, int top_k,
         int64_t* expert_tokens);

// Rows of x per linear work item: a block of x stays in cache while a W panel streams past it.
constexpr int64_t kRowBlock = 64;
// Output columns per work item of a weight matrix: OutIn panels are rows of W, InOut panels are
// column blocks of W.
int64_t panel_width(const MatrixRef& w);
// One work item of linear: y[r, c0:c0+n] (+)= x[r, :] . W[:, c0:c0+n] for r < rows (n at most a
// panel's width), through the ISA's inner loops. Throws DTypeError for an unsupported W.
void gemm_panel(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w, int64_t c0,
                int64_t n, bool accumulate);

// InOut products sum k in chunks of kKChunk rows, each chunk's sum added to y in order: a fixed
// order, whether a product runs as panels (gemm_panel) or, for few rows, as chunks streaming
// whole rows of W (stream_chunk, then add_chunks), so results never depend on the batch.
constexpr int64_t kKChunk = 256;
int64_t k_chunks(const MatrixRef& w);
// partial[r, 0:w.out] = the sum over k-chunk `chunk`, for r < rows (<= kStreamRows).
void stream_chunk(float* partial, int64_t ldp, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
                  int64_t chunk);
// y[r, c] = (y[r, c] if accumulate) + the partials of chunks 0, 1, ... in order (each [rows, ldp],
// chunk_stride apart), for r < rows and columns [c0, c1).
void add_chunks(float* y, int64_t ldy, const float* partials, int64_t ldp, int64_t chunk_stride, int64_t chunks,
                int64_t rows, int64_t c0, int64_t c1, bool accumulate);
// A buffer of at least `floats` floats kept by the calling thread across calls (no page faults
// on every call); slots 0..5 are independent.
float* scratch(int slot, int64_t floats);

// Calls f(item) for item < items on the CPU threads (OpenMP); inline when the work is small.
template <class F>
void parallel_for(int64_t items, int64_t work_per_item, F&& f) {
  const bool parallel = items > 1 && items * work_per_item > (1 << 15);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < items; ++i) f(i);
}

}  // namespace corral::cpu
