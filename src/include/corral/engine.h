// The generation engine: token ids in, token ids out, one batched forward pass per step().
// C++ services use it directly or through AsyncEngine (corral/async_engine.h), which steps it on
// a thread of its own; the Python LLM class is a thin layer over AsyncEngine. Text (tokenizing,
// chat templates, stop strings) stays in Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "corral/error.h"

namespace corral {

// Structured output: the matcher of a grammar that decides which tokens one sample may take next
// (JSON schema, regex, tool calls). The engine calls it on the thread that steps.
struct TokenConstraint {
  virtual ~TokenConstraint() = default;
  // Writes all `words` words of mask (words = ceil(vocab_size / 32)): bit t % 32 of word t / 32
  // set allows token t next. Called before each token of the sample is drawn.
  virtual void fill_bitmask(uint32_t* mask, int64_t words) = 0;
  // The token drawn; not called for a stop token that ends the sample.
  virtual void accept_token(int32_t token) = 0;
};
using TokenConstraintFactory = std::function<std::unique_ptr<TokenConstraint>()>;

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
  // Structured output: called n times when the request is added, one matcher per sample. Tokens
  // its mask forbids get -inf logits before the penalties; a mask allowing none allows the stop
  // tokens. An exception from the matcher ends its sample with FinishReason::Error.
  TokenConstraintFactory constraint;
};

// One image of a prompt, preprocessed as Llama 4's image processor does (Python:
// corral.image_processor): its tiles as float32 [num_tiles, channels, image_size, image_size].
struct ImageInput {
  std::vector<float> pixel_values;
  int64_t num_tiles = 0;
};

// What a request starts from: token ids and, for a checkpoint with a vision encoder, images.
// Each tile of each image, in order, gives vision_config's tokens_per_tile features, which
// replace the prompt's image_token_index (<|patch|>) tokens one for one; the counts must agree.
struct Prompt {
  std::vector<int32_t> token_ids;
  std::vector<ImageInput> images;

  Prompt() = default;
  // Token ids alone are a prompt (implicit: add_request(ids, params), add_request({1, 2, 3}, params)).
  Prompt(std::vector<int32_t> ids) : token_ids(std::move(ids)) {}  // NOLINT(google-explicit-constructor)
  Prompt(std::initializer_list<int32_t> ids) : token_ids(ids) {}    // NOLINT(google-explicit-constructor)
  Prompt(std::vector<int32_t> ids, std::vector<ImageInput> imgs) : token_ids(std::move(ids)), images(std::move(imgs)) {}
};

struct EngineOptions {
  // "cpu", "cuda" or "cuda:N": where the text model's weights, KV cache and forward passes live
  // (DeviceError naming the reason when that GPU cannot be used), the vision encoder's too. On a
  // GPU: bfloat16, float16 or float32 checkpoints (quantized ones: NotSupportedError so far).
  std::string device = "cpu";
  std::string tokenizer_dir;                 // "": the model folder (its special tokens end samples)
  int32_t block_size = 16;
  size_t kv_cache_bytes = 0;                 // 0: half the memory available after loading (GPU: 85% of its free memory)
  std::string kv_cache_dtype = "auto";       // auto (the weights' dtype), float32, bfloat16, float16, fp8
  // What the products multiply bf16 weights with: auto (bf16-rounded activations, vdpbf16ps) or
  // float32 (exact products, float32 speed). Other weights always take float32 activations.
  std::string dtype = "auto";
  std::string quantization;                  // "", "int8", "int4": 16/32-bit weights quantized at load
  bool enable_prefix_caching = true;
  // On a GPU, decode steps (every sequence one new token) replay a CUDA graph captured for their
  // batch size; true runs every step kernel by kernel (vLLM's name). Ignored on the CPU.
  bool enforce_eager = false;
  int64_t max_model_len = 0;                 // 0: the config's max_position_embeddings
  int64_t max_num_seqs = 256;                // sequences in one step
  int64_t max_num_batched_tokens = 8192;     // tokens in one step (longer prompts go in pieces)
  double kv_watermark = 0.01;                // share of KV blocks a request may not start into
  int num_threads = 0;                       // 0: all cores
  // Images one prompt may carry; -1: any number; 0: none (the vision encoder is not loaded).
  int64_t max_images_per_prompt = -1;
  uint64_t seed = 0;
};

