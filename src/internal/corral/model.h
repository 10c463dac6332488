// The Llama 4 text model: loads a checkpoint and runs forward passes over ragged batches.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "corral/checkpoint.h"
#include "corral/config.h"
#include "corral/device.h"
#include "corral/kernels/attention.h"
#include "corral/kv_cache.h"
#include "corral/vision_model.h"
#include "corral/weights.h"

namespace corral {

// Embeddings that replace some of a prompt's own (image features at its <|patch|> tokens):
// position p < length with row_of[p] >= 0 is embedded as values[row_of[p] * hidden_size ...]
// and has token id token_id.
struct PromptEmbeddings {
  const float* values = nullptr;
  int64_t hidden_size = 0;
  const int32_t* row_of = nullptr;
  int64_t length = 0;
  int32_t token_id = 0;
};

// The tokens of one forward pass from many sequences, prefill pieces and decode steps mixed.
struct ForwardBatch {
  explicit ForwardBatch(int64_t num_groups) : slots(num_groups) {}

  std::vector<int32_t> token_ids;      // [T]
  std::vector<int32_t> positions;      // [T] absolute position of each token in its sequence
  std::vector<int32_t> seq_starts{0};  // [S + 1] rows of each sequence
  std::vector<int32_t> table_rows;     // [S] each sequence's row of the persistent block tables
  // [layer group][T] KV slot of each token: computed here from the host's tables (a few per
  // sequence per step), which the KV write reads as they are.
  std::vector<std::vector<int64_t>> slots;
  std::vector<int32_t> logit_rows;     // rows whose logits are wanted, in output order
  std::vector<std::pair<int32_t, const float*>> embeddings;  // rows embedded from these hidden_size floats

  // Adds tokens[0..n) of sequence `id` of `blocks`, the first at `position`; room for them must
  // already be appended. The last row's logits are requested when `want_logits`. Positions that
  // `embeddings` covers take its token id and values (their entries in tokens are cache keys).
  void add_sequence(const int32_t* tokens, int64_t n, int64_t position, const BlockManager& blocks,
                    BlockManager::SeqId id, bool want_logits, const PromptEmbeddings& embeddings = {});
  int64_t num_tokens() const { return int64_t(token_ids.size()); }
};

class Llama4Model {
 public:
  // Loads config.json and the safetensors weights of `dir` onto load.device: packed for the CPU
  // products, which multiply bfloat16 weights with activations as `act` says, or copied as stored
  // to a GPU (its products follow `act` too, except the fused MoE's expert products, which always
  // round activations to a 16-bit weight dtype there).
  // On a GPU, decode steps run as CUDA graphs unless enforce_eager (see forward).
  explicit Llama4Model(const std::string& dir, kernels::Activations act = kernels::Activations::Native,
                       const LoadOptions& load = {}, bool enforce_eager = false);

  const ModelConfig& config() const { return config_; }
  Device device() const { return stream_.get().device; }
  // The stream every pass runs on (the KV cache's page copies go on it too).
  const Stream& stream() const { return stream_.get(); }
  // The dtype of the checkpoint's weights (of its embedding table).
  DType weights_dtype() const { return weights_.embed.dtype; }
  const ModelWeights& weights() const { return weights_; }
  // The vision encoder, when the checkpoint has one and LoadOptions::vision asked for it (on the
  // same device; its features pass through the host, where the engine keeps them).
  VisionModel* vision() { return vision_.get(); }
  // Tokens routed to each expert of each layer by all forward passes so far ([layer][expert];
  // empty for dense layers).
  const std::vector<std::vector<int64_t>>& expert_tokens();

  // Runs every layer over the batch, writing each token's K/V into `cache` (on this model's
  // device), and returns the logits of batch.logit_rows, [rows, vocab_size], in this model's
  // device memory (valid until the next pass; on a GPU possibly not computed yet: work on
  // stream() orders after them). With host_logits they are also (on the CPU: only) stored there,
  // complete when forward returns. Throws InvalidInputError for a token id outside the
  // vocabulary (before anything is written). First writes the cache's block-table changes.
  // On a GPU a decode batch (every sequence one row, all rows' logits, no image embeddings)
  // replays a CUDA graph of its size, unless the model was made with enforce_eager.
  const float* forward(const ForwardBatch& batch, KvCache& cache, float* host_logits = nullptr);

 private:
  // A pass's inputs in this model's device memory, staged before the compute: the compute
  // reads only device buffers, so that a CUDA graph of it replays with the next step's inputs.
  struct Staged {
    const int32_t* ids = nullptr;
    const int32_t* positions = nullptr;
    std::vector<AttentionBatch> groups;  // per layer group
    std::vector<const int64_t*> slots;   // per layer group
  };
  // The CUDA graph of decode steps of one batch size, with the buffer addresses it captured.
  struct DecodeGraph {
    bool warmed = false;  // a step of this size ran eagerly
    CudaGraph graph;
    std::vector<const void*> buffers;
  };
  Staged stage(const ForwardBatch& batch, KvCache& cache);
  // Every layer and the logits of batch.logit_rows, into host_logits (CPU) or logits_.
  float* compute(const ForwardBatch& batch, const KvCache& cache, const Staged& in, float* host_logits);
  // The addresses of the buffers a pass reads and writes besides the weights and the KV pages.
  std::vector<const void*> buffers(const KvCache& cache) const;
  void attention(int64_t layer, int64_t tokens, const PagedKv& kv, const AttentionBatch& ab, const int32_t* positions,
                 const int64_t* slots);
  void feed_forward(int64_t layer, int64_t rows);

  Checkpoint checkpoint_;  // first: a missing folder is reported as such, before its config
  ModelConfig config_;
  StreamOwner stream_;
  ModelWeights weights_;
  std::unique_ptr<VisionModel> vision_;
  std::vector<float> inv_freq_;
  std::vector<std::vector<int64_t>> expert_tokens_;
  kernels::Activations act_;
  // Activations of the current pass, kept between passes to avoid reallocation.
  DeviceArray<float> x_, a_, qkv_, q_, k_, v_, attn_;
  // The logits a pass returns; on a GPU also the batch's arrays, the rotary frequencies and the
  // expert counts [layer * experts].
  DeviceArray<int32_t> ids_, positions_, seq_starts_, table_rows_;
  std::vector<DeviceArray<int64_t>> slots_;
  DeviceArray<float> inv_freq_device_, logits_;
  DeviceArray<int64_t> expert_counts_;
  // paged_attention's plans of a pass, by kind (global layers, chunked ones): the first layer of
  // a kind plans its work, the others reuse it. A plan depends on the batch and the chunk size,
  // not on the block tables, so one per chunk size serves every layer group. Their memory grows
  // to what the last pass asked for.
  AttentionPlan plans_[2];
  DeviceArray<char> plan_memory_[2];
  bool enforce_eager_;
  std::map<int64_t, DecodeGraph> graphs_;  // by batch size
};

}  // namespace corral
