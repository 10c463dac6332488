// parse_config / load_config: a valid config.json (flat and nested under text_config) and
// missing, ill-typed and inconsistent fields, each a ConfigError naming the source and the field.
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "check.h"
#include "corral/config.h"
#include "corral/error.h"

using corral::parse_config;

namespace {

// The text fields of tests/checkpoint_files.py's TEXT_KW, without the braces; `extra` is added last.
std::string fields(const std::string& extra = "") {
  return R"("vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "intermediate_size_mlp": 24,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "num_local_experts": 4, "interleave_moe_layer_step": 2, "attention_chunk_size": 4, "floor_scale": 2,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "eos_token_id": [1, 2])" +
         extra;
}

std::string flat(const std::string& extra = "") { return "{" + fields(extra) + "}"; }

// parse_config(text) throws ConfigError with each fragment in its message.
void check_error(const std::string& text, const std::string& fragment, const std::string& fragment2 = "src.json") {
  CHECK_THROWS(corral::ConfigError, parse_config(text, "src.json"), fragment);
  CHECK_THROWS(corral::ConfigError, parse_config(text, "src.json"), fragment2);
}

void valid_flat() {
  const corral::ModelConfig c = parse_config(flat(), "src.json");
  CHECK(c.source == "src.json" && !c.multimodal);
  CHECK(c.vocab_size == 64 && c.hidden_size == 32 && c.intermediate_size == 16 && c.intermediate_size_mlp == 24);
  CHECK(c.num_layers == 4 && c.num_heads == 4 && c.num_kv_heads == 2 && c.head_dim == 8);
  CHECK(c.num_experts == 4 && c.top_k == 1 && c.attention_chunk_size == 4 && c.floor_scale == 2.f);
  CHECK(c.rope.type == corral::RopeParams::Type::Llama3 && c.rope.theta == 10000.0 && c.rope.factor == 8.0);
  CHECK(c.rope.high_freq_factor == 4.0 && c.rope.original_max_position_embeddings == 16);
  CHECK(c.eos_token_ids == std::vector<int64_t>({1, 2}) && c.bos_token_id == -1);
  CHECK(c.max_position_embeddings == 131072 && !c.tie_word_embeddings);  // transformers' defaults
  CHECK(c.layers.size() == 4);
  for (int i = 0; i < 4; ++i) {
    const corral::LayerSpec& s = c.layers[i];
    const bool nope = i == 3;  // every 4th layer (no_rope_layer_interval)
    CHECK(s.use_rope == !nope && s.chunked == !nope && s.qk_norm == !nope && s.temperature_tuning == nope);
    CHECK(s.moe == (i % 2 == 1));  // interleave_moe_layer_step 2
  }
}

void valid_nested_and_explicit_lists() {
  const std::string text = R"({"tie_word_embeddings": true, "text_config": {)" +
                           fields(R"(, "no_rope_layers": [1, 0, 1, 0], "moe_layers": [0],
                                    "layer_types": ["full_attention", "full_attention", "chunked_attention", "full_attention"],
                                    "use_qk_norm": false, "attn_temperature_tuning": 4, "eos_token_id": 7)") +
                           "}}";
  const corral::ModelConfig c = parse_config(text, "src.json");
  CHECK(c.multimodal && c.tie_word_embeddings);
  CHECK(c.eos_token_ids == std::vector<int64_t>({7}));
  CHECK(c.layers.size() == 4);
  CHECK(c.layers[0].use_rope && !c.layers[1].use_rope && !c.layers[0].chunked && c.layers[2].chunked);
  CHECK(c.layers[0].moe && !c.layers[1].moe);
  CHECK(!c.layers[0].qk_norm && c.layers[1].temperature_tuning && !c.layers[0].temperature_tuning);
}

void missing_fields() {
  for (const char* field : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"}) {
    std::string text = flat();
    const size_t at = text.find(std::string("\"") + field + "\"");
    text.erase(at, text.find(',', at) + 1 - at);
    check_error(text, std::string("'") + field + "' in src.json is missing");
  }
  check_error(R"({"text_config": {"vocab_size": 64}})", "'text_config.hidden_size'");
  check_error(flat(R"(, "rope_scaling": null, "rope_parameters": {"rope_type": "llama3", "factor": 8.0})"),
              "'rope_parameters.low_freq_factor'", "required by llama3");
}

