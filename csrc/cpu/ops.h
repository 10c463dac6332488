// The CPU implementations behind the device switch in csrc/dispatch.cpp; each has the contract
// of the kernels:: function of the same name (csrc/include/corral/kernels/).
#pragma once

#include "corral/kernels/attention.h"
#include "corral/kernels/kv_cache.h"
#include "corral/kernels/linear.h"
#include "corral/kernels/moe.h"
#include "corral/kernels/rope.h"
#include "corral/kernels/sampling.h"
#include <omp.h>

#include <atomic>
#include <exception>
#include <mutex>
#include <vector>

#include "isa.h"

namespace corral::cpu {

using kernels::Activations;

void linear(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
            bool accumulate, Activations act);
void rms_norm(float* y, const float* x, const void* w, DType w_dtype, int64_t rows, int64_t dim,
              float eps);
void layer_norm(float* y, const float* x, const void* w, const void* b, DType w_dtype, int64_t rows, int64_t dim,
                float eps);
void gelu(float* x, int64_t ld, int64_t rows, int64_t n);
void add_rows(float* y, int64_t ldy, int64_t rows, const void* src, DType dtype, int64_t n, int64_t src_rows);
void rope_2d(float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim, const int32_t* pos_x,
             const int32_t* pos_y, const float* inv_freq);
void attention_dense(float* out, const float* q, const float* k, const float* v, int64_t ld, int64_t seqs,
                     int64_t len, int64_t heads, int64_t head_dim, float scale);
void unfold_patches(float* out, const float* pixels, int64_t tiles, int64_t channels, int64_t size, int64_t patch);
void pixel_shuffle(float* out, const float* x, int64_t tiles, int64_t tile_rows, int64_t grid, int64_t dim,
                   int64_t s);
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
void apply_token_mask(float* logits, int64_t vocab, int64_t count, const int32_t* rows, const uint32_t* mask);
void logprobs(const float* logits, int64_t rows, int64_t vocab, const int32_t* chosen, float* chosen_logprob,
              int64_t top_n, int32_t* top_ids, float* top_logprobs);
void kv_cache_write(const PagedKv& cache, const float* k, const float* v, int64_t ld,
                    int64_t tokens, const int64_t* slots);
void kv_cache_copy_pages(void* pool, int64_t page_bytes, const int32_t* src, const int32_t* dst, int64_t count);
void block_table_set(int32_t* tables, const int64_t* entries, int64_t count);
void paged_attention(float* out, const float* q, int64_t heads, const PagedKv& cache,
                     const AttentionBatch& batch, float scale, int64_t chunk_size);
void attn_temperature_scale(float* q, int64_t ld, int64_t rows, int64_t width,
                            const int32_t* positions, float attn_scale, float floor_scale);
void swiglu_mlp(float* out, const float* x, int64_t rows, const MatrixRef& gate_up, const MatrixRef& down,
                Activations act);
void moe(float* out, const float* x, int64_t tokens, const MoeWeights& w, int top_k,
         int64_t* expert_tokens, Activations act);

// Packed products (cpu/linear.cpp). The kind of product (GemmKind) of weights of `dtype` with
// activations `act`.
int gemm_kind(DType dtype, Activations act);
// k per step of a packed float matrix of `dtype` (2 for bfloat16: pairs), and bytes per panel of
// a packed matrix.
int64_t step_of(DType dtype);
int64_t panel_bytes(const MatrixRef& w);
// Output columns of a packed matrix (PackedGlu: its SwiGLU outputs) and of each of its panels.
int64_t output_width(const MatrixRef& w);
int64_t panel_outputs(const MatrixRef& w);
int64_t num_panels(const MatrixRef& w);
// Rows of x per work item: a block of x stays in cache while a panel of W streams past it.
constexpr int64_t kRowBlock = 64;
// x prepared for products of `kind` in thread-local scratch slot `slot` (see scratch);
// act_group > 0 first rounds fp8 activations (QuantInfo::act_group).
PreparedX prepare(int slot, const float* x, int64_t ldx, int64_t rows, int64_t k, int kind, int64_t act_group = 0);
// The same into buf (rows * prepared_row_words(kind, k) words).
PreparedX prepare_in(void* buf, const float* x, int64_t ldx, int64_t rows, int64_t k, int kind, int64_t act_group);
// One work item: y[r, the panel's columns] (+)= x[x_row + r] . W for r < rows, x prepared for
// `kind`.
void gemm_panel(float* y, int64_t ldy, const PreparedX& x, int64_t x_row, int64_t rows, const MatrixRef& w,
                int kind, int64_t panel, bool accumulate);
// y = x . W (+ y) over every panel and row block, on the CPU threads.
void product(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w, int kind,
             bool accumulate);
// A buffer of at least `bytes` bytes kept by the calling thread across calls (no page faults
// on every call); slots 0..5 are independent.
void* scratch(int slot, int64_t bytes);

// An exception must not leave an OpenMP region (the runtime would call std::terminate): work in
// a region runs through run(), which keeps the first exception any thread throws and skips the
// work after it (whose inputs may be missing; barriers stay matched), and rethrow() raises it on
// the calling thread after the region.
class RegionErrors {
 public:
  template <class F>
  void run(F&& f) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      f();
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
      failed_ = true;
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr first_;
};

// Calls f(item) for item < items on the CPU threads (OpenMP); inline when the work is small.
template <class F>
void parallel_for(int64_t items, int64_t work_per_item, F&& f) {
  const bool parallel = items > 1 && items * work_per_item > (1 << 15);
  RegionErrors errors;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < items; ++i) errors.run([&] { f(i); });
  errors.rethrow();
}

