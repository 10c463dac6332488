#include "corral/config.h"

#include <cmath>

#include <nlohmann/json.hpp>

#include "corral/error.h"
#include "json_text.h"

namespace corral {

namespace {

using json = nlohmann::json;

constexpr int64_t kMaxSize = (int64_t(1) << 31) - 1;

// Reads fields of one JSON object; every error names the source file and the field's full path.
struct Fields {
  const json& obj;
  std::string source;
  std::string prefix;  // "text_config." for the nested layout

  std::string where(const std::string& key) const {
    return "config field '" + prefix + key + "' in " + source;
  }
  bool has(const std::string& key) const { return obj.contains(key) && !obj.at(key).is_null(); }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw ConfigError(where(key) + " " + what);
  }

  int64_t integer(const std::string& key) const {
    if (!obj.contains(key)) fail(key, "is missing");
    const json& v = obj.at(key);
    if (!v.is_number_integer()) fail(key, "must be an integer, got " + describe_json(v));
    return v.get<int64_t>();
  }
  int64_t integer(const std::string& key, int64_t fallback) const {
    return has(key) ? integer(key) : fallback;
  }
  // Sizes and counts: positive, and below 2^31 so that products of two stay far from overflow.
  int64_t positive(const std::string& key) const {
    const int64_t v = integer(key);
    if (v <= 0 || v > kMaxSize) fail(key, "must be positive and below 2^31, got " + std::to_string(v));
    return v;
  }
  int64_t positive(const std::string& key, int64_t fallback) const {
    return has(key) ? positive(key) : fallback;
  }
  double number(const std::string& key, double fallback) const {
    if (!has(key)) return fallback;
    const json& v = obj.at(key);
    if (!v.is_number() || !std::isfinite(v.get<double>())) fail(key, "must be a finite number, got " + describe_json(v));
    return v.get<double>();
  }
  // transformers treats any truthy value as on (4.51-era files carry the integer 4).
  bool flag(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = obj.at(key);
    if (v.is_boolean()) return v.get<bool>();
    if (v.is_number()) return v.get<double>() != 0.0;
    fail(key, "must be a boolean, got " + describe_json(v));
  }
  // A list of integers (empty when absent, null or []).
  std::vector<int64_t> integers(const std::string& key) const {
    std::vector<int64_t> out;
    if (!has(key)) return out;
    const json& v = obj.at(key);
    if (!v.is_array()) fail(key, "must be a list of integers, got " + describe_json(v));
    for (const json& e : v) {
      if (!e.is_number_integer()) fail(key, "must be a list of integers, got element " + describe_json(e));
      out.push_back(e.get<int64_t>());
    }
    return out;
  }
};

// RoPE settings in any of the three spellings: rope_parameters (transformers 5), rope_scaling
// plus a top-level rope_theta (Meta's published files), or rope_theta alone.
RopeParams read_rope(const Fields& f, int64_t max_position_embeddings) {
  RopeParams p;
  const double theta = f.number("rope_theta", 500000.0);
  const char* key = f.has("rope_parameters") ? "rope_parameters" : f.has("rope_scaling") ? "rope_scaling" : nullptr;
  if (!(theta > 0)) f.fail("rope_theta", "must be positive");
  p.theta = theta;
  if (!key) return p;
  const json& r = f.obj.at(key);
  if (!r.is_object()) f.fail(key, "must be an object, got " + describe_json(r));
  const Fields rf{r, f.source, f.prefix + key + "."};
  p.theta = rf.number("rope_theta", theta);
  if (!(p.theta > 0)) rf.fail("rope_theta", "must be positive");
  std::string type = "default";
  const char* type_key = rf.has("rope_type") ? "rope_type" : "type";  // older files write "type"
  if (rf.has(type_key)) {
    if (!r.at(type_key).is_string()) rf.fail(type_key, "must be a string, got " + describe_json(r.at(type_key)));
    type = r.at(type_key).get<std::string>();
  }
  if (type == "default") return p;
  if (type != "llama3")
    rf.fail(type_key, "is '" + type + "', which Corral does not support (default, llama3)");
  p.type = RopeParams::Type::Llama3;
  for (const char* k : {"factor", "low_freq_factor", "high_freq_factor"})
    if (!rf.has(k)) rf.fail(k, "is missing (required by llama3 RoPE scaling)");
  p.factor = rf.number("factor", 1.0);
  p.low_freq_factor = rf.number("low_freq_factor", 1.0);
  p.high_freq_factor = rf.number("high_freq_factor", 1.0);
  p.original_max_position_embeddings =
      rf.number("original_max_position_embeddings", double(max_position_embeddings));
  if (p.factor <= 0 || p.low_freq_factor <= 0 || p.high_freq_factor <= 0)
    rf.fail("factor", "and the frequency factors must be positive");
  return p;
}

ModelConfig read_text_config(const Fields& f, const Fields& top) {
  ModelConfig c;
  c.vocab_size = f.positive("vocab_size");
  c.hidden_size = f.positive("hidden_size");
  c.intermediate_size = f.positive("intermediate_size");
  c.num_layers = f.positive("num_hidden_layers");
  c.num_heads = f.positive("num_attention_heads");
  // Defaults below are transformers' Llama4TextConfig defaults for a field that is absent.
  c.num_kv_heads = f.obj.contains("num_key_value_heads") && f.obj.at("num_key_value_heads").is_null()
                       ? c.num_heads
                       : f.positive("num_key_value_heads", 8);
  c.head_dim = f.obj.contains("head_dim") && f.obj.at("head_dim").is_null()
                   ? c.hidden_size / c.num_heads
                   : f.positive("head_dim", 128);
  if (c.head_dim <= 0)
    f.fail("head_dim", "is null and hidden_size (" + std::to_string(c.hidden_size) +
                           ") / num_attention_heads (" + std::to_string(c.num_heads) + ") is 0");
  c.intermediate_size_mlp = f.positive("intermediate_size_mlp", 16384);
  c.num_experts = f.positive("num_local_experts", 16);
  c.top_k = f.positive("num_experts_per_tok", 1);
  c.rms_norm_eps = float(f.number("rms_norm_eps", 1e-5));
  if (!(c.rms_norm_eps > 0)) f.fail("rms_norm_eps", "must be positive");
  c.max_position_embeddings = f.positive("max_position_embeddings", 131072);
  c.attention_chunk_size = f.obj.contains("attention_chunk_size") ? (f.has("attention_chunk_size") ? f.positive("attention_chunk_size") : 0) : 8192;
  c.floor_scale = float(f.number("floor_scale", 8192.0));
  c.attn_scale = float(f.number("attn_scale", 0.1));
  c.rope = read_rope(f, c.max_position_embeddings);
  c.tie_word_embeddings = f.flag("tie_word_embeddings", false) || top.flag("tie_word_embeddings", false);
  c.bos_token_id = f.integer("bos_token_id", -1);
  if (f.has("eos_token_id")) {
    const json& e = f.obj.at("eos_token_id");
    c.eos_token_ids = e.is_array() ? f.integers("eos_token_id") : std::vector<int64_t>{f.integer("eos_token_id")};
  }
  // Token ids index logits rows: one outside the vocabulary would write outside them.
  const auto in_vocab = [&](const char* key, int64_t id) {
    if (id < 0 || id >= c.vocab_size)
      f.fail(key, "holds " + std::to_string(id) + ", outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  };
  for (int64_t id : c.eos_token_ids) in_vocab("eos_token_id", id);
  if (c.bos_token_id != -1) in_vocab("bos_token_id", c.bos_token_id);

  if (c.num_heads % c.num_kv_heads != 0)
    f.fail("num_attention_heads", "(" + std::to_string(c.num_heads) + ") must be a multiple of num_key_value_heads (" +
                                      std::to_string(c.num_kv_heads) + ")");
  if (c.head_dim % 2 != 0) f.fail("head_dim", "must be even for RoPE, got " + std::to_string(c.head_dim));
  if (c.top_k > c.num_experts)
    f.fail("num_experts_per_tok", "(" + std::to_string(c.top_k) + ") exceeds num_local_experts (" +
                                      std::to_string(c.num_experts) + ")");
  if (!(c.floor_scale > 0)) f.fail("floor_scale", "must be positive");

  // Per-layer schedule, as Llama4TextConfig.__post_init__ derives it.
  const int64_t L = c.num_layers;
  std::vector<int64_t> rope_flags = f.integers("no_rope_layers");
  if (rope_flags.empty()) {
    const int64_t interval = f.positive("no_rope_layer_interval", 4);
    for (int64_t i = 0; i < L; ++i) rope_flags.push_back((i + 1) % interval != 0 ? 1 : 0);
  }
  if (int64_t(rope_flags.size()) < L)
    f.fail("no_rope_layers", "has " + std::to_string(rope_flags.size()) + " entries for " + std::to_string(L) + " layers");

  std::vector<int64_t> moe_layers;
  if (f.has("moe_layers")) {
    moe_layers = f.integers("moe_layers");
  } else {
    const int64_t step = f.positive("interleave_moe_layer_step", 1);
    for (int64_t i = step - 1; i < L; i += step) moe_layers.push_back(i);
  }
  for (int64_t i : moe_layers)
    if (i < 0 || i >= L) f.fail("moe_layers", "lists layer " + std::to_string(i) + ", outside [0, " + std::to_string(L) + ")");

  std::vector<std::string> layer_types;
  if (f.has("layer_types")) {
    const json& v = f.obj.at("layer_types");
    if (!v.is_array() || int64_t(v.size()) < L) f.fail("layer_types", "must list a type for each of the " + std::to_string(L) + " layers");
    for (const json& t : v) {
      if (!t.is_string() || (t != "chunked_attention" && t != "full_attention"))
        f.fail("layer_types", "has " + describe_json(t) + " (chunked_attention or full_attention expected)");
      layer_types.push_back(t.get<std::string>());
    }
  }

  const bool qk_norm = f.flag("use_qk_norm", true);
  const bool tuning = f.flag("attn_temperature_tuning", true);
  c.layers.resize(L);
  for (int64_t i = 0; i < L; ++i) {
    LayerSpec& s = c.layers[i];
    s.use_rope = rope_flags[i] != 0;
    s.chunked = layer_types.empty() ? (s.use_rope && c.attention_chunk_size > 0) : layer_types[i] == "chunked_attention";
    if (s.chunked && c.attention_chunk_size <= 0)
      f.fail("attention_chunk_size", "must be set: layer " + std::to_string(i) + " is chunked_attention");
    s.qk_norm = qk_norm && s.use_rope;
    s.temperature_tuning = tuning && !s.use_rope;
  }
  for (int64_t i : moe_layers) c.layers[i].moe = true;
  return c;
}

// vision_config, checked for the shapes Llama 4's vision tower is built with.
VisionConfig read_vision_config(const Fields& f, const Fields& top, int64_t vocab_size) {
  VisionConfig v;
  v.hidden_size = f.positive("hidden_size", 768);
  v.num_layers = f.positive("num_hidden_layers", 34);
  v.num_heads = f.positive("num_attention_heads", 16);
  v.intermediate_size = f.positive("intermediate_size", 5632);
  v.image_size = f.positive("image_size", 448);
  v.patch_size = f.positive("patch_size", 14);
  v.num_channels = f.positive("num_channels", 3);
  v.projector_dim = f.positive("projector_input_dim", 4096);
  v.rope_theta = float(f.has("rope_parameters") && f.obj.at("rope_parameters").is_object()
                           ? Fields{f.obj.at("rope_parameters"), f.source, f.prefix + "rope_parameters."}.number("rope_theta", 10000.0)
                           : f.number("rope_theta", 10000.0));
  const double ratio = f.number("pixel_shuffle_ratio", 0.5);
  v.shuffle = ratio > 0 ? int64_t(std::lround(1.0 / ratio)) : 0;
  if (v.shuffle < 1 || std::abs(1.0 / double(v.shuffle) - ratio) > 1e-9)
    f.fail("pixel_shuffle_ratio", "must be 1 / s for a whole s, got " + std::to_string(ratio));
  if (v.hidden_size % v.num_heads != 0)
    f.fail("hidden_size", "(" + std::to_string(v.hidden_size) + ") must be a multiple of num_attention_heads (" +
                              std::to_string(v.num_heads) + ")");
  v.head_dim = v.hidden_size / v.num_heads;
  if (v.head_dim % 4 != 0) f.fail("num_attention_heads", "gives head_dim " + std::to_string(v.head_dim) + ", which 2-D RoPE needs a multiple of 4");
  if (v.image_size % v.patch_size != 0)
    f.fail("image_size", "(" + std::to_string(v.image_size) + ") must be a multiple of patch_size (" + std::to_string(v.patch_size) + ")");
  if (v.grid() % v.shuffle != 0)
    f.fail("pixel_shuffle_ratio", "cannot fold a grid of " + std::to_string(v.grid()) + " patches by " + std::to_string(v.shuffle));
  if (v.intermediate_size != v.hidden_size * v.shuffle * v.shuffle)
    f.fail("intermediate_size", "(" + std::to_string(v.intermediate_size) + ") must be hidden_size * " +
                                    std::to_string(v.shuffle * v.shuffle) + " = " +
                                    std::to_string(v.hidden_size * v.shuffle * v.shuffle) + ", the pixel shuffle's output width");
  for (const char* key : {"projector_output_dim", "vision_output_dim"})
    if (f.positive(key, key[0] == 'p' ? 4096 : 7680) != v.projector_dim)
      f.fail(key, "must equal projector_input_dim (" + std::to_string(v.projector_dim) + ")");
  // Checked when an image comes (a text-only use of a checkpoint with a stray id still loads).
  const int64_t id = top.has("image_token_index") ? top.integer("image_token_index") : top.integer("image_token_id", 200092);
  v.image_token_id = id >= 0 && id < vocab_size ? int32_t(id) : -1;
  return v;
}

}  // namespace

ModelConfig parse_config(const std::string& json_text, const std::string& source) {
  const json root = parse_json<ConfigError>(json_text.data(), json_text.data() + json_text.size(), source);
  if (!root.is_object()) throw ConfigError(source + " must hold a JSON object");
  const Fields top{root, source, ""};
  const bool nested = root.contains("text_config");
  if (nested && !root.at("text_config").is_object())
    top.fail("text_config", "must be an object, got " + describe_json(root.at("text_config")));
  const Fields text = nested ? Fields{root.at("text_config"), source, "text_config."} : top;
  ModelConfig c = read_text_config(text, top);
  c.source = source;
  c.multimodal = nested;
  if (root.contains("vision_config") && !root.at("vision_config").is_null()) {
    if (!root.at("vision_config").is_object())
      top.fail("vision_config", "must be an object, got " + describe_json(root.at("vision_config")));
    c.vision = read_vision_config(Fields{root.at("vision_config"), source, "vision_config."}, top, c.vocab_size);
  }
  return c;
}

ModelConfig load_config(const std::string& path) { return parse_config(read_text_file(path, "model config"), path); }

}  // namespace corral
