#include "corral/engine_core.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <unordered_map>

#include "corral/error.h"
#include "corral/hash.h"
#include "corral/kernels/sampling.h"

namespace corral {

struct EngineCore::Request {
  int64_t id = 0;
  SamplingParams params;
  uint64_t seed = 0;                    // sample i draws from a generator seeded with seed + i * golden
  std::vector<int32_t> stop_ids;        // tokens that end a sample: eos (unless ignored) and stop_token_ids
  std::vector<std::unique_ptr<Sequence>> samples;  // by index; the first is created with the request
  std::vector<std::unique_ptr<TokenConstraint>> constraints;  // by sample index; empty: unconstrained
  PromptImages images;                  // row_of empty: a text prompt
  int64_t live = 0;                     // samples not finished
  bool penalized() const {
    return params.repetition_penalty != 1.f || params.presence_penalty != 0.f || params.frequency_penalty != 0.f;
  }
};

// One sample of a request: its own tokens, KV-cache sequence and random generator.
struct EngineCore::Sequence {
  Request* request = nullptr;
  int32_t index = 0;
  BlockManager::SeqId kv = 0;   // its KV-cache sequence (exists while it is running)
  std::vector<int32_t> tokens;  // prompt (image tokens as their cache keys), then generated tokens
  int64_t prompt_len = 0;
  int64_t computed = 0;         // tokens whose K/V are in the cache
  bool running = false;         // holds KV blocks (in running_), else in waiting_ or finished
  bool finished = false;
  std::mt19937_64 rng;
  std::unordered_map<int32_t, int32_t> counts;  // with penalties: prompt and output tokens -> output count
  int64_t generated() const { return int64_t(tokens.size()) - prompt_len; }
  std::pair<int64_t, int32_t> key() const { return {request->id, index}; }
};

namespace {

DType parse_kv_dtype(const std::string& name, DType weights) {
  if (name == "auto") return weights;
  if (name == "float32" || name == "fp32") return DType::F32;
  if (name == "bfloat16" || name == "bf16") return DType::BF16;
  if (name == "float16" || name == "fp16") return DType::F16;
  if (name == "fp8" || name == "float8_e4m3" || name == "fp8_e4m3") return DType::F8_E4M3;
  throw InvalidInputError("kv_cache_dtype '" + name + "' is not supported (auto, float32, bfloat16, float16, fp8)");
}

// What a matcher's mask left of a logits row.
enum class Allowed { Some, OnlyStops, Nothing };

// The tokens a matcher allows, as a bitmask of `vocab` bits (mask holds ceil(vocab / 32) words,
// set by the caller to allow everything); a mask allowing no token allows the stop tokens (a
// grammar at a dead end, or complete, ends the sample rather than draw from nothing). Nothing: no
// token, and the request has no stop token either (mask left as it was).
Allowed constraint_mask(TokenConstraint& matcher, const std::vector<int32_t>& stops, uint32_t* mask, int64_t vocab) {
  const int64_t words = (vocab + 31) / 32;
  thread_local std::vector<uint32_t> allowed, stop_mask;
  allowed.assign(size_t(words), 0u);
  matcher.fill_bitmask(allowed.data(), words);
  if (vocab % 32) allowed.back() &= (1u << (vocab % 32)) - 1u;  // bits past the vocabulary
  stop_mask.assign(size_t(words), 0u);
  for (int32_t t : stops) stop_mask[size_t(t >> 5)] |= 1u << (t & 31);
  bool only_stops = true;
  for (int64_t w = 0; w < words; ++w) only_stops = only_stops && (allowed[size_t(w)] & ~stop_mask[size_t(w)]) == 0;
  if (only_stops && stops.empty()) return Allowed::Nothing;
  for (int64_t w = 0; w < words; ++w) mask[w] = only_stops ? allowed[size_t(w)] | stop_mask[size_t(w)] : allowed[size_t(w)];
  return only_stops ? Allowed::OnlyStops : Allowed::Some;
}

}  // namespace

EngineCore::EngineCore(const std::string& model_dir, const EngineOptions& options)
    : options_(options), seeder_(options.seed) {
  if (options_.num_threads < 0) throw InvalidInputError("num_threads must be >= 0");
  if (options_.max_num_seqs < 1) throw InvalidInputError("max_num_seqs must be >= 1");
  if (options_.max_num_batched_tokens < 1) throw InvalidInputError("max_num_batched_tokens must be >= 1");
  if (options_.max_model_len < 0) throw InvalidInputError("max_model_len must be >= 0");
  if (!(options_.kv_watermark >= 0 && options_.kv_watermark < 1)) throw InvalidInputError("kv_watermark must be in [0, 1)");
  if (options_.max_images_per_prompt < -1) throw InvalidInputError("max_images_per_prompt must be >= -1 (-1: any number)");
  use_threads();
  if (options_.dtype != "auto" && options_.dtype != "float32")
    throw InvalidInputError("dtype '" + options_.dtype + "' is not supported (auto, float32)");
  model_ = std::make_unique<Llama4Model>(
      model_dir, options_.dtype == "float32" ? kernels::Activations::Float32 : kernels::Activations::Native,
      LoadOptions{options_.quantization, options_.max_images_per_prompt != 0, parse_device(options_.device)},
      options_.enforce_eager);
  const ModelConfig& c = model_->config();
  if (model_->vision()) {
    const VisionConfig& v = model_->vision()->config();
    vision_ = VisionInfo{v.hidden_size, v.image_size, v.patch_size, v.num_channels, v.tokens_per_tile(), v.image_token_id};
  }
  defaults_ = load_generation_defaults(model_dir, options_.tokenizer_dir.empty() ? model_dir : options_.tokenizer_dir, c);
  max_model_len_ = options_.max_model_len > 0 ? options_.max_model_len : c.max_position_embeddings;
  const KvLayout layout = make_kv_layout(c, options_.block_size, parse_kv_dtype(options_.kv_cache_dtype, model_->weights_dtype()));
  cache_ = std::make_unique<KvCache>(layout, options_.kv_cache_bytes, options_.enable_prefix_caching, max_model_len_,
                                     options_.max_num_seqs, model_->stream());
  processed_ = DeviceArray<float>(model_->device());
  staging_ = SamplingArrays(model_->device());
}

EngineCore::~EngineCore() = default;

bool EngineCore::has_unfinished() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return !requests_.empty();
}

