#include <algorithm>

#include "ops.h"

namespace corral::cpu {

void unfold_patches(float* out, const float* pixels, int64_t tiles, int64_t channels, int64_t size, int64_t patch) {
  const int64_t grid = size / patch, cols = channels * patch * patch;
  parallel_for(tiles * grid, grid * cols, [&](int64_t item) {  // one row of patches of one tile
    const int64_t t = item / grid, gy = item % grid;
    for (int64_t gx = 0; gx < grid; ++gx) {
      float* row = out + ((t * grid + gy) * grid + gx) * cols;
      for (int64_t c = 0; c < channels; ++c)
        for (int64_t ky = 0; ky < patch; ++ky) {
          const float* src = pixels + ((t * channels + c) * size + gy * patch + ky) * size + gx * patch;
          std::copy(src, src + patch, row + (c * patch + ky) * patch);
        }
    }
  });
}

void pixel_shuffle(float* out, const float* x, int64_t tiles, int64_t tile_rows, int64_t grid, int64_t dim,
                   int64_t s) {
  const int64_t g = grid / s, width = s * s * dim;
  parallel_for(tiles * g * g, width, [&](int64_t item) {  // one output token
    const int64_t t = item / (g * g), r = item % (g * g) / g, c = item % g;
    for (int64_t dy = 0; dy < s; ++dy)
      for (int64_t dx = 0; dx < s; ++dx) {
        const float* src = x + (t * tile_rows + (s * r + dy) * grid + s * c + dx) * dim;
        std::copy(src, src + dim, out + item * width + (dy * s + dx) * dim);
      }
  });
}

}  // namespace corral::cpu
