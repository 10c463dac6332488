#include "corral/engine.h"

#include <omp.h>

#include <algorithm>
#include <string>

#include "corral/error.h"
#include "corral/kernels/sampling.h"

namespace corral {

struct Engine::Request {
  int64_t id = 0;
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int64_t prompt_len = 0;
  int64_t computed = 0;  // tokens whose K/V are in the cache (its KV-cache sequence has the same id)
  bool started = false;  // scheduled in a step yet
  SamplingParams params;
  std::mt19937_64 rng;
  int64_t generated() const { return int64_t(tokens.size()) - prompt_len; }
};

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Length: return "length";
    case FinishReason::Stop: return "stop";
    default: return "";
  }
}

namespace {

DType parse_kv_dtype(const std::string& name, DType weights) {
  if (name == "auto") return weights;
  if (name == "float32" || name == "fp32") return DType::F32;
  if (name == "bfloat16" || name == "bf16") return DType::BF16;
  if (name == "float16" || name == "fp16") return DType::F16;
  if (name == "fp8" || name == "float8_e4m3" || name == "fp8_e4m3") return DType::F8_E4M3;
  throw InvalidInputError("kv_cache_dtype '" + name + "' is not supported (auto, float32, bfloat16, float16, fp8)");
}

}  // namespace

Engine::Engine(const std::string& model_dir, const EngineOptions& options)
    : options_(options), seeder_(options.seed) {
  if (options_.num_threads < 0) throw InvalidInputError("num_threads must be >= 0");
  if (options_.max_num_seqs < 1) throw InvalidInputError("max_num_seqs must be >= 1");
  if (options_.max_num_batched_tokens < 1) throw InvalidInputError("max_num_batched_tokens must be >= 1");
  if (options_.max_model_len < 0) throw InvalidInputError("max_model_len must be >= 0");
  if (!(options_.kv_watermark >= 0 && options_.kv_watermark < 1)) throw InvalidInputError("kv_watermark must be in [0, 1)");
  if (options_.num_threads > 0) omp_set_num_threads(options_.num_threads);
  model_ = std::make_unique<Llama4Model>(model_dir);
  const ModelConfig& c = model_->config();
  max_model_len_ = options_.max_model_len > 0 ? options_.max_model_len : c.max_position_embeddings;
  const KvLayout layout = make_kv_layout(c, options_.block_size, parse_kv_dtype(options_.kv_cache_dtype, model_->weights_dtype()));
  cache_ = std::make_unique<KvCache>(layout, options_.kv_cache_bytes, options_.enable_prefix_caching);
}

Engine::~Engine() = default;

void Engine::validate_tokens(const std::vector<int32_t>& tokens, const char* what) const {
  if (tokens.empty()) throw InvalidInputError(std::string(what) + " is empty");
  const int64_t vocab = config().vocab_size;
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || tokens[i] >= vocab)
      throw InvalidInputError(std::string(what) + ": token id " + std::to_string(tokens[i]) + " at index " +
                              std::to_string(i) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}

int64_t Engine::add_request(const std::vector<int32_t>& prompt, const SamplingParams& params) {
  validate_tokens(prompt, "prompt");
  const int64_t n = int64_t(prompt.size());
  if (n >= max_model_len_)
    throw InvalidInputError("prompt of " + std::to_string(n) + " tokens leaves no room to generate within max_model_len " +
                            std::to_string(max_model_len_));
  if (params.max_tokens < 1) throw InvalidInputError("max_tokens must be >= 1, got " + std::to_string(params.max_tokens));
  if (!(params.temperature >= 0.f)) throw InvalidInputError("temperature must be >= 0");
  const KvLayout& layout = cache_->layout();
  if (layout.sequence_bytes(n + 1, true) > cache_->num_pages() * layout.page_bytes)
    throw OutOfKVCacheError("prompt of " + std::to_string(n) + " tokens needs more KV blocks than the whole cache has (" +
                            std::to_string(cache_->num_pages()) + " blocks of " + std::to_string(layout.block_size) +
                            " tokens); raise kv_cache_bytes");
  auto r = std::make_unique<Request>();
  r->id = next_id_++;
  r->tokens = prompt;
  r->prompt_len = n;
  r->params = params;
  r->rng.seed(params.seed >= 0 ? uint64_t(params.seed) : seeder_());
  r->computed = cache_->blocks().add(r->id, prompt);
  const int64_t id = r->id;
  requests_[id] = std::move(r);
  return id;
}

