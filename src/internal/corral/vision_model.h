// Llama 4's vision tower: image tiles in, one text-width embedding per <|patch|> token out
// (transformers' Llama4VisionModel followed by Llama4MultiModalProjector).
#pragma once

#include <vector>

#include "corral/config.h"
#include "corral/device.h"
#include "corral/kernels/linear.h"
#include "corral/weights.h"

namespace corral {

class VisionModel {
 public:
  // Runs on `stream`'s device, where `weights` are (load_vision_weights with the same stream).
  VisionModel(const ModelConfig& config, VisionWeights weights, kernels::Activations act, const Stream& stream = {});

  const VisionConfig& config() const { return c_; }
  int64_t bytes() const { return w_.bytes; }

  // pixels: [tiles, channels, image_size, image_size] float32, as the image processor gives them.
  // out: [tiles * tokens_per_tile, text hidden_size], tile after tile. Tiles never see each other.
  // Both in host memory, whichever device runs the tower.
  void encode(const float* pixels, int64_t tiles, float* out);

 private:
  // Tiles [0, tiles) of one pass (at most kTilesPerPass): activations scale with them.
  void encode_pass(const float* pixels, int64_t tiles, float* out);
  void layer(const VisionLayerWeights& l, int64_t tiles);

  VisionConfig c_;
  int64_t text_hidden_;
  VisionWeights w_;
  kernels::Activations act_;
  Stream stream_;
  std::vector<float> inv_freq_;       // [head_dim / 4]
  std::vector<int32_t> pos_x_, pos_y_;  // per row of a pass: column + 1 and row + 1; 0 for CLS
  // The same on a GPU (unused on the CPU); the pixels and features of a pass there; the
  // activations of a pass.
  DeviceArray<float> inv_freq_on_, pixels_, out_;
  DeviceArray<int32_t> pos_x_on_, pos_y_on_;
  DeviceArray<float> x_, a_, q_, k_, v_, attn_, h_;
};

}  // namespace corral
