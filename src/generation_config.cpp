#include "corral/generation_config.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>

#include <nlohmann/json.hpp>

#include "corral/error.h"
#include "json_text.h"

namespace corral {

namespace {

using json = nlohmann::json;

// Tokens that end a turn or a text in Llama 4 (and Llama 3) vocabularies.
const char* const kEndTokens[] = {"<|eot|>", "<|eom|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"};

// The JSON object in `path`, or an empty one when there is no such file.
json optional_object(const std::string& path) {
  if (!is_file(path)) return json::object();
  json doc = read_json_file<ConfigError>(path, "file");
  if (!doc.is_object()) throw ConfigError(path + " must hold a JSON object, got " + describe_json(doc));
  return doc;
}

[[noreturn]] void bad_field(const std::string& path, const std::string& key, const std::string& what, const json& v) {
  throw ConfigError("field '" + key + "' in " + path + " must be " + what + ", got " + describe_json(v));
}

bool is_integer(const json& v) { return v.is_number_integer(); }

// A token in tokenizer_config.json: a string or a serialized AddedToken {"content": ...}.
std::optional<std::string> token_content(const json& v, const std::string& path, const std::string& key) {
  if (v.is_null()) return std::nullopt;
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v.at("content").is_string()) return v.at("content").get<std::string>();
  bad_field(path, key, "a token (a string or an object with 'content')", v);
}

// Token ids by content, as the tokenizer assigns them: tokenizer.json's added tokens and
// vocabulary, and tokenizer_config.json's added_tokens_decoder.
struct Vocabulary {
  json tokenizer, config;
  std::optional<int64_t> id(const std::string& content) const {
    if (tokenizer.contains("added_tokens") && tokenizer.at("added_tokens").is_array())
      for (const json& t : tokenizer.at("added_tokens"))
        if (t.is_object() && t.value("content", json()) == content && t.contains("id") && is_integer(t.at("id")))
          return t.at("id").get<int64_t>();
    if (config.contains("added_tokens_decoder") && config.at("added_tokens_decoder").is_object())
      for (const auto& [key, t] : config.at("added_tokens_decoder").items())
        if (t.is_object() && t.value("content", json()) == content) {
          char* end = nullptr;
          const long long i = std::strtoll(key.c_str(), &end, 10);
          if (end && *end == '\0' && !key.empty()) return int64_t(i);
        }
    if (tokenizer.contains("model") && tokenizer.at("model").is_object()) {
      const json& model = tokenizer.at("model");
      if (model.contains("vocab") && model.at("vocab").is_object()) {
        const json& vocab = model.at("vocab");
        const auto it = vocab.find(content);
        if (it != vocab.end() && is_integer(*it)) return it->get<int64_t>();
      }
    }
    return std::nullopt;
  }
};

// generation_config.json's sampling fields onto SamplingParams{}, checked as SamplingParams are.
SamplingParams sampling_defaults(const json& g, const std::string& path) {
  SamplingParams p;
  const auto number = [&](const char* key, float& out, auto ok, const char* what) {
    if (!g.contains(key) || g.at(key).is_null()) return;
    const json& v = g.at(key);
    if (!v.is_number() || !std::isfinite(v.get<double>()) || !ok(v.get<double>())) bad_field(path, key, what, v);
    out = float(v.get<double>());
  };
  number("temperature", p.temperature, [](double x) { return x >= 0; }, "a number >= 0");
  number("top_p", p.top_p, [](double x) { return x > 0 && x <= 1; }, "a number in (0, 1]");
  number("min_p", p.min_p, [](double x) { return x >= 0 && x <= 1; }, "a number in [0, 1]");
  number("repetition_penalty", p.repetition_penalty, [](double x) { return x > 0; }, "a number > 0");
  if (g.contains("top_k") && !g.at("top_k").is_null()) {
    const json& v = g.at("top_k");
    if (!is_integer(v) || v.get<int64_t>() < -1) bad_field(path, "top_k", "an integer >= -1 (-1 or 0: all tokens)", v);
    p.top_k = std::max<int64_t>(v.get<int64_t>(), 0);
  }
  if (g.contains("max_new_tokens") && !g.at("max_new_tokens").is_null()) {
    const json& v = g.at("max_new_tokens");
    if (!is_integer(v) || v.get<int64_t>() < 1) bad_field(path, "max_new_tokens", "an integer >= 1", v);
    p.max_tokens = v.get<int64_t>();
  }
  return p;
}

}  // namespace

GenerationDefaults load_generation_defaults(const std::string& model_dir, const std::string& tokenizer_dir,
                                            const ModelConfig& config) {
  GenerationDefaults d;
  const int64_t vocab = config.vocab_size;
  std::vector<int64_t> ids(config.eos_token_ids.begin(), config.eos_token_ids.end());

  const std::string gen_path = model_dir + "/generation_config.json";
  const json gen = optional_object(gen_path);
  d.sampling = sampling_defaults(gen, gen_path);
  if (gen.contains("eos_token_id") && !gen.at("eos_token_id").is_null()) {
    const json& v = gen.at("eos_token_id");
    const bool ok = is_integer(v) || (v.is_array() && std::all_of(v.begin(), v.end(), is_integer));
    if (!ok) bad_field(gen_path, "eos_token_id", "a token id or a list of them", v);
    if (v.is_array())
      for (const json& i : v) ids.push_back(i.get<int64_t>());
    else
      ids.push_back(v.get<int64_t>());
  }

  // The tokenizer's eos_token (tokenizer_config.json, or the legacy special_tokens_map.json
  // where the former has no added_tokens_decoder, as transformers reads them) and end tokens.
  const std::string config_path = tokenizer_dir + "/tokenizer_config.json";
  const std::string map_path = tokenizer_dir + "/special_tokens_map.json";
  Vocabulary v{optional_object(tokenizer_dir + "/tokenizer.json"), optional_object(config_path)};
  std::vector<std::string> contents(std::begin(kEndTokens), std::end(kEndTokens));
  const json legacy = v.config.contains("added_tokens_decoder") ? json::object() : optional_object(map_path);
  const bool from_config = v.config.contains("eos_token");
  const json& holder = from_config ? v.config : legacy;
  if (holder.contains("eos_token"))
    if (auto eos = token_content(holder.at("eos_token"), from_config ? config_path : map_path, "eos_token"))
      contents.push_back(*eos);
  for (const std::string& c : contents)
    if (auto id = v.id(c)) ids.push_back(*id);

  for (int64_t i : ids)
    if (i >= 0 && i < vocab) d.stop_token_ids.push_back(int32_t(i));
  std::sort(d.stop_token_ids.begin(), d.stop_token_ids.end());
  d.stop_token_ids.erase(std::unique(d.stop_token_ids.begin(), d.stop_token_ids.end()), d.stop_token_ids.end());
  return d;
}

}  // namespace corral