// omp_set_num_threads sets the calling thread's team size: set it on whichever thread steps.
void EngineCore::use_threads() const {
  if (options_.num_threads > 0) omp_set_num_threads(options_.num_threads);
}

void EngineCore::validate_tokens(const std::vector<int32_t>& tokens, const char* what) const {
  if (tokens.empty()) throw InvalidInputError(std::string(what) + " is empty");
  const int64_t vocab = config().vocab_size;
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || tokens[i] >= vocab)
      throw InvalidInputError(std::string(what) + ": token id " + std::to_string(tokens[i]) + " at index " +
                              std::to_string(i) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}

int64_t EngineCore::add_request(const Prompt& input, const SamplingParams& params) {
  const std::vector<int32_t>& prompt = input.token_ids;
  // Checks that read only the immutable config, and hashing the images, go before the lock.
  validate_tokens(prompt, "prompt");
  std::vector<int32_t> keys = prompt;
  PromptImages images = prepare_images(input, keys, "prompt");
  // The matchers are made outside the lock: a factory may wait (for Python's GIL, say).
  std::vector<std::unique_ptr<TokenConstraint>> constraints;
  if (params.constraint)
    for (int64_t i = 0; i < std::max<int64_t>(params.n, 1); ++i) {
      constraints.push_back(params.constraint());
      if (!constraints.back()) throw InvalidInputError("the constraint factory returned no matcher");
    }
  const std::lock_guard<std::mutex> lock(mutex_);
  const int64_t n = int64_t(prompt.size()), vocab = config().vocab_size;
  if (n >= max_model_len_)
    throw InvalidInputError("prompt of " + std::to_string(n) + " tokens leaves no room to generate within max_model_len " +
                            std::to_string(max_model_len_));
  const SamplingParams& p = params;
  const auto check = [](bool ok, const std::string& what) {
    if (!ok) throw InvalidInputError(what);
  };
  check(p.n >= 1 && p.n <= options_.max_num_seqs,
        "n must be in [1, max_num_seqs = " + std::to_string(options_.max_num_seqs) + "], got " + std::to_string(p.n));
  check(p.max_tokens >= 1, "max_tokens must be >= 1, got " + std::to_string(p.max_tokens));
  check(p.min_tokens >= 0 && p.min_tokens <= p.max_tokens,
        "min_tokens must be in [0, max_tokens], got " + std::to_string(p.min_tokens));
  check(p.temperature >= 0.f, "temperature must be >= 0");
  check(p.top_k >= 0, "top_k must be >= 0 (0: all tokens), got " + std::to_string(p.top_k));
  check(p.top_p > 0.f && p.top_p <= 1.f, "top_p must be in (0, 1]");
  check(p.min_p >= 0.f && p.min_p <= 1.f, "min_p must be in [0, 1]");
  check(p.repetition_penalty > 0.f, "repetition_penalty must be > 0");
  check(std::isfinite(p.presence_penalty) && std::isfinite(p.frequency_penalty),
        "presence_penalty and frequency_penalty must be finite");
  for (int64_t t : p.stop_token_ids)
    check(t >= 0 && t < vocab, "stop_token_ids: " + std::to_string(t) + " is outside the vocabulary [0, " +
                                   std::to_string(vocab) + ")");
  // Every sample must fit in the cache alone at its longest, counting the blocks a step's prompt
  // piece holds besides in chunked layers; then preempting the others always lets it finish.
  const KvLayout& layout = cache_->layout();
  const int64_t longest = std::min(n + std::min(p.max_tokens, max_model_len_), max_model_len_);
  const int64_t piece_blocks = (std::min(longest, options_.max_num_batched_tokens) + layout.block_size - 1) /
                                   layout.block_size + 1;
  const int64_t peak =
      std::min(layout.sequence_bytes(longest, true) +
                   layout.num_groups(AttentionKind::Local) * piece_blocks * layout.page_bytes,
               layout.sequence_bytes(longest, false));
  if (peak > cache_->num_pages() * layout.page_bytes)
    throw OutOfKVCacheError("a sample of " + std::to_string(longest) + " tokens (prompt " + std::to_string(n) +
                            " + max_tokens " + std::to_string(p.max_tokens) +
                            ") needs more KV blocks than the whole cache has (" +
                            std::to_string(cache_->num_pages()) + " blocks of " + std::to_string(layout.block_size) +
                            " tokens); raise kv_cache_bytes or lower max_tokens");

  auto r = std::make_unique<Request>();
  r->id = next_id_++;
  r->params = params;
  r->params.constraint = nullptr;  // the matchers are made
  r->constraints = std::move(constraints);
  r->images = std::move(images);
  r->seed = p.seed >= 0 ? uint64_t(p.seed) : seeder_();
  if (!p.ignore_eos) r->stop_ids = defaults_.stop_token_ids;
  r->stop_ids.insert(r->stop_ids.end(), p.stop_token_ids.begin(), p.stop_token_ids.end());
  auto s = std::make_unique<Sequence>();
  s->request = r.get();
  s->kv = next_id_++;
  s->tokens = std::move(keys);
  s->prompt_len = n;
  s->rng.seed(r->seed);
  if (r->penalized())
    for (int32_t t : prompt) s->counts.emplace(t, 0);
  waiting_[s->key()] = s.get();
  r->samples.push_back(std::move(s));
  r->live = 1;
  const int64_t id = r->id;
  requests_[id] = std::move(r);
  return id;
}