// What a caller needs to prepare images for the model (see Prompt).
struct VisionInfo {
  int64_t hidden_size = 0;  // 0: no vision encoder
  int64_t image_size = 0;   // tile side in pixels
  int64_t patch_size = 0;
  int64_t num_channels = 0;
  int64_t tokens_per_tile = 0;
  int32_t image_token_id = -1;  // image_token_index: the token each feature replaces
};

// Error: the step that computed the request failed (RequestUpdate::error says why).
enum class FinishReason { None, Length, Stop, Abort, Error };
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
  std::string error;  // with FinishReason::Error: the message of the exception that ended it
  bool finished() const { return finish_reason != FinishReason::None; }
};

struct EngineStats {
  int64_t weight_bytes = 0;  // bytes of weights held
  std::string weight_format;  // e.g. "bfloat16", "int8 (quantized at load from bfloat16)"
  int64_t kv_block_size = 0;  // tokens per KV block
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_free = 0;         // takeable now: never used, or cached with no user
  int64_t kv_blocks_cached = 0;       // in the prefix cache (used or not)
  int64_t kv_global_blocks_used = 0;  // held by global (NoPE, full attention) layer groups
  int64_t kv_local_blocks_used = 0;   // held by local (chunked attention) layer groups
  int64_t kv_block_bytes = 0;
  double kv_bytes_per_token = 0;
  int64_t kv_global_layer_groups = 0;
  int64_t kv_local_layer_groups = 0;
  int64_t prefix_cache_hit_tokens = 0;  // prompt tokens served from the prefix cache, in total
  int64_t requests_waiting = 0;
  int64_t requests_running = 0;
  int64_t prefill_tokens_computed = 0;
  int64_t decode_tokens_computed = 0;
  int64_t preemptions = 0;
  std::vector<std::vector<int64_t>> expert_tokens;  // [layer][expert], cumulative; empty: dense layer
};

class EngineCore;  // the scheduler, KV cache and model (internal)

// Thread safety: any thread may call any member function at any time. Calls are serialized by
// the engine's lock (step() and prompt_logits() hold it for their whole forward pass), so
// requests added from several threads are batched into the same steps; one thread (or several
// taking turns) must keep calling step() while requests are unfinished (AsyncEngine does). The
// OpenMP team of a step has EngineOptions::num_threads threads whichever thread calls it.
class Engine {
 public:
  // Loads the Hugging Face checkpoint in model_dir (config.json, safetensors weights, and the
  // optional generation_config.json and tokenizer files). Throws a corral::Error subclass naming
  // the file, tensor or field at fault.
  explicit Engine(const std::string& model_dir, const EngineOptions& options = EngineOptions{});
  ~Engine();
  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;

  const EngineOptions& options() const;
  int64_t vocab_size() const;
  int64_t max_model_len() const;  // prompt plus generated tokens
  // The vision encoder's settings (hidden_size 0: the model takes no images, or
  // max_images_per_prompt is 0).
  const VisionInfo& vision() const;
  // Tokens that end a sample unless SamplingParams::ignore_eos, sorted: config.json's eos ids,
  // generation_config.json's eos_token_id, and the tokenizer's eos and end-of-turn tokens.
  const std::vector<int32_t>& stop_token_ids() const;
  // SamplingParams{} with generation_config.json's temperature, top_k, top_p, min_p,
  // repetition_penalty and max_new_tokens: what to use when a request brings none.
  const SamplingParams& default_sampling_params() const;

  // Queues a request (its KV blocks, and any cached prefix, are taken when it is scheduled; its
  // images are encoded, batched with the other requests' images, in the step that first reaches
  // them). Throws InvalidInputError for an empty prompt, an id outside the vocabulary, a prompt
  // that leaves no room to generate within max_model_len, images the model cannot take or that
  // disagree with the prompt's image tokens, or bad params; OutOfKVCacheError when one sample of
  // it could outgrow the whole KV cache. Returns the request's id.
  int64_t add_request(const Prompt& prompt, const SamplingParams& params);
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
  void prompt_logits(const std::vector<Prompt>& prompts, float* out);
  // The same passes, keeping of each position only the log-probability of the prompt's next
  // token: out is [total tokens] float64, the last position of each prompt NaN. Logits are held
  // for one pass at a time (max_num_batched_tokens x vocab), whatever the prompts' length.
  void prompt_logprobs(const std::vector<std::vector<int32_t>>& prompts, double* out);

  EngineStats stats() const;

  // The internals, for Corral's own bindings and tests (their header is not installed).
  EngineCore& core() { return *core_; }
  const EngineCore& core() const { return *core_; }

 private:
  std::unique_ptr<EngineCore> core_;
};

}  // namespace corral
