// The text model's element-wise ops on CUDA (contracts: corral/kernels/embedding.h embedding,
// rope.h rope_interleaved, activation.h silu_mul, kv_cache.h kv_cache_copy_pages and block_table_set). Float32
// arithmetic in the CPU code's order (explicit _rn intrinsics: nvcc contracts nothing), so the ops
// round as the CPU does up to the accuracy of expf / sincosf. Every kernel walks its rows (and
// columns) in grid-stride loops over capped grids; every pointer is a device pointer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "check.h"
#include "convert.cuh"
#include "corral/error.h"
#include "launch.cuh"
#include "ops.h"
#include "rope.cuh"

namespace corral::cuda {

namespace {

constexpr int kThreads = 256;

// out[t, :] = float(table[ids[t], :]); a row whose id is outside [0, vocab) is written as zeros
// (the ids are on the device: the kernel cannot throw, and must not read outside the table).
template <class T>
__global__ void embedding_kernel(float* out, const T* table, int64_t vocab, int64_t dim, const int32_t* ids,
                                 int64_t tokens) {
  for (int64_t t = blockIdx.y; t < tokens; t += gridDim.y) {
    const int64_t id = ids[t];
    const bool valid = id >= 0 && id < vocab;
    const T* row = table + (valid ? id : 0) * dim;
    float* o = out + t * dim;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < dim; i += int64_t(gridDim.x) * blockDim.x)
      o[i] = valid ? to_f32(row[i]) : 0.f;
  }
}

// out = g / (1 + exp(-g)) * u, rounded step by step as the CPU computes it.
__global__ void silu_mul_kernel(float* out, int64_t ld_out, const float* gate, const float* up, int64_t ld_in,
                                int64_t rows, int64_t n) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* g = gate + r * ld_in;
    const float* u = up + r * ld_in;
    float* o = out + r * ld_out;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
      const float x = g[i];
      o[i] = __fmul_rn(__fdiv_rn(x, __fadd_rn(1.0f, expf(-x))), u[i]);
    }
  }
}

// tables[entries[2 i]] = entries[2 i + 1]: the block tables' changed entries (each index once).
__global__ void block_table_set_kernel(int32_t* tables, const int64_t* entries, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    tables[entries[2 * i]] = int32_t(entries[2 * i + 1]);
}

// Page src[p] to page dst[p] of the pool (blockIdx.y walks the pairs), in words of W bytes.
template <class W>
__global__ void copy_pages_kernel(unsigned char* pool, int64_t page_bytes, const int32_t* src, const int32_t* dst,
                                  int64_t count) {
  const int64_t words = page_bytes / int64_t(sizeof(W));
  for (int64_t p = blockIdx.y; p < count; p += gridDim.y) {
    const W* s = reinterpret_cast<const W*>(pool + int64_t(src[p]) * page_bytes);
    W* d = reinterpret_cast<W*>(pool + int64_t(dst[p]) * page_bytes);
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < words; i += int64_t(gridDim.x) * blockDim.x)
      d[i] = s[i];
  }
}

template <class W>
void launch_copy_pages(cudaStream_t s, unsigned char* pool, int64_t page_bytes, const int32_t* src,
                       const int32_t* dst, int64_t count) {
  copy_pages_kernel<W><<<rows_cols_grid(count, page_bytes / int64_t(sizeof(W)), kThreads), kThreads, 0, s>>>(
      pool, page_bytes, src, dst, count);
  CORRAL_CUDA_CHECK_LAUNCH();
}

}  // namespace

void embedding(void* stream, float* out, const void* table, DType dtype, int64_t vocab, int64_t dim,
               const int32_t* ids, int64_t tokens) {
  if (tokens <= 0 || dim <= 0) return;
  if (!out || !table || !ids) throw InvalidInputError("embedding: a pointer is null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  with_float_type(dtype, "embedding table", [&](auto tag) {
    using T = typename decltype(tag)::type;
    embedding_kernel<T><<<rows_cols_grid(tokens, dim, kThreads), kThreads, 0, s>>>(
        out, static_cast<const T*>(table), vocab, dim, ids, tokens);
    CORRAL_CUDA_CHECK_LAUNCH();
  });
}

void rope_interleaved(void* stream, float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim,
                      const int32_t* positions, const float* inv_freq) {
  if (tokens <= 0 || heads <= 0 || head_dim < 2) return;
  if (!x || !positions || !inv_freq) throw InvalidInputError("rope_interleaved: a pointer is null");
  rope::launch(static_cast<cudaStream_t>(stream), x, ld, tokens, heads, head_dim, rope::Angles1d{positions, inv_freq});
}

void silu_mul(void* stream, float* out, int64_t ld_out, const float* gate, const float* up, int64_t ld_in,
              int64_t rows, int64_t n) {
  if (rows <= 0 || n <= 0) return;
  if (!out || !gate || !up) throw InvalidInputError("silu_mul: a pointer is null");
  silu_mul_kernel<<<rows_cols_grid(rows, n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, ld_out, gate, up, ld_in, rows, n);
  CORRAL_CUDA_CHECK_LAUNCH();
}

void kv_cache_copy_pages(void* stream, void* pool, int64_t page_bytes, const int32_t* src, const int32_t* dst,
                         int64_t count) {
  if (count <= 0 || page_bytes <= 0) return;
  if (!pool || !src || !dst) throw InvalidInputError("kv_cache_copy_pages: a pointer is null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  unsigned char* base = static_cast<unsigned char*>(pool);
  // The widest word that divides the page size and the pool's alignment (cudaMalloc: 256 bytes).
  const uintptr_t align = reinterpret_cast<uintptr_t>(pool) | uintptr_t(page_bytes);
  if (align % 16 == 0) return launch_copy_pages<uint4>(s, base, page_bytes, src, dst, count);
  if (align % 4 == 0) return launch_copy_pages<uint32_t>(s, base, page_bytes, src, dst, count);
  launch_copy_pages<unsigned char>(s, base, page_bytes, src, dst, count);
}

void block_table_set(void* stream, int32_t* tables, const int64_t* entries, int64_t count) {
  if (count <= 0) return;
  if (!tables || !entries) throw InvalidInputError("block_table_set: a pointer is null");
  block_table_set_kernel<<<blocks_for((count + kThreads - 1) / kThreads), kThreads, 0,
                           static_cast<cudaStream_t>(stream)>>>(tables, entries, count);
  CORRAL_CUDA_CHECK_LAUNCH();
}

}  // namespace corral::cuda