void EngineCore::preempt(Sequence& s) {
  // Recompute later: its tokens stay, its K/V go (prefix caching may give some back).
  cache_->blocks().free(s.kv);
  s.computed = 0;
  s.running = false;
  running_.erase(s.key());
  waiting_[s.key()] = &s;
  ++preemptions_;
}

void EngineCore::fork_samples(Request& r) {
  // The other n - 1 samples share the first one's blocks (copy-on-write) and its logits row.
  Sequence& first = *r.samples.front();
  for (int32_t i = 1; i < int32_t(r.params.n); ++i) {
    auto s = std::make_unique<Sequence>(first);
    s->index = i;
    s->kv = next_id_++;
    s->rng.seed(r.seed + uint64_t(i) * 0x9E3779B97F4A7C15ull);
    cache_->blocks().fork(first.kv, s->kv);
    running_[s->key()] = s.get();
    r.samples.push_back(std::move(s));
    ++r.live;
  }
}

void EngineCore::finish(Sequence& s, FinishReason why, RequestUpdate* update) {
  if (s.finished) return;
  if (update) update->finish_reason = why;
  cache_->blocks().free(s.kv);
  (s.running ? running_ : waiting_).erase(s.key());
  s.running = false;
  s.finished = true;
  --s.request->live;
}