void Engine::finish(Request& r, FinishReason why, RequestUpdate& update) {
  update.finish_reason = why;
  cache_->blocks().free(r.id);
}

std::vector<RequestUpdate> Engine::step() {
  // First come, first served: decode steps and prompt pieces share the token budget.
  BlockManager& blocks = cache_->blocks();
  ForwardBatch batch(blocks.num_groups());
  std::vector<std::pair<Request*, int64_t>> scheduled;  // with the number of tokens each computes
  std::vector<Request*> sampled;  // requests whose logits this step yields, in logit-row order
  int64_t budget = options_.max_num_batched_tokens;
  int64_t seqs = 0;
  const int64_t watermark_pages = int64_t(options_.kv_watermark * double(cache_->num_pages()));
  for (auto& [id, rp] : requests_) {
    Request& r = *rp;
    if (budget == 0 || seqs == options_.max_num_seqs) break;
    const int64_t pending = int64_t(r.tokens.size()) - r.computed;
    const int64_t n = std::min(pending, budget);
    // A request starts only if it leaves the watermark free for the running ones to grow into.
    if (!r.started && !blocks.can_append(r.id, n, watermark_pages)) continue;
    if (!cache_->append(r.id, n)) continue;  // waits for blocks
    const bool completes = r.computed + n == int64_t(r.tokens.size());
    batch.add_sequence(r.tokens.data() + r.computed, n, r.computed, blocks, r.id, completes);
    scheduled.emplace_back(&r, n);
    r.started = true;
    if (completes) sampled.push_back(&r);
    budget -= n;
    ++seqs;
  }
  if (batch.num_tokens() == 0) {
    if (requests_.empty()) return {};
    throw OutOfKVCacheError("KV cache is full: " + std::to_string(requests_.size()) +
                            " requests need more blocks than the " + std::to_string(cache_->num_pages()) +
                            " blocks of " + std::to_string(blocks.block_size()) +
                            " tokens hold; raise kv_cache_bytes or lower max_num_seqs");
  }

  const int64_t vocab = config().vocab_size, R = int64_t(sampled.size());
  logits_.resize(size_t(std::max<int64_t>(R, 1) * vocab));
  model_->forward(batch, *cache_, logits_.data());
  for (auto& [r, n] : scheduled) {
    (r->computed >= r->prompt_len ? decode_tokens_ : prefill_tokens_) += n;
    blocks.commit(r->id, r->tokens.data() + r->computed, n);
    r->computed += n;
  }

  std::vector<int32_t> next(R);
  std::vector<float> temperature(R), uniform(R);
  for (int64_t i = 0; i < R; ++i) {
    temperature[i] = sampled[i]->params.temperature;
    uniform[i] = std::uniform_real_distribution<float>(0.f, 1.f)(sampled[i]->rng);
  }
  kernels::sample_temperature(Stream{}, next.data(), logits_.data(), R, vocab, temperature.data(), uniform.data());

  // Log-probabilities (of every row, in one kernel call) when any request asks for them.
  int64_t top_n = -1;
  for (Request* r : sampled) top_n = std::max(top_n, std::min(r->params.logprobs, vocab));
  std::vector<float> chosen_lp(R), top_lp(R * std::max<int64_t>(top_n, 0));
  std::vector<int32_t> top_ids(top_lp.size());
  if (top_n >= 0)
    kernels::logprobs(Stream{}, logits_.data(), R, vocab, next.data(), chosen_lp.data(), top_n, top_ids.data(),
                      top_lp.data());

  std::vector<RequestUpdate> updates;
  const std::vector<int64_t>& eos = config().eos_token_ids;
  for (int64_t i = 0; i < R; ++i) {
    Request& r = *sampled[i];
    const int32_t tok = next[i];
    r.tokens.push_back(tok);
    RequestUpdate u;
    u.request_id = r.id;
    u.new_token_ids.push_back(tok);
    if (r.params.logprobs >= 0) {
      std::vector<std::pair<int32_t, float>> entry{{tok, chosen_lp[i]}};
      for (int64_t k = 0; k < std::min(r.params.logprobs, top_n); ++k)
        entry.emplace_back(top_ids[i * top_n + k], top_lp[i * top_n + k]);
      u.logprobs.push_back(std::move(entry));
    }
    const auto& stops = r.params.stop_token_ids;
    const bool is_eos = !r.params.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end();
    if (is_eos || std::find(stops.begin(), stops.end(), tok) != stops.end())
      finish(r, FinishReason::Stop, u);
    else if (r.generated() >= r.params.max_tokens || int64_t(r.tokens.size()) >= max_model_len_)
      finish(r, FinishReason::Length, u);
    updates.push_back(std::move(u));
  }
  for (const RequestUpdate& u : updates)
    if (u.finished()) requests_.erase(u.request_id);
  return updates;
}

