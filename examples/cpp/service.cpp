// A small token service on Corral's public C++ API: JSON-lines requests on stdin, run
// concurrently through corral::AsyncEngine, each token written as a JSON line as it is generated.
//
//   corral_service MODEL_DIR [--threads N] < requests.jsonl > tokens.jsonl
//
// A request line: {"id": "a", "prompt_token_ids": [1, 2, 3], "max_tokens": 16, ...} with any of
// SamplingParams' fields (n, temperature, top_k, top_p, min_p, repetition_penalty,
// presence_penalty, frequency_penalty, max_tokens, min_tokens, ignore_eos, stop_token_ids, seed);
// absent fields take the model's defaults (generation_config.json), as in Corral's Python API.
// {"id": "a", "abort": true} aborts request "a". Requests start as their lines are read, while
// earlier ones run.
//
// Output lines: {"id": "a", "index": 0, "token": 123} per token, then
// {"id": "a", "index": 0, "finish_reason": "length"} when sample 0 ends; a line that cannot be
// served gets {"id": ..., "error": "..."}. The process exits when stdin ends and every request
// has finished.
#include <corral/corral.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

using json = nlohmann::json;

namespace {

std::mutex out_mutex;  // one line at a time, whichever thread writes it

void emit(const json& line) {
  const std::string text = line.dump();
  const std::lock_guard<std::mutex> lock(out_mutex);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

// The request's fields over the model's defaults; an unknown field is an error (a typo would
// otherwise silently change nothing).
corral::SamplingParams sampling_params(const json& r, corral::SamplingParams p) {
  for (const auto& [key, value] : r.items()) {
    if (key == "id" || key == "prompt_token_ids") continue;
    if (key == "n") p.n = value.get<int64_t>();
    else if (key == "temperature") p.temperature = value.get<float>();
    else if (key == "top_k") p.top_k = value.get<int64_t>();
    else if (key == "top_p") p.top_p = value.get<float>();
    else if (key == "min_p") p.min_p = value.get<float>();
    else if (key == "repetition_penalty") p.repetition_penalty = value.get<float>();
    else if (key == "presence_penalty") p.presence_penalty = value.get<float>();
    else if (key == "frequency_penalty") p.frequency_penalty = value.get<float>();
    else if (key == "max_tokens") p.max_tokens = value.get<int64_t>();
    else if (key == "min_tokens") p.min_tokens = value.get<int64_t>();
    else if (key == "ignore_eos") p.ignore_eos = value.get<bool>();
    else if (key == "stop_token_ids") p.stop_token_ids = value.get<std::vector<int64_t>>();
    else if (key == "seed") p.seed = value.get<int64_t>();
    else throw std::invalid_argument("unknown field '" + key + "'");
  }
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MODEL_DIR [--threads N] < requests.jsonl\n", argv[0]);
    return 2;
  }
  corral::EngineOptions options;
  for (int i = 2; i + 1 < argc; i += 2)
    if (std::string(argv[i]) == "--threads") options.num_threads = std::atoi(argv[i + 1]);

  try {
    corral::AsyncEngine engine(argv[1], options);
    const corral::SamplingParams defaults = engine.engine().default_sampling_params();
    std::fprintf(stderr, "corral %s: %s loaded, serving stdin\n", CORRAL_VERSION, argv[1]);

    std::mutex ids_mutex;
    std::map<std::string, int64_t> ids;  // the client's ids -> running requests' ids
    std::string line;
    while (std::getline(std::cin, line)) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      json r;
      std::string id;
      try {
        r = json::parse(line);
        id = r.at("id").is_string() ? r.at("id").get<std::string>() : r.at("id").dump();
        if (r.value("abort", false)) {
          const std::lock_guard<std::mutex> lock(ids_mutex);
          const auto it = ids.find(id);
          if (it != ids.end()) engine.abort(it->second);
          continue;
        }
        const auto prompt = r.at("prompt_token_ids").get<std::vector<int32_t>>();
        const corral::SamplingParams params = sampling_params(r, defaults);
        const std::lock_guard<std::mutex> lock(ids_mutex);  // the callback erases the id at the end
        auto remaining = std::make_shared<int64_t>(params.n);
        ids[id] = engine.add_request(prompt, params, [id, remaining, &ids, &ids_mutex](const corral::RequestUpdate& u) {
          for (int32_t t : u.new_token_ids) emit({{"id", id}, {"index", u.index}, {"token", t}});
          if (!u.finished()) return;
          json end = {{"id", id}, {"index", u.index}, {"finish_reason", corral::finish_reason_name(u.finish_reason)}};
          if (!u.error.empty()) end["error"] = u.error;
          emit(end);
          if (--*remaining == 0) {
            const std::lock_guard<std::mutex> lock(ids_mutex);
            ids.erase(id);
          }
        });
      } catch (const std::exception& e) {  // a bad line (JSON, field, or a request the engine refuses)
        emit({{"id", id}, {"error", e.what()}});
      }
    }
    engine.drain();
  } catch (const corral::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