std::vector<RequestUpdate> EngineCore::step() {
  const std::lock_guard<std::mutex> lock(mutex_);
  use_threads();
  BlockManager& blocks = cache_->blocks();
  ForwardBatch batch(blocks.num_groups());
  std::vector<std::pair<Sequence*, int64_t>> scheduled;  // with the number of tokens each computes
  std::vector<Sequence*> sampled;  // sequences whose logits this step yields, in logit-row order
  int64_t budget = options_.max_num_batched_tokens;
  const auto completes = [](const Sequence& s, int64_t n) { return s.computed + n == int64_t(s.tokens.size()); };
  const auto schedule = [&](Sequence& s, int64_t n) {
    scheduled.emplace_back(&s, n);
    if (completes(s, n)) sampled.push_back(&s);
    budget -= n;
  };

  // Running sequences, oldest first; one that cannot get blocks preempts the youngest (itself last).
  bool preempted = false;
  for (auto it = running_.begin(); it != running_.end() && budget > 0;) {
    Sequence& s = *it->second;
    const int64_t n = std::min(int64_t(s.tokens.size()) - s.computed, budget);
    bool self = false;
    while (!cache_->append(s.kv, n)) {
      Sequence& youngest = *std::prev(running_.end())->second;
      self = &youngest == &s;
      preempt(youngest);
      preempted = true;
      if (self) break;
    }
    if (self) break;
    schedule(s, n);
    ++it;
  }
  // Then waiting ones in arrival order while they leave the watermark free for the running ones
  // to grow into (not right after a preemption, which would only thrash).
  const int64_t watermark = int64_t(options_.kv_watermark * double(cache_->num_pages()));
  while (budget > 0 && !waiting_.empty() && int64_t(running_.size()) < options_.max_num_seqs &&
         (!preempted || scheduled.empty())) {
    Sequence& s = *waiting_.begin()->second;
    s.computed = blocks.add(s.kv, s.tokens);
    const int64_t n = std::min(int64_t(s.tokens.size()) - s.computed, budget);
    if (!blocks.can_append(s.kv, n, running_.empty() ? 0 : watermark)) {
      blocks.free(s.kv);
      s.computed = 0;
      break;  // first come, first served: the later ones wait too
    }
    cache_->append(s.kv, n);
    waiting_.erase(waiting_.begin());
    running_[s.key()] = &s;
    s.running = true;
    schedule(s, n);
  }
  // Images are encoded in the step that first computes one of their tokens, all of the step's
  // together; then the batch is laid out, sequence after sequence.
  std::vector<PromptImages*> pending;
  for (auto& [s, n] : scheduled) {
    PromptImages& im = s->request->images;
    if (!im.row_of.empty() && !im.encoded && s->computed + n > im.first &&
        std::find(pending.begin(), pending.end(), &im) == pending.end())
      pending.push_back(&im);
  }
  encode(pending);
  for (auto& [s, n] : scheduled)
    batch.add_sequence(s->tokens.data() + s->computed, n, s->computed, blocks, s->kv, completes(*s, n),
                       s->request->images.embeddings(vision_.image_token_id, config().hidden_size));
  if (batch.num_tokens() == 0) {
    if (requests_.empty()) return {};
    throw OutOfKVCacheError("KV cache is full: no sequence can get a block among the " +
                            std::to_string(cache_->num_pages()) + " blocks of " + std::to_string(blocks.block_size()) +
                            " tokens; raise kv_cache_bytes");
  }

  const float* logits = model_->forward(batch, *cache_);
  for (auto& [s, n] : scheduled) {
    (s->computed >= s->prompt_len ? decode_tokens_ : prefill_tokens_) += n;
    blocks.commit(s->kv, s->tokens.data() + s->computed, n);
    s->computed += n;
  }

  // Each logits row is drawn from once, or n times when it ends a prompt of n > 1 samples.
  std::vector<Sequence*> draws;
  std::vector<int64_t> rows;
  for (size_t i = 0; i < sampled.size(); ++i) {
    Request& r = *sampled[i]->request;
    if (r.params.n > 1 && r.samples.size() == 1) fork_samples(r);
    const bool all = r.samples.size() > 1 && sampled[i]->generated() == 0;
    for (const auto& s : r.samples)
      if (all ? !s->finished : s.get() == sampled[i]) {
        draws.push_back(s.get());
        rows.push_back(int64_t(i));
      }
  }
  std::vector<RequestUpdate> updates;
  sample(logits, draws, rows, updates);
  for (auto it = requests_.begin(); it != requests_.end();)
    it = it->second->live == 0 ? requests_.erase(it) : std::next(it);
  return updates;
}

