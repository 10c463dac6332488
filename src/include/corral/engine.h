// The generation engine: requests in, tokens out, one batched forward pass per step().
// C++ services use it directly; the Python LLM class is a thin layer over it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "corral/error.h"
#include "corral/kv_cache.h"
#include "corral/model.h"

namespace corral {

// How to pick the tokens of one request (vLLM's semantics). Logits are adjusted in this order:
// penalties, temperature, then top-k, top-p and min-p keep the most likely tokens.
struct SamplingParams {
  int64_t n = 1;                   // samples from the prompt: forked after its prefill, copy-on-write
  float temperature = 0.f;         // 0: greedy
  int64_t top_k = 0;               // keep the k most likely tokens; 0: all
  float top_p = 1.f;               // keep the fewest most likely tokens whose probability reaches p
  float min_p = 0.f;               // keep tokens at least min_p times as likely as the most likely
  float repetition_penalty = 1.f;  // tokens of the prompt or the output: logit / p if > 0, else * p
  float presence_penalty = 0.f;    // minus this for every token the output already has
  float frequency_penalty = 0.f;   // minus this times the token's count in the output
  int64_t max_tokens = 16;
  int64_t min_tokens = 0;          // eos and stop tokens cannot end a sample before this many tokens
  bool ignore_eos = false;
  std::vector<int64_t> stop_token_ids;  // stop on these besides the model's eos ids
  int64_t seed = -1;                    // -1: drawn from the engine's generator
  int64_t logprobs = -1;                // >= 0: return the chosen token's log-probability and the top n
};

struct EngineOptions {
  int32_t block_size = 16;
  size_t kv_cache_bytes = 0;                 // 0: see KvCacheOptions
  std::string kv_cache_dtype = "auto";       // auto (the weights' dtype), float32, bfloat16, float16, fp8
  // What the products multiply bf16 weights with: auto (bf16-rounded activations, vdpbf16ps) or
  // float32 (exact products, float32 speed). Other weights always take float32 activations.
  std::string dtype = "auto";
  std::string quantization;                  // "", "int8", "int4": weights quantized at load (LoadOptions)
  bool enable_prefix_caching = true;
  int64_t max_model_len = 0;                 // 0: the config's max_position_embeddings
  int64_t max_num_seqs = 256;                // sequences in one step
  int64_t max_num_batched_tokens = 8192;     // tokens in one step (longer prompts go in pieces)
  double kv_watermark = 0.01;                // share of KV blocks a request may not start into
  int num_threads = 0;                       // 0: all cores
  uint64_t seed = 0;
};

enum class FinishReason { None, Length, Stop, Abort };
const char* finish_reason_name(FinishReason r);

// What one step produced for one sample of one request.
struct RequestUpdate {
  int64_t request_id = 0;
  int32_t index = 0;  // the sample, < SamplingParams::n
  std::vector<int32_t> new_token_ids;
  // With SamplingParams::logprobs >= 0, per new token: (token id, log-probability) of the chosen
  // token first, then of the top `logprobs` tokens in descending order.
  std::vector<std::vector<std::pair<int32_t, float>>> logprobs;
  FinishReason finish_reason = FinishReason::None;
  bool finished() const { return finish_reason != FinishReason::None; }
};

struct EngineStats {
  BlockManager::Stats kv;
  int64_t weight_bytes = 0;  // bytes of weights held (ModelWeights::bytes)
  std::string weight_format;
  int64_t kv_block_size = 0;
  int64_t kv_page_bytes = 0;
  double kv_bytes_per_token = 0;
  int64_t kv_global_groups = 0;
  int64_t kv_local_groups = 0;
  int64_t requests_waiting = 0;
  int64_t requests_running = 0;
  int64_t prefill_tokens_computed = 0;
  int64_t decode_tokens_computed = 0;
  int64_t preemptions = 0;
  std::vector<std::vector<int64_t>> expert_tokens;  // [layer][expert], cumulative; empty: dense layer
};

// Thread safety: any thread may call any member function at any time. Calls are serialized by
// the engine's lock (step() and prompt_logits() hold it for their whole forward pass), so
// requests added from several threads are batched into the same steps; one thread (or several
// taking turns) must keep calling step() while requests are unfinished. The OpenMP team of a
// step has EngineOptions::num_threads threads whichever thread calls it.
class Engine {
 public:
  Engine(const std::string& model_dir, const EngineOptions& options);
  ~Engine();