void Engine::abort(int64_t request_id) {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return;
  cache_->blocks().free(request_id);
  requests_.erase(it);
}

void Engine::prompt_logits(const std::vector<std::vector<int32_t>>& prompts, float* out) {
  int64_t total = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string what = "prompts[" + std::to_string(i) + "]";
    validate_tokens(prompts[i], what.c_str());
    if (int64_t(prompts[i].size()) > max_model_len_)
      throw InvalidInputError(what + " has " + std::to_string(prompts[i].size()) + " tokens, over max_model_len " +
                              std::to_string(max_model_len_));
    total += int64_t(prompts[i].size());
  }
  // Each prompt is a KV-cache sequence of its own for the duration of the call.
  BlockManager& blocks = cache_->blocks();
  std::vector<BlockManager::SeqId> ids;
  struct Release {  // the pages go back to the pool however this function exits
    BlockManager& blocks;
    std::vector<BlockManager::SeqId>& ids;
    ~Release() {
      for (BlockManager::SeqId id : ids) blocks.free(id);
    }
  } release{blocks, ids};
  for (const auto& prompt : prompts) {
    ids.push_back(next_id_++);
    blocks.add(ids.back(), prompt, /*reuse=*/false);
  }

  // Fill each pass with the next tokens in prompt order, so its logits land contiguously in out.
  const int64_t vocab = config().vocab_size;
  size_t p = 0;
  int64_t offset = 0;  // tokens of prompt p already computed
  while (p < prompts.size()) {
    ForwardBatch batch(blocks.num_groups());
    struct Piece {
      size_t prompt;
      int64_t start, n;
    };
    std::vector<Piece> pieces;
    int64_t budget = options_.max_num_batched_tokens;
    for (size_t q = p; q < prompts.size() && budget > 0;) {
      const int64_t start = q == p ? offset : 0;
      const int64_t n = std::min(int64_t(prompts[q].size()) - start, budget);
      if (!cache_->append(ids[q], n))
        throw OutOfKVCacheError(std::to_string(total) + " prompt tokens need more KV blocks than the " +
                                std::to_string(blocks.available_pages()) + " of " + std::to_string(cache_->num_pages()) +
                                " the cache has free; raise kv_cache_bytes");
      batch.add_sequence(prompts[q].data() + start, n, start, blocks, ids[q], false);
      pieces.push_back({q, start, n});
      budget -= n;
      if (start + n < int64_t(prompts[q].size())) break;
      ++q;
    }
    for (int64_t r = 0; r < batch.num_tokens(); ++r) batch.logit_rows.push_back(int32_t(r));
    model_->forward(batch, *cache_, out);
    out += batch.num_tokens() * vocab;
    prefill_tokens_ += batch.num_tokens();
    for (const Piece& c : pieces) blocks.commit(ids[c.prompt], prompts[c.prompt].data() + c.start, c.n);
    const Piece& last = pieces.back();
    const bool done = last.start + last.n == int64_t(prompts[last.prompt].size());
    p = done ? last.prompt + 1 : last.prompt;
    offset = done ? 0 : last.start + last.n;
  }
}

EngineStats Engine::stats() const {
  EngineStats s;
  const KvLayout& layout = cache_->layout();
  s.kv = cache_->blocks().stats();
  s.kv_block_size = layout.block_size;
  s.kv_page_bytes = layout.page_bytes;
  s.kv_bytes_per_token = layout.bytes_per_token();
  s.kv_global_groups = layout.num_groups(AttentionKind::Global);
  s.kv_local_groups = layout.num_groups(AttentionKind::Local);
  for (const auto& [id, r] : requests_) (r->started ? s.requests_running : s.requests_waiting) += 1;
  s.prefill_tokens_computed = prefill_tokens_;
  s.decode_tokens_computed = decode_tokens_;
  s.expert_tokens = model_->expert_tokens();
  return s;
}

}  // namespace corral
