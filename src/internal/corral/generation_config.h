// What a model folder sets for generation besides the weights, read in C++ so that a C++ service
// and the Python layer get the same tokens from the same request (vLLM reads the same files).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "corral/config.h"
#include "corral/engine.h"

namespace corral {

struct GenerationDefaults {
  // Tokens that end a sample unless SamplingParams::ignore_eos, sorted: config.json's eos ids,
  // generation_config.json's eos_token_id, and the tokenizer's eos_token and end-of-turn tokens
  // (<|eot|>, <|eom|>, <|end_of_text|>, <|eot_id|>, <|eom_id|>) where its vocabulary has them.
  std::vector<int32_t> stop_token_ids;
  // SamplingParams{} with generation_config.json's temperature, top_k (-1: all), top_p, min_p,
  // repetition_penalty and max_new_tokens (as max_tokens).
  SamplingParams sampling;
};

// Reads <model_dir>/generation_config.json and the tokenizer files of <tokenizer_dir>
// (tokenizer.json, tokenizer_config.json, special_tokens_map.json); absent files add nothing.
// Throws ConfigError naming the file and field for a value of the wrong type or range.
GenerationDefaults load_generation_defaults(const std::string& model_dir, const std::string& tokenizer_dir,
                                            const ModelConfig& config);

}  // namespace corral