  const ModelConfig& config() const { return model_->config(); }
  const EngineOptions& options() const { return options_; }
  int64_t max_model_len() const { return max_model_len_; }

  // Queues a request (its KV blocks, and any cached prefix, are taken when it is scheduled).
  // Throws InvalidInputError for an empty prompt, an id outside the vocabulary, a prompt that
  // leaves no room to generate within max_model_len, or bad params; OutOfKVCacheError when one
  // sample of it could outgrow the whole KV cache.
  int64_t add_request(const std::vector<int32_t>& prompt, const SamplingParams& params);
  // Schedules sequences first come, first served (running ones first, then waiting ones while
  // blocks, max_num_seqs and the max_num_batched_tokens budget allow; long prompts go in pieces),
  // runs one batched forward pass and samples one token for each sequence whose tokens are all
  // computed. When a running sequence cannot get a block, the youngest running sequence is
  // preempted: it frees its blocks and is recomputed later, transparently. Finished sequences
  // release their blocks.
  std::vector<RequestUpdate> step();
  // Drops a request (every sample) and frees its blocks; unknown ids are ignored.
  void abort(int64_t request_id);
  // Ends one sample of a request (e.g. on a stop string seen in its text) and frees its blocks;
  // the request ends when its last sample does. Unknown ids are ignored.
  void finish_sample(int64_t request_id, int32_t index);
  bool has_unfinished() const;

  // Logits at every position of each prompt, all prompts batched together in forward passes of
  // up to max_num_batched_tokens tokens. out is [total tokens, vocab] float32, the prompts' rows
  // one after another. Every position is computed (no prefix reuse); the prompts' full blocks
  // join the prefix cache and their pages are released afterwards.
  void prompt_logits(const std::vector<std::vector<int32_t>>& prompts, float* out);
  // The same passes, keeping of each position only the log-probability of the prompt's next
  // token: out is [total tokens] float64, the last position of each prompt NaN. Logits are held
  // for one pass at a time (max_num_batched_tokens x vocab), whatever the prompts' length.
  void prompt_logprobs(const std::vector<std::vector<int32_t>>& prompts, double* out);

  EngineStats stats() const;

 private:
  struct Request;
  struct Sequence;
  // Sequences in first-come first-served order: by request id, then sample index.
  using Queue = std::map<std::pair<int64_t, int32_t>, Sequence*>;

  void validate_tokens(const std::vector<int32_t>& tokens, const char* what) const;
  // prompt_logits' passes: each pass's logits go to rows(first, n) ([n, vocab] floats for the
  // prompts' tokens first .. first + n - 1, counted over all prompts), then to done(first, n).
  void run_prompts(const std::vector<std::vector<int32_t>>& prompts,
                   const std::function<float*(int64_t first, int64_t n)>& rows,
                   const std::function<void(int64_t first, int64_t n)>& done);
  void use_threads() const;
  void preempt(Sequence& s);
  void fork_samples(Request& r);
  void finish(Sequence& s, FinishReason why, RequestUpdate* update);
  // Draws the next token of seqs[d] from logits row rows[d], and ends the samples that stop.
  void sample(const std::vector<Sequence*>& seqs, const std::vector<int64_t>& rows,
              std::vector<RequestUpdate>& updates);

  mutable std::mutex mutex_;  // held by every public member function but the immutable accessors
  EngineOptions options_;
  std::unique_ptr<Llama4Model> model_;
  std::unique_ptr<KvCache> cache_;
  int64_t max_model_len_ = 0;
  int64_t next_id_ = 0;
  std::map<int64_t, std::unique_ptr<Request>> requests_;  // by id, which is arrival order
  Queue waiting_;  // hold no KV blocks: not started yet, or preempted
  Queue running_;  // hold KV blocks
  std::mt19937_64 seeder_;
  std::vector<float> logits_, processed_;  // model logits; their copies for penalties and sampling
  int64_t prefill_tokens_ = 0, decode_tokens_ = 0, preemptions_ = 0;
};

}  // namespace corral