void EngineCore::sample(const float* logits_in, const std::vector<Sequence*>& seqs, const std::vector<int64_t>& rows,
                        std::vector<RequestUpdate>& updates) {
  const int64_t D = int64_t(seqs.size()), vocab = config().vocab_size;
  const Stream& stream = model_->stream();
  const bool gpu = stream.device.type == DeviceType::CUDA;
  // Rows are adjusted in a copy, one per draw, when a penalty or ban changes them or a row is
  // drawn from more than once; otherwise the draws read the model's logits as they are. Both
  // live on the model's device; only the drawn tokens (and log-probabilities) come back.
  const bool one_each = D == (D ? rows.back() + 1 : 0);  // rows rise from 0: equal counts mean draw d reads row d
  bool edits = false;  // penalties, bans or masks change some row
  for (const Sequence* s : seqs)
    edits = edits || s->request->penalized() || s->generated() < s->request->params.min_tokens ||
            !s->request->constraints.empty();
  const bool copy_rows_first = !one_each || edits;
  const size_t row_bytes = size_t(vocab) * sizeof(float);
  const auto gather = [&] {
    float* dst = processed_.reserve(size_t(D * vocab));
    if (one_each) copy(dst, logits_in, size_t(D) * row_bytes, stream);
    else
      for (int64_t d = 0; d < D; ++d) copy(dst + d * vocab, logits_in + rows[d] * vocab, row_bytes, stream);
    return dst;
  };
  float* edited = copy_rows_first ? gather() : nullptr;  // every edit below implies copy_rows_first
  const float* logits = edited ? edited : logits_in;

  // The grammar's mask, min_tokens' bans, then penalties from the token counts, then the draw.
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> ids, counts;
  std::vector<PenaltyRow> penalties(static_cast<size_t>(D));
  std::vector<SamplerRow> settings(static_cast<size_t>(D));
  std::vector<float> uniform(static_cast<size_t>(D));
  std::vector<std::string> failed(static_cast<size_t>(D));  // a matcher's exception ends its sample
  std::vector<Allowed> allowed(static_cast<size_t>(D), Allowed::Some);  // by the grammar
  // Rows a grammar or min_tokens restricts, and their masks of allowed tokens (built here, applied
  // on the device: no row comes to the host).
  const int64_t words = (vocab + 31) / 32;
  std::vector<int32_t> mask_rows;
  std::vector<uint32_t> masks;
  for (int64_t d = 0; d < D; ++d) {
    const Sequence& s = *seqs[d];
    const SamplingParams& p = s.request->params;
    for (const auto& [token, count] : s.counts) {
      ids.push_back(token);
      counts.push_back(count);
    }
    offsets.push_back(int64_t(ids.size()));
    penalties[d] = {p.repetition_penalty, p.presence_penalty, p.frequency_penalty};
    const bool constrained = !s.request->constraints.empty(), banned = s.generated() < p.min_tokens;
    if (constrained || banned) {
      mask_rows.push_back(int32_t(d));
      masks.resize(masks.size() + size_t(words), ~0u);  // everything allowed, then restricted
      uint32_t* mask = masks.data() + masks.size() - size_t(words);
      if (constrained) {
        try {
          allowed[size_t(d)] =
              constraint_mask(*s.request->constraints[size_t(s.index)], s.request->stop_ids, mask, vocab);
        } catch (const std::exception& e) {
          failed[size_t(d)] = std::string("structured output: ") + e.what();
        }
      }
      // min_tokens bans the stop tokens, unless the grammar allows nothing else.
      if (banned && allowed[size_t(d)] == Allowed::Some)
        for (int32_t t : s.request->stop_ids) mask[t >> 5] &= ~(1u << (t & 31));
    }
    settings[d] = {p.temperature, int32_t(std::min<int64_t>(p.top_k, vocab)), p.top_p, p.min_p};
    uniform[d] = std::uniform_real_distribution<float>(0.f, 1.f)(seqs[d]->rng);
  }
  if (!mask_rows.empty())
    kernels::apply_token_mask(stream, edited, vocab, int64_t(mask_rows.size()),
                              on_device(staging_.mask_rows, mask_rows, stream), on_device(staging_.masks, masks, stream));
  if (!ids.empty())
    kernels::apply_penalties(stream, edited, D, vocab, on_device(staging_.offsets, offsets, stream),
                             on_device(staging_.ids, ids, stream), on_device(staging_.counts, counts, stream),
                             on_device(staging_.penalties, penalties, stream));
  std::vector<int32_t> next(static_cast<size_t>(D));
  int32_t* next_on_device = gpu ? staging_.next.reserve(size_t(D)) : next.data();
  kernels::sample(stream, next_on_device, logits, D, vocab, on_device(staging_.settings, settings, stream),
                  on_device(staging_.uniform, uniform, stream));

  // Log-probabilities of the model's own distribution (before penalties and temperature), as vLLM;
  // on the host when a GPU cannot give that many top tokens.
  int64_t top_n = -1;
  for (const Sequence* s : seqs) top_n = std::max(top_n, std::min(s->request->params.logprobs, vocab));
  std::vector<float> chosen_lp(static_cast<size_t>(D)), top_lp(size_t(D * std::max<int64_t>(top_n, 0)));
  std::vector<int32_t> top_ids(top_lp.size());
  const bool lp_on_host = gpu && top_n > kernels::kMaxDeviceLogprobs;
  if (gpu && !lp_on_host && top_n >= 0) {
    const float* model_rows = edits ? gather() : logits;
    kernels::logprobs(stream, model_rows, D, vocab, next_on_device, staging_.chosen_lp.reserve(size_t(D)), top_n,
                      staging_.top_ids.reserve(top_ids.size()), staging_.top_lp.reserve(top_lp.size()));
    copy(chosen_lp.data(), staging_.chosen_lp.data(), chosen_lp.size() * sizeof(float), stream);
    copy(top_ids.data(), staging_.top_ids.data(), top_ids.size() * sizeof(int32_t), stream);
    copy(top_lp.data(), staging_.top_lp.data(), top_lp.size() * sizeof(float), stream);
  }
  if (gpu) copy(next.data(), next_on_device, next.size() * sizeof(int32_t), stream);
  synchronize(stream);  // the step's one wait: for the drawn tokens
  if (top_n >= 0 && (!gpu || lp_on_host)) {
    const float* model_rows = edits ? gather() : logits;
    if (lp_on_host) {  // the model's rows, brought to the host
      host_rows_.resize(size_t(D * vocab));
      copy(host_rows_.data(), model_rows, size_t(D) * row_bytes, stream);
      synchronize(stream);
      model_rows = host_rows_.data();
    }
    kernels::logprobs(Stream{}, model_rows, D, vocab, next.data(), chosen_lp.data(), top_n, top_ids.data(),
                      top_lp.data());
  }

  for (int64_t d = 0; d < D; ++d) {
    Sequence& s = *seqs[d];
    const SamplingParams& p = s.request->params;
    const int32_t tok = next[d];
    const auto& stops = s.request->stop_ids;
    const bool stop_token = std::find(stops.begin(), stops.end(), tok) != stops.end() &&
                            (s.generated() >= p.min_tokens || allowed[size_t(d)] == Allowed::OnlyStops);
    if (failed[size_t(d)].empty() && allowed[size_t(d)] != Allowed::Nothing && !stop_token &&
        !s.request->constraints.empty()) {
      try {
        s.request->constraints[size_t(s.index)]->accept_token(tok);
      } catch (const std::exception& e) {
        failed[size_t(d)] = std::string("structured output: ") + e.what();
      }
    }
    RequestUpdate u;
    u.request_id = s.request->id;
    u.index = s.index;
    if (!failed[size_t(d)].empty() || allowed[size_t(d)] == Allowed::Nothing) {
      // A complete grammar with no stop token to end on ends the sample as a stop token would.
      u.error = failed[size_t(d)];
      finish(s, u.error.empty() ? FinishReason::Stop : FinishReason::Error, &u);
      updates.push_back(std::move(u));
      continue;
    }
    s.tokens.push_back(tok);
    if (s.request->penalized()) ++s.counts[tok];
    u.new_token_ids.push_back(tok);
    if (p.logprobs >= 0) {
      std::vector<std::pair<int32_t, float>> entry{{tok, chosen_lp[d]}};
      for (int64_t k = 0; k < std::min(p.logprobs, top_n); ++k)
        entry.emplace_back(top_ids[d * top_n + k], top_lp[d * top_n + k]);
      u.logprobs.push_back(std::move(entry));
    }
    if (stop_token)
      finish(s, FinishReason::Stop, &u);
    else if (s.generated() >= p.max_tokens || int64_t(s.tokens.size()) >= max_model_len_)
      finish(s, FinishReason::Length, &u);
    updates.push_back(std::move(u));
  }
}

