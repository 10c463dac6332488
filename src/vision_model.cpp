#include "corral/vision_model.h"

#include <algorithm>
#include <cmath>

#include "corral/kernels/activation.h"
#include "corral/kernels/attention.h"
#include "corral/kernels/image.h"
#include "corral/kernels/norm.h"
#include "corral/kernels/rope.h"

namespace corral {

namespace {
// Tiles per pass: a 16-tile image of the published tower holds about 1 GB of activations.
constexpr int64_t kTilesPerPass = 16;
// nn.LayerNorm's default: the checkpoints' norm_eps is not what transformers applies.
constexpr float kLayerNormEps = 1e-5f;
}  // namespace

VisionModel::VisionModel(const ModelConfig& config, VisionWeights weights, kernels::Activations act,
                         const Stream& stream)
    : c_(config.vision), text_hidden_(config.hidden_size), w_(std::move(weights)), act_(act), stream_(stream) {
  const Device d = stream.device;
  for (DeviceArray<float>* a : {&inv_freq_on_, &pixels_, &out_, &x_, &a_, &q_, &k_, &v_, &attn_, &h_})
    *a = DeviceArray<float>(d);
  pos_x_on_ = DeviceArray<int32_t>(d);
  pos_y_on_ = DeviceArray<int32_t>(d);
  // transformers' Llama4VisionRotaryEmbedding: theta^(-2k / (head_dim / 2)) in float32.
  const int64_t quarter = c_.head_dim / 4, half = c_.head_dim / 2;
  for (int64_t k = 0; k < quarter; ++k)
    inv_freq_.push_back(1.0f / std::pow(c_.rope_theta, float(2 * k) / float(half)));
  // Patch n of a tile sits at column n % grid, row n / grid; positions count from 1 so that the
  // CLS token (last) alone is unrotated.
  const int64_t g = c_.grid(), rows = g * g + 1;
  for (int64_t t = 0; t < kTilesPerPass; ++t)
    for (int64_t n = 0; n < rows; ++n) {
      pos_x_.push_back(n < g * g ? int32_t(n % g + 1) : 0);
      pos_y_.push_back(n < g * g ? int32_t(n / g + 1) : 0);
    }
  if (d.type == DeviceType::CUDA) {
    inv_freq_on_.assign(inv_freq_.data(), inv_freq_.size(), stream);
    pos_x_on_.assign(pos_x_.data(), pos_x_.size(), stream);
    pos_y_on_.assign(pos_y_.data(), pos_y_.size(), stream);
  }
}

void VisionModel::encode(const float* pixels, int64_t tiles, float* out) {
  use_device(stream_.device);
  for (int64_t t0 = 0; t0 < tiles; t0 += kTilesPerPass) {
    const int64_t n = std::min(kTilesPerPass, tiles - t0);
    encode_pass(pixels + t0 * c_.tile_floats(), n, out + t0 * c_.tokens_per_tile() * text_hidden_);
  }
}

void VisionModel::encode_pass(const float* host_pixels, int64_t tiles, float* host_out) {
  const Stream& s = stream_;
  const bool gpu = s.device.type == DeviceType::CUDA;
  const int64_t D = c_.hidden_size, g = c_.grid(), patches = g * g, rows = patches + 1, R = tiles * rows;
  const int64_t patch_in = c_.num_channels * c_.patch_size * c_.patch_size;
  const int64_t T = tiles * c_.tokens_per_tile(), S = c_.intermediate_size, P = c_.projector_dim;
  const float* pixels = gpu ? pixels_.assign(host_pixels, size_t(tiles * c_.tile_floats()), s) : host_pixels;
  float* out = gpu ? out_.reserve(size_t(T * text_hidden_)) : host_out;
  float* x = x_.reserve(size_t(R * D));
  float* a = a_.reserve(size_t(std::max({tiles * patches * patch_in, R * D, 2 * T * P})));

  // Patches through the unfold + linear "convolution", then CLS appended last, then positions.
  kernels::unfold_patches(s, a, pixels, tiles, c_.num_channels, c_.image_size, c_.patch_size);
  for (int64_t t = 0; t < tiles; ++t) {
    kernels::linear(s, x + t * rows * D, D, a + t * patches * patch_in, patch_in, patches, w_.patch_embedding, false,
                    act_);
    fill_zero(x + (t * rows + patches) * D, size_t(D) * sizeof(float), s);
  }
  kernels::add_rows(s, x + patches * D, rows * D, tiles, w_.class_embedding.data, w_.class_embedding.dtype, D, 1);
  kernels::add_rows(s, x, D, R, w_.position_embedding.data, w_.position_embedding.dtype, D, rows);
  kernels::layer_norm(s, x, x, w_.pre_w.data, w_.pre_b.data, w_.pre_w.dtype, R, D, kLayerNormEps);

  for (const VisionLayerWeights& l : w_.layers) layer(l, tiles);

  // Post-norm (CLS included, as transformers does), then CLS dropped by the shuffle, which reads
  // each tile's first grid^2 rows.
  kernels::layer_norm(s, x, x, w_.post_w.data, w_.post_b.data, w_.post_w.dtype, R, D, kLayerNormEps);
  float* h = h_.reserve(size_t(std::max(T * S, R * c_.intermediate_size)));
  kernels::pixel_shuffle(s, h, x, tiles, rows, g, D, c_.shuffle);
  // Adapter: GELU after both of its products; then the projector to the text width.
  float* a1 = a;
  float* a2 = a1 + T * P;
  kernels::linear(s, a1, P, h, S, T, w_.adapter_fc1, false, act_);
  kernels::gelu(s, a1, P, T, P);
  kernels::linear(s, a2, P, a1, P, T, w_.adapter_fc2, false, act_);
  kernels::gelu(s, a2, P, T, P);
  kernels::linear(s, out, text_hidden_, a2, P, T, w_.projector, false, act_);
  if (gpu) {
    copy(host_out, out, size_t(T * text_hidden_) * sizeof(float), s);
    synchronize(s);
  }
}

void VisionModel::layer(const VisionLayerWeights& l, int64_t tiles) {
  const Stream& s = stream_;
  const int64_t D = c_.hidden_size, rows = c_.grid() * c_.grid() + 1, R = tiles * rows, I = c_.intermediate_size;
  float *x = x_.data(), *a = a_.data(), *attn = attn_.reserve(size_t(R * D));
  float* h = h_.reserve(size_t(R * I));
  const bool gpu = s.device.type == DeviceType::CUDA;
  const float* inv_freq = gpu ? inv_freq_on_.data() : inv_freq_.data();
  const int32_t *pos_x = gpu ? pos_x_on_.data() : pos_x_.data(), *pos_y = gpu ? pos_y_on_.data() : pos_y_.data();

  // Attention: pre-norm, biased q/k/v, 2-D RoPE on q and k (after the bias), every row of a tile
  // seeing every other.
  kernels::layer_norm(s, a, x, l.ln1_w.data, l.ln1_b.data, l.ln1_w.dtype, R, D, kLayerNormEps);
  const std::pair<DeviceArray<float>*, std::pair<const MatrixRef*, const VectorRef*>> qkv[] = {
      {&q_, {&l.q, &l.q_b}}, {&k_, {&l.k, &l.k_b}}, {&v_, {&l.v, &l.v_b}}};
  for (const auto& [dst, wb] : qkv) {
    float* y = dst->reserve(size_t(R * D));
    kernels::linear(s, y, D, a, D, R, *wb.first, false, act_);
    kernels::add_rows(s, y, D, R, wb.second->data, wb.second->dtype, D, 1);
  }
  for (float* t : {q_.data(), k_.data()}) kernels::rope_2d(s, t, D, R, c_.num_heads, c_.head_dim, pos_x, pos_y, inv_freq);
  kernels::attention_dense(s, attn, q_.data(), k_.data(), v_.data(), D, tiles, rows, c_.num_heads, c_.head_dim,
                           float(1.0 / std::sqrt(double(c_.head_dim))));
  kernels::linear(s, x, D, attn, D, R, l.o, /*accumulate=*/true, act_);
  kernels::add_rows(s, x, D, R, l.o_b.data, l.o_b.dtype, D, 1);

  // MLP: pre-norm, fc1 + bias, exact GELU, fc2 + bias, residual.
  kernels::layer_norm(s, a, x, l.ln2_w.data, l.ln2_b.data, l.ln2_w.dtype, R, D, kLayerNormEps);
  kernels::linear(s, h, I, a, D, R, l.fc1, false, act_);
  kernels::add_rows(s, h, I, R, l.fc1_b.data, l.fc1_b.dtype, I, 1);
  kernels::gelu(s, h, I, R, I);
  kernels::linear(s, x, D, h, I, R, l.fc2, /*accumulate=*/true, act_);
  kernels::add_rows(s, x, D, R, l.fc2_b.data, l.fc2_b.dtype, D, 1);
}

}  // namespace corral