// Items in one contiguous share per thread, which its owner runs front to back; a thread done
// with its own share takes the items left in the others' from their back ends. Each thread's
// items stay one contiguous stream (as the hardware prefetchers want: weight panels lie in item
// order) and no thread idles while items remain (the threads stream memory at different speeds).
// Made outside a parallel region; every thread of the region calls run, then a barrier follows.
struct Shares {
  Shares(int64_t items, int threads) : ranges(size_t(threads)) {
    for (int t = 0; t < threads; ++t)
      ranges[t].bits = pack(items * t / threads, items * (t + 1) / threads);
  }
  template <class F>
  void run(F&& f) {
    const int n = int(ranges.size()), me = omp_get_thread_num();
    for (int64_t i; me < n && (i = take(ranges[me], true)) >= 0;) f(i);
    for (int k = 1; k < n; ++k)
      for (int64_t i; (i = take(ranges[(me + k) % n], false)) >= 0;) f(i);
  }

 private:
  struct alignas(64) Range {
    std::atomic<uint64_t> bits;  // [front, end): front in the low 32 bits
  };
  static uint64_t pack(int64_t front, int64_t end) { return uint64_t(front) | uint64_t(end) << 32; }
  // The front item (owner) or the back one (thief) of r, or -1 when it is empty.
  static int64_t take(Range& r, bool front) {
    uint64_t b = r.bits.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t lo = int64_t(b & 0xffffffffu), hi = int64_t(b >> 32);
      if (lo >= hi) return -1;
      if (r.bits.compare_exchange_weak(b, front ? pack(lo + 1, hi) : pack(lo, hi - 1), std::memory_order_relaxed))
        return front ? lo : hi - 1;
    }
  }
  std::vector<Range> ranges;
};

// parallel_for in Shares.
template <class F>
void parallel_shares(int64_t items, int64_t work_per_item, F&& f) {
  if (items <= 1 || items * work_per_item <= (1 << 15)) {
    for (int64_t i = 0; i < items; ++i) f(i);
    return;
  }
  Shares shares(items, omp_get_max_threads());
  RegionErrors errors;
#pragma omp parallel
  shares.run([&](int64_t i) { errors.run([&] { f(i); }); });
  errors.rethrow();
}

}  // namespace corral::cpu