void EngineCore::abort(int64_t request_id) {
  const std::lock_guard<std::mutex> lock(mutex_);
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return;
  for (const auto& s : it->second->samples) finish(*s, FinishReason::Abort, nullptr);
  requests_.erase(it);
}

void EngineCore::finish_sample(int64_t request_id, int32_t index) {
  const std::lock_guard<std::mutex> lock(mutex_);
  auto it = requests_.find(request_id);
  if (it == requests_.end() || index < 0 || index >= int32_t(it->second->samples.size())) return;
  finish(*it->second->samples[size_t(index)], FinishReason::Abort, nullptr);
  if (it->second->live == 0) requests_.erase(it);
}

void EngineCore::prompt_logits(const std::vector<Prompt>& prompts, float* out) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const int64_t vocab = config().vocab_size;
  run_prompts(prompts, [&](int64_t first, int64_t) { return out + first * vocab; }, [](int64_t, int64_t) {});
}

void EngineCore::prompt_logprobs(const std::vector<std::vector<int32_t>>& prompts, double* out) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const int64_t vocab = config().vocab_size;
  std::vector<int64_t> next;  // per token over all prompts: the token after it, -1 at a prompt's end
  for (const auto& p : prompts)
    for (size_t i = 0; i < p.size(); ++i) next.push_back(i + 1 < p.size() ? p[i + 1] : -1);
  std::vector<float> pass;
  run_prompts(
      std::vector<Prompt>(prompts.begin(), prompts.end()),
      [&](int64_t, int64_t n) {
        pass.resize(size_t(n * vocab));
        return pass.data();
      },
      [&](int64_t first, int64_t n) {
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < n; ++r) {
          const float* z = pass.data() + r * vocab;
          const int64_t target = next[size_t(first + r)];
          if (target < 0) {
            out[first + r] = std::nan("");
            continue;
          }
          const double top = *std::max_element(z, z + vocab);
          double total = 0;
          for (int64_t v = 0; v < vocab; ++v) total += std::exp(double(z[v]) - top);
          out[first + r] = double(z[target]) - top - std::log(total);
        }
      });
}

