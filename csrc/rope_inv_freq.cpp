// RoPE frequencies, computed on the host once per model load, in float32 operation by operation
// as transformers does (default RoPE and llama3 scaling).
#include <cmath>

#include "corral/kernels/rope.h"

namespace corral::kernels {

void rope_inv_freq(float* inv_freq, int64_t head_dim, const RopeParams& p) {
  const int64_t half = head_dim / 2;
  const float base = float(p.theta);
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = 1.0f / std::pow(base, float(2 * i) / float(head_dim));
  if (p.type != RopeParams::Type::Llama3) return;

  const float factor = float(p.factor);
  const float low_wavelen = float(p.original_max_position_embeddings / p.low_freq_factor);
  const float high_wavelen = float(p.original_max_position_embeddings / p.high_freq_factor);
  const float two_pi = float(2.0 * M_PI);
  for (int64_t i = 0; i < half; ++i) {
    const float f = inv_freq[i];
    const float wavelen = two_pi / f;
    if (wavelen < high_wavelen) continue;        // high frequencies: unchanged
    if (wavelen > low_wavelen) {                 // low frequencies: divided by the factor
      inv_freq[i] = f / factor;
      continue;
    }
    // The band between blends the two. With low == high it holds only wavelen == low exactly,
    // where transformers' formula divides by zero; it keeps that nan.
    const float smooth = (float(p.original_max_position_embeddings) / wavelen - float(p.low_freq_factor)) /
                         float(p.high_freq_factor - p.low_freq_factor);
    inv_freq[i] = (1.0f - smooth) * f / factor + smooth * f;
  }
}

}  // namespace corral::kernels
