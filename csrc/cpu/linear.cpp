#include <algorithm>
#include <cstring>
#include <vector>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

int64_t panel_width(const MatrixRef& w) { return w.layout == WeightLayout::OutIn ? 16 : 256; }

void gemm_panel(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w, int64_t c0,
                int64_t n, bool accumulate) {
  const int fi = float_index(w.dtype, "linear weight");
  const int64_t es = int64_t(dtype_size(w.dtype)), ldw = w.row_stride();
  const char* base = static_cast<const char*>(w.data);
  if (w.layout == WeightLayout::OutIn) {
    isa().gemm_outin[fi](y, ldy, x, ldx, rows, base + c0 * ldw * es, ldw, n, w.in, accumulate);
    return;
  }
  // InOut: chunk by chunk of k, each chunk's sum added to y in order (see kKChunk).
  for (int64_t k0 = 0, c = 0; k0 < w.in; k0 += kKChunk, ++c)
    isa().gemm_inout[fi](y, ldy, x + k0, ldx, rows, base + (k0 * ldw + c0) * es, ldw, n,
                         std::min(kKChunk, w.in - k0), accumulate || c > 0);
}

int64_t k_chunks(const MatrixRef& w) { return std::max<int64_t>(1, (w.in + kKChunk - 1) / kKChunk); }

void stream_chunk(float* partial, int64_t ldp, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
                  int64_t chunk) {
  const int fi = float_index(w.dtype, "linear weight");
  const int64_t es = int64_t(dtype_size(w.dtype)), ldw = w.row_stride(), k0 = chunk * kKChunk;
  for (int64_t r = 0; r < rows; ++r) std::memset(partial + r * ldp, 0, sizeof(float) * size_t(w.out));
  isa().gemm_inout_stream[fi](partial, ldp, x + k0, ldx, rows, static_cast<const char*>(w.data) + k0 * ldw * es, ldw,
                              w.out, std::min(kKChunk, w.in - k0), true);
}

void add_chunks(float* y, int64_t ldy, const float* partials, int64_t ldp, int64_t chunk_stride, int64_t chunks,
                int64_t rows, int64_t c0, int64_t c1, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = c0; c < c1; ++c) {
      float v = accumulate ? y[r * ldy + c] + partials[r * ldp + c] : partials[r * ldp + c];
      for (int64_t k = 1; k < chunks; ++k) v += partials[k * chunk_stride + r * ldp + c];
      y[r * ldy + c] = v;
    }
}

float* scratch(int slot, int64_t floats) {
  thread_local std::vector<float> buffers[6];
  std::vector<float>& b = buffers[slot];
  if (int64_t(b.size()) < floats) b.resize(size_t(floats));
  return b.data();
}

void linear(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, const MatrixRef& w,
            bool accumulate) {
  if (rows <= 0 || w.out <= 0) return;
  float_index(w.dtype, "linear weight");
  if (w.layout == WeightLayout::InOut && rows <= kStreamRows) {
    // Few rows: each k-chunk streams whole rows of W into a partial sum; the partials are then
    // added in chunk order (see kKChunk).
    const int64_t chunks = k_chunks(w), stride = rows * w.out;
    float* partials = scratch(0, chunks * stride);
    parallel_for(chunks, stride * kKChunk, [&](int64_t c) {
      stream_chunk(partials + c * stride, w.out, x, ldx, rows, w, c);
    });
    constexpr int64_t kCols = 256;
    parallel_for((w.out + kCols - 1) / kCols, rows * kCols * chunks, [&](int64_t b) {
      add_chunks(y, ldy, partials, w.out, stride, chunks, rows, b * kCols, std::min(w.out, (b + 1) * kCols), accumulate);
    });
    return;
  }
  const int64_t panel = panel_width(w);
  const int64_t panels = (w.out + panel - 1) / panel;
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  // Panel-major order: a thread's consecutive items reuse the same W panel from cache.
  parallel_for(panels * blocks, std::min(rows, kRowBlock) * panel * w.in, [&](int64_t item) {
    const int64_t p = item / blocks, b = item % blocks;
    const int64_t c0 = p * panel, r0 = b * kRowBlock;
    gemm_panel(y + r0 * ldy + c0, ldy, x + r0 * ldx, ldx, std::min(kRowBlock, rows - r0), w, c0,
               std::min(panel, w.out - c0), accumulate);
  });
}

}  // namespace corral::cpu