void EngineCore::run_prompts(const std::vector<Prompt>& inputs,
                         const std::function<float*(int64_t, int64_t)>& rows,
                         const std::function<void(int64_t, int64_t)>& done) {
  use_threads();
  int64_t total = 0;
  std::vector<std::vector<int32_t>> prompts;  // token ids, image tokens as their cache keys
  std::vector<PromptImages> images(inputs.size());
  std::vector<PromptImages*> pending;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string what = "prompts[" + std::to_string(i) + "]";
    validate_tokens(inputs[i].token_ids, what.c_str());
    if (int64_t(inputs[i].token_ids.size()) > max_model_len_)
      throw InvalidInputError(what + " has " + std::to_string(inputs[i].token_ids.size()) +
                              " tokens, over max_model_len " + std::to_string(max_model_len_));
    total += int64_t(inputs[i].token_ids.size());
    prompts.push_back(inputs[i].token_ids);
    images[i] = prepare_images(inputs[i], prompts.back(), what);
    if (!images[i].row_of.empty()) pending.push_back(&images[i]);
  }
  encode(pending);
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

  // Fill each pass with the next tokens in prompt order: its rows are consecutive tokens.
  int64_t first = 0;  // tokens of all prompts computed so far
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
      batch.add_sequence(prompts[q].data() + start, n, start, blocks, ids[q], false,
                         images[q].embeddings(vision_.image_token_id, config().hidden_size));
      pieces.push_back({q, start, n});
      budget -= n;
      if (start + n < int64_t(prompts[q].size())) break;
      ++q;
    }
    for (int64_t r = 0; r < batch.num_tokens(); ++r) batch.logit_rows.push_back(int32_t(r));
    model_->forward(batch, *cache_, rows(first, batch.num_tokens()));
    done(first, batch.num_tokens());
    first += batch.num_tokens();
    prefill_tokens_ += batch.num_tokens();
    for (const Piece& c : pieces) blocks.commit(ids[c.prompt], prompts[c.prompt].data() + c.start, c.n);
    const Piece& last = pieces.back();
    const bool done = last.start + last.n == int64_t(prompts[last.prompt].size());
    p = done ? last.prompt + 1 : last.prompt;
    offset = done ? 0 : last.start + last.n;
  }
}

PromptEmbeddings EngineCore::PromptImages::embeddings(int32_t token_id, int64_t hidden_size) const {
  if (row_of.empty()) return {};
  return PromptEmbeddings{features.data(), hidden_size, row_of.data(), int64_t(row_of.size()), token_id};
}

EngineCore::PromptImages EngineCore::prepare_images(const Prompt& prompt, std::vector<int32_t>& keys,
                                                    const std::string& what) const {
  PromptImages out;
  if (prompt.images.empty()) return out;
  const int64_t count = int64_t(prompt.images.size());
  if (!model_->vision()) {
    if (config().has_vision())
      throw InvalidInputError(what + " has " + std::to_string(count) +
                              " images, and max_images_per_prompt is 0 (the vision encoder is not loaded)");
    throw InvalidInputError(what + " has " + std::to_string(count) + " images, and this model takes none (" +
                            config().source + " has no vision_config)");
  }
  if (options_.max_images_per_prompt >= 0 && count > options_.max_images_per_prompt)
    throw InvalidInputError(what + " has " + std::to_string(count) + " images, over max_images_per_prompt " +
                            std::to_string(options_.max_images_per_prompt));
  const VisionConfig& v = model_->vision()->config();
  if (v.image_token_id < 0)
    throw InvalidInputError(what + " has images, and " + config().source +
                            "'s image_token_index lies outside the vocabulary: no token can carry their features");
  const int64_t per_tile = v.tokens_per_tile();
  // One key per image token: the pixels' hash mixed with the token's place in the image, as a
  // negative id (no real token). Two blocks match only if their images match too.
  std::vector<uint64_t> hashes;
  for (int64_t i = 0; i < count; ++i) {
    const ImageInput& im = prompt.images[size_t(i)];
    const std::string name = what + " image " + std::to_string(i);
    if (im.num_tiles < 1) throw InvalidInputError(name + " has num_tiles " + std::to_string(im.num_tiles) + " (>= 1 needed)");
    if (int64_t(im.pixel_values.size()) != im.num_tiles * v.tile_floats())
      throw InvalidInputError(name + ": pixel_values holds " + std::to_string(im.pixel_values.size()) + " floats, not " +
                              std::to_string(im.num_tiles) + " tiles x " + std::to_string(v.num_channels) + " x " +
                              std::to_string(v.image_size) + " x " + std::to_string(v.image_size));
    uint64_t h = mix64(uint64_t(im.num_tiles) + 0x9e3779b97f4a7c15ULL);
    for (float f : im.pixel_values) {
      if (!std::isfinite(f)) throw InvalidInputError(name + ": pixel_values holds a value that is not finite");
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      h = mix64(h ^ bits);
    }
    hashes.push_back(h);
    out.tiles += im.num_tiles;
  }
  out.row_of.assign(keys.size(), -1);
  // Feature rows go to the image tokens in order, image after image; `within` counts the current
  // image's rows.
  int64_t found = 0, image = 0, within = 0;
  for (size_t p = 0; p < keys.size(); ++p) {
    if (keys[p] != v.image_token_id) continue;
    if (found == 0) out.first = int64_t(p);
    if (found < out.tiles * per_tile) {
      keys[p] = -1 - int32_t(mix64(hashes[size_t(image)] ^ uint64_t(within + 1) * 0x9e3779b97f4a7c15ULL) & 0x3fffffff);
      out.row_of[p] = int32_t(found);
      if (++within == prompt.images[size_t(image)].num_tiles * per_tile) {
        ++image;
        within = 0;
      }
    }
    ++found;
  }
  if (found != out.tiles * per_tile)
    throw InvalidInputError(what + " has " + std::to_string(found) + " image tokens (image_token_index " +
                            std::to_string(v.image_token_id) + ") for " + std::to_string(count) + " images of " +
                            std::to_string(out.tiles) + " tiles, which give " + std::to_string(out.tiles * per_tile) +
                            " features (" + std::to_string(per_tile) + " per tile)");
  out.images = prompt.images;
  return out;
}

