// Layout ops of the vision encoder: image tiles to patch rows, and the pixel shuffle that folds
// neighbouring patches into one token.
#pragma once

#include "corral/kernels/types.h"

namespace corral::kernels {

// torch.nn.Unfold with stride = kernel = patch: pixels [tiles, channels, size, size] float32 to
// rows [tiles * grid * grid, channels * patch * patch] (grid = size / patch), row
// t * grid^2 + gy * grid + gx, column c * patch^2 + ky * patch + kx = pixel
// [t, c, gy * patch + ky, gx * patch + kx].
void unfold_patches(const Stream& stream, float* out, const float* pixels, int64_t tiles, int64_t channels,
                    int64_t size, int64_t patch);

// Llama 4's pixel shuffle by a factor s (pixel_shuffle_ratio 1 / s): the grid x grid tokens of each
// tile (the first grid^2 of its tile_rows rows of x, rows dim floats wide) fold into (grid / s)^2
// tokens of s^2 * dim: out[t, r * (grid / s) + c, (dy * s + dx) * dim + ch] =
// x[t * tile_rows + (s * r + dy) * grid + s * c + dx, ch]. out is dense.
void pixel_shuffle(const Stream& stream, float* out, const float* x, int64_t tiles, int64_t tile_rows, int64_t grid,
                   int64_t dim, int64_t s);

}  // namespace corral::kernels
