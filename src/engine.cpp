// corral::Engine, the public face of EngineCore (engine_core.cpp): no internals in its header.
#include "corral/engine.h"

#include "corral/engine_core.h"

namespace corral {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Length: return "length";
    case FinishReason::Stop: return "stop";
    case FinishReason::Abort: return "abort";
    case FinishReason::Error: return "error";
    default: return "";
  }
}

Engine::Engine(const std::string& model_dir, const EngineOptions& options)
    : core_(std::make_unique<EngineCore>(model_dir, options)) {}
Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;

const EngineOptions& Engine::options() const { return core_->options(); }
int64_t Engine::vocab_size() const { return core_->config().vocab_size; }
int64_t Engine::max_model_len() const { return core_->max_model_len(); }
const std::vector<int32_t>& Engine::stop_token_ids() const { return core_->defaults().stop_token_ids; }
const SamplingParams& Engine::default_sampling_params() const { return core_->defaults().sampling; }

const VisionInfo& Engine::vision() const { return core_->vision(); }

int64_t Engine::add_request(const Prompt& prompt, const SamplingParams& params) {
  return core_->add_request(prompt, params);
}
std::vector<RequestUpdate> Engine::step() { return core_->step(); }
void Engine::abort(int64_t request_id) { core_->abort(request_id); }
void Engine::finish_sample(int64_t request_id, int32_t index) { core_->finish_sample(request_id, index); }
bool Engine::has_unfinished() const { return core_->has_unfinished(); }

void Engine::prompt_logits(const std::vector<Prompt>& prompts, float* out) {
  core_->prompt_logits(prompts, out);
}
void Engine::prompt_logprobs(const std::vector<std::vector<int32_t>>& prompts, double* out) {
  core_->prompt_logprobs(prompts, out);
}

EngineStats Engine::stats() const { return core_->stats(); }

}  // namespace corral