void EngineCore::encode(const std::vector<PromptImages*>& pending) {
  if (pending.empty()) return;
  VisionModel& vision = *model_->vision();
  const int64_t tile_floats = vision.config().tile_floats(), H = config().hidden_size;
  const int64_t rows_per_tile = vision.config().tokens_per_tile();
  int64_t tiles = 0;
  for (const PromptImages* p : pending) tiles += p->tiles;
  std::vector<float> pixels;
  pixels.reserve(size_t(tiles * tile_floats));
  for (const PromptImages* p : pending)
    for (const ImageInput& im : p->images) pixels.insert(pixels.end(), im.pixel_values.begin(), im.pixel_values.end());
  std::vector<float> features(size_t(tiles * rows_per_tile * H));
  vision.encode(pixels.data(), tiles, features.data());
  const float* at = features.data();
  for (PromptImages* p : pending) {
    const int64_t n = p->tiles * rows_per_tile * H;
    p->features.assign(at, at + n);
    at += n;
    p->images.clear();
    p->images.shrink_to_fit();
    p->encoded = true;
  }
}

std::vector<float> EngineCore::encode_image(const ImageInput& image) {
  // A prompt of just the image's tokens.
  std::vector<int32_t> keys(size_t(std::max<int64_t>(image.num_tiles, 0) * vision_.tokens_per_tile), vision_.image_token_id);
  PromptImages im = prepare_images(Prompt(keys, {image}), keys, "image");
  const std::lock_guard<std::mutex> lock(mutex_);
  use_threads();
  encode({&im});
  return im.features;
}

EngineStats EngineCore::stats() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  EngineStats s;
  const KvLayout& layout = cache_->layout();
  const BlockManager::Stats kv = cache_->blocks().stats();
  s.kv_blocks_total = kv.pages_total;
  s.kv_blocks_free = kv.pages_free;
  s.kv_blocks_cached = kv.pages_cached;
  s.kv_global_blocks_used = kv.pages_used_global;
  s.kv_local_blocks_used = kv.pages_used_local;
  s.prefix_cache_hit_tokens = kv.prefix_hit_tokens;
  s.kv_block_size = layout.block_size;
  s.weight_bytes = model_->weights().bytes + (model_->vision() ? model_->vision()->bytes() : 0);
  s.weight_format = model_->weights().format;
  s.kv_block_bytes = layout.page_bytes;
  s.kv_bytes_per_token = layout.bytes_per_token();
  s.kv_global_layer_groups = layout.num_groups(AttentionKind::Global);
  s.kv_local_layer_groups = layout.num_groups(AttentionKind::Local);
  for (const auto& [id, r] : requests_) {
    const bool running = std::any_of(r->samples.begin(), r->samples.end(), [](const auto& q) { return q->running; });
    (running ? s.requests_running : s.requests_waiting) += 1;
  }
  s.prefill_tokens_computed = prefill_tokens_;
  s.decode_tokens_computed = decode_tokens_;
  s.preemptions = preemptions_;
  s.expert_tokens = model_->expert_tokens();
  return s;
}

}  // namespace corral
