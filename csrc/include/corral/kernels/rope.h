// Rotary position embedding as Llama 4 applies it: adjacent pairs (2i, 2i+1) rotate together.
#pragma once

#include "corral/kernels/types.h"

namespace corral {

// RoPE frequency settings as read from a checkpoint's config.
struct RopeParams {
  enum class Type : uint8_t { Default, Llama3 };
  Type type = Type::Default;
  double theta = 500000.0;
  // llama3 scaling (ignored for Default)
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 1.0;
  double original_max_position_embeddings = 8192.0;
};

namespace kernels {

// inv_freq[i], i < head_dim / 2, computed in float32 exactly as transformers does (including
// the llama3 frequency scaling, with its two-branch rule when low == high).
void rope_inv_freq(float* inv_freq, int64_t head_dim, const RopeParams& params);

// In place, for each token t and head h of x[t, h * head_dim ...] (rows ld floats apart):
//   (x[2i], x[2i+1]) <- rotation of (x[2i], x[2i+1]) by angle float(positions[t]) * inv_freq[i].
void rope_interleaved(const Stream& stream, float* x, int64_t ld, int64_t tokens, int64_t heads,
                      int64_t head_dim, const int32_t* positions, const float* inv_freq);

// The vision encoder's 2-D RoPE: in place, for each token t and head h of x[t, h * head_dim ...]
// (rows ld floats apart), pair i < head_dim / 4 rotates by float(pos_x[t]) * inv_freq[i] and
// pair head_dim / 4 + i by float(pos_y[t]) * inv_freq[i] (inv_freq: head_dim / 4 entries;
// head_dim a multiple of 4). Position 0 leaves a pair as it is.
void rope_2d(const Stream& stream, float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim,
             const int32_t* pos_x, const int32_t* pos_y, const float* inv_freq);

}  // namespace kernels
}  // namespace corral
