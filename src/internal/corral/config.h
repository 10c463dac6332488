// A Llama 4 text model's configuration, read from a Hugging Face config.json, then plain data.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "corral/kernels/rope.h"

namespace corral {

// What one decoder layer does, derived from the config's per-layer lists.
struct LayerSpec {
  bool use_rope = true;            // no_rope_layers[i] == 1; NoPE layers have 0
  bool chunked = false;            // layer_types[i] == "chunked_attention": local attention
  bool qk_norm = false;            // use_qk_norm on a RoPE layer
  bool temperature_tuning = false;  // attn_temperature_tuning on a NoPE layer
  bool moe = false;                // in moe_layers; dense SwiGLU MLP otherwise
};

// The vision encoder of a Llama4ForConditionalGeneration checkpoint (config.json's vision_config,
// with transformers' Llama4VisionConfig defaults), and the token its features replace.
struct VisionConfig {
  int64_t hidden_size = 0;  // 0: the checkpoint has no vision encoder
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;           // hidden_size / num_heads
  int64_t intermediate_size = 0;  // the encoder MLP's width, and the adapter's input (s^2 * hidden)
  int64_t image_size = 0;         // tile side in pixels
  int64_t patch_size = 0;
  int64_t num_channels = 3;
  int64_t shuffle = 2;            // the pixel shuffle's factor s = 1 / pixel_shuffle_ratio
  int64_t projector_dim = 0;      // projector_input_dim = projector_output_dim = vision_output_dim
  float rope_theta = 10000.f;
  int32_t image_token_id = -1;    // image_token_index (<|patch|>), whose embeddings the features replace; -1: outside the vocabulary

  int64_t grid() const { return image_size / patch_size; }                          // patches per side
  int64_t tokens_per_tile() const { return grid() * grid() / (shuffle * shuffle); }  // features per tile
  int64_t tile_floats() const { return num_channels * image_size * image_size; }
};

struct ModelConfig {
  std::string source;       // the config.json it was read from
  bool multimodal = false;  // Llama4ForConditionalGeneration: the text model is under text_config

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // each routed expert and the shared expert
  int64_t intermediate_size_mlp = 0;  // the dense (non-MoE) layers
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t num_experts = 0;
  int64_t top_k = 1;
  float rms_norm_eps = 1e-5f;

  RopeParams rope;
  int64_t attention_chunk_size = 0;  // 0: no chunked layers
  float floor_scale = 8192.f;
  float attn_scale = 0.1f;

  bool tie_word_embeddings = false;
  int64_t max_position_embeddings = 0;
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  std::vector<LayerSpec> layers;

  VisionConfig vision;  // vision.hidden_size == 0 for text-only checkpoints
  bool has_vision() const { return vision.hidden_size > 0; }
};

// Reads <path> (a config.json). Fields absent from the file take transformers' defaults, except
// the sizes that shape the weights, which are required. Throws FileMissingError or ConfigError
// naming the file and the field.
ModelConfig load_config(const std::string& path);

// The same from JSON text; `source` names it in errors.
ModelConfig parse_config(const std::string& json_text, const std::string& source);

}  // namespace corral
