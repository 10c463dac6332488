// corral::Engine's state: the request queues, the scheduler, the KV cache and the model. The
// public class (corral/engine.h) forwards to it; its members are documented there.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "corral/device.h"
#include "corral/engine.h"
#include "corral/kernels/sampling.h"
#include "corral/generation_config.h"
#include "corral/kv_cache.h"
#include "corral/model.h"

namespace corral {

class EngineCore {
 public:
  EngineCore(const std::string& model_dir, const EngineOptions& options);
  ~EngineCore();

  const ModelConfig& config() const { return model_->config(); }
  const EngineOptions& options() const { return options_; }
  int64_t max_model_len() const { return max_model_len_; }
  const GenerationDefaults& defaults() const { return defaults_; }

  const VisionInfo& vision() const { return vision_; }

  int64_t add_request(const Prompt& prompt, const SamplingParams& params);
  std::vector<RequestUpdate> step();
  void abort(int64_t request_id);
  void finish_sample(int64_t request_id, int32_t index);
  bool has_unfinished() const;

  void prompt_logits(const std::vector<Prompt>& prompts, float* out);
  void prompt_logprobs(const std::vector<std::vector<int32_t>>& prompts, double* out);

  EngineStats stats() const;

  // The vision encoder alone: features [tiles * tokens_per_tile, hidden_size] of one image's
  // tiles (as a Prompt's images give them), for tests and tools.
  std::vector<float> encode_image(const ImageInput& image);

 private:
  struct Request;
  struct Sequence;
  // A prompt's images, from the pixels to the features that replace its image tokens.
  struct PromptImages {
    std::vector<ImageInput> images;  // released once encoded
    int64_t tiles = 0;
    std::vector<float> features;     // [image tokens, hidden_size] once encoded
    std::vector<int32_t> row_of;     // per prompt position: its feature row, or -1
    int64_t first = 0;               // the first image token's position
    bool encoded = false;
    PromptEmbeddings embeddings(int32_t token_id, int64_t hidden_size) const;
  };
  // Sequences in first-come first-served order: by request id, then sample index.
  using Queue = std::map<std::pair<int64_t, int32_t>, Sequence*>;

  void validate_tokens(const std::vector<int32_t>& tokens, const char* what) const;
  // Checks prompt's images against its image tokens (`what` names it in errors) and returns them
  // ready to encode; `keys` (a copy of the prompt's tokens) gets the image tokens' prefix-cache
  // keys, which stand for the pixels (different images never share KV blocks).
  PromptImages prepare_images(const Prompt& prompt, std::vector<int32_t>& keys, const std::string& what) const;
  // Encodes the images of every entry not encoded yet, all tiles in one batch.
  void encode(const std::vector<PromptImages*>& pending);
  // prompt_logits' passes: each pass's logits go to rows(first, n) ([n, vocab] floats for the
  // prompts' tokens first .. first + n - 1, counted over all prompts), then to done(first, n).
  void run_prompts(const std::vector<Prompt>& prompts,
                   const std::function<float*(int64_t first, int64_t n)>& rows,
                   const std::function<void(int64_t first, int64_t n)>& done);
  void use_threads() const;
  void preempt(Sequence& s);
  void fork_samples(Request& r);
  void finish(Sequence& s, FinishReason why, RequestUpdate* update);
  // Draws the next token of seqs[d] from row rows[d] of `logits` (the model's, on its device),
  // and ends the samples that stop.
  void sample(const float* logits, const std::vector<Sequence*>& seqs, const std::vector<int64_t>& rows,
              std::vector<RequestUpdate>& updates);

  mutable std::mutex mutex_;  // held by every public member function but the immutable accessors
  EngineOptions options_;
  std::unique_ptr<Llama4Model> model_;
  GenerationDefaults defaults_;
  VisionInfo vision_;
  std::unique_ptr<KvCache> cache_;
  int64_t max_model_len_ = 0;
  int64_t next_id_ = 0;
  std::map<int64_t, std::unique_ptr<Request>> requests_;  // by id, which is arrival order
  Queue waiting_;  // hold no KV blocks: not started yet, or preempted
  Queue running_;  // hold KV blocks
  std::mt19937_64 seeder_;
  // Sampling's arrays on the model's device: the rows it adjusts (penalties, bans, masks), and on
  // a GPU the per-row inputs and outputs of the kernels; host_rows_ takes rows back for what only
  // the host computes (log-probabilities of more than kMaxDeviceLogprobs tokens).
  struct SamplingArrays {
    explicit SamplingArrays(Device d = {})
        : offsets(d), ids(d), counts(d), next(d), top_ids(d), mask_rows(d), masks(d), penalties(d), settings(d),
          uniform(d), chosen_lp(d), top_lp(d) {}
    DeviceArray<int64_t> offsets;
    DeviceArray<int32_t> ids, counts, next, top_ids, mask_rows;
    DeviceArray<uint32_t> masks;
    DeviceArray<PenaltyRow> penalties;
    DeviceArray<SamplerRow> settings;
    DeviceArray<float> uniform, chosen_lp, top_lp;
  };
  DeviceArray<float> processed_;
  SamplingArrays staging_;
  std::vector<float> host_rows_;
  int64_t prefill_tokens_ = 0, decode_tokens_ = 0, preemptions_ = 0;
};

}  // namespace corral