void ill_typed_fields() {
  check_error(flat(R"(, "vocab_size": "64")"), "'vocab_size'", "must be an integer, got \"64\"");
  check_error(flat(R"(, "hidden_size": 32.5)"), "'hidden_size'", "must be an integer");
  check_error(flat(R"(, "num_hidden_layers": 0)"), "'num_hidden_layers'", "got 0");
  check_error(flat(R"(, "rms_norm_eps": "small")"), "'rms_norm_eps'", "got \"small\"");
  check_error(flat(R"(, "use_qk_norm": "yes")"), "'use_qk_norm'", "must be a boolean");
  check_error(flat(R"(, "moe_layers": [1, "2"])"), "'moe_layers'", "list of integers");
  check_error(flat(R"(, "moe_layers": 1)"), "'moe_layers'", "list of integers");
  check_error(flat(R"(, "moe_layers": [4])"), "'moe_layers'", "outside [0, 4)");
  check_error(flat(R"(, "no_rope_layers": [1, 1])"), "'no_rope_layers'", "2 entries for 4 layers");
  check_error(flat(R"(, "layer_types": ["full_attention"])"), "'layer_types'", "each of the 4 layers");
  check_error(flat(R"(, "layer_types": ["sliding", "sliding", "sliding", "sliding"])"), "'layer_types'", "\"sliding\"");
  check_error(flat(R"(, "rope_parameters": [1])"), "'rope_parameters'", "must be an object");
  check_error(flat(R"(, "rope_parameters": {"rope_type": "yarn"})"), "'rope_parameters.rope_type'", "'yarn'");
  check_error(flat(R"(, "rope_parameters": {"rope_type": 3})"), "'rope_parameters.rope_type'", "must be a string");
  check_error(flat(R"(, "num_key_value_heads": 3)"), "'num_attention_heads'", "multiple of num_key_value_heads");
  check_error(flat(R"(, "head_dim": 7)"), "'head_dim'", "must be even");
  check_error(flat(R"(, "num_experts_per_tok": 5)"), "'num_experts_per_tok'", "exceeds num_local_experts");
  check_error(R"({"text_config": 3})", "'text_config'", "must be an object");
  check_error("{\"vocab_size\": ", "not valid JSON");
  check_error("[1, 2]", "must hold a JSON object");
  // Messages must be UTF-8 (Python decodes them so), also when cut short: here, ASCII.
  std::string accents;
  for (int i = 0; i < 40; ++i) accents += "\xc3\xa9";  // e acute
  for (const std::string& text : {flat(R"(, "vocab_size": ")" + std::string(59, 'a') + accents + "\""),
                                  std::string("{\"vocab_size\": \xbe")}) {
    try {
      parse_config(text, "src.json");
      check::fail(__FILE__, __LINE__, "no ConfigError");
    } catch (const corral::ConfigError& e) {
      for (const char* p = e.what(); *p; ++p) CHECK(static_cast<unsigned char>(*p) < 0x80);
    }
  }
}

void load_from_files() {
  char dir[] = "/tmp/corral-test-config-XXXXXX";
  if (!mkdtemp(dir)) return check::fail(__FILE__, __LINE__, "mkdtemp");
  const std::string path = std::string(dir) + "/config.json";
  std::ofstream(path) << flat();
  CHECK(corral::load_config(path).source == path);
  CHECK_THROWS(corral::FileMissingError, corral::load_config(std::string(dir) + "/absent.json"), "absent.json");
  CHECK_THROWS(corral::FileMissingError, corral::load_config(dir), "not a file");
  std::ofstream(path) << "{";
  CHECK_THROWS(corral::ConfigError, corral::load_config(path), path);
  std::filesystem::remove_all(dir);
}

// A multimodal config: text_config plus `vision` as vision_config (its fields without braces).
std::string multimodal(const std::string& vision, const std::string& top = "") {
  return R"({"text_config": {)" + fields() + R"(}, "vision_config": {)" + vision + "}" + top + "}";
}

const char* kVision = R"("hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 256, "image_size": 56, "patch_size": 14, "projector_input_dim": 48,
    "projector_output_dim": 48, "vision_output_dim": 48)";

// kVision with `field` set to `value` (added if absent).
std::string vision_with(const std::string& field, const std::string& value) {
  std::string v = kVision;
  const size_t at = v.find("\"" + field + "\"");
  if (at == std::string::npos) return v + ", \"" + field + "\": " + value;
  const size_t end = v.find_first_of(",", at);
  return v.substr(0, at) + "\"" + field + "\": " + value + (end == std::string::npos ? "" : v.substr(end));
}

void vision_config() {
  CHECK(!parse_config(flat(), "src.json").has_vision());
  const corral::ModelConfig c = parse_config(multimodal(kVision, R"(, "image_token_index": 60)"), "src.json");
  CHECK(c.has_vision() && c.vision.head_dim == 16 && c.vision.grid() == 4 && c.vision.shuffle == 2);
  CHECK(c.vision.tokens_per_tile() == 4 && c.vision.tile_floats() == 3 * 56 * 56 && c.vision.projector_dim == 48);
  CHECK(c.vision.image_token_id == 60 && c.vision.rope_theta == 10000.f);
  // An image token outside the vocabulary (the default 200092 here) loads: images are refused later.
  CHECK(parse_config(multimodal(kVision), "src.json").vision.image_token_id == -1);
  // pixel_shuffle_ratio 0.25: four by four patches fold into a token 16 times as wide.
  std::string quarter = vision_with("intermediate_size", "1024");
  quarter += R"(, "pixel_shuffle_ratio": 0.25)";
  const corral::ModelConfig q = parse_config(multimodal(quarter), "src.json");
  CHECK(q.vision.shuffle == 4 && q.vision.tokens_per_tile() == 1);
}

void vision_config_errors() {
  check_error(multimodal(vision_with("intermediate_size", "128")), "vision_config.intermediate_size");
  check_error(multimodal(vision_with("num_attention_heads", "32")), "multiple of 4");  // head_dim 2
  check_error(multimodal(vision_with("pixel_shuffle_ratio", "0.3")), "vision_config.pixel_shuffle_ratio");
  check_error(multimodal(vision_with("patch_size", "15")), "vision_config.image_size");
  check_error(multimodal(vision_with("vision_output_dim", "40")), "vision_config.vision_output_dim");
  check_error(R"({"text_config": {)" + fields() + R"(}, "vision_config": 5})", "vision_config");
}

}  // namespace

int main() {
  vision_config();
  vision_config_errors();
  valid_flat();
  valid_nested_and_explicit_lists();
  missing_fields();
  ill_typed_fields();
  load_from_files();
  return check::result();
}
