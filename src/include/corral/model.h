// The Llama 4 text model: loads a checkpoint and runs forward passes over ragged batches.
#pragma once

#include <string>
#include <vector>

#include "corral/checkpoint.h"
#include "corral/config.h"
#include "corral/kv_cache.h"
#include "corral/weights.h"

namespace corral {

// The tokens of one forward pass from many sequences, prefill pieces and decode steps mixed.
struct ForwardBatch {
  std::vector<int32_t> token_ids;     // [T]
  std::vector<int32_t> positions;     // [T] absolute position of each token in its sequence
  std::vector<int32_t> seq_starts{0};  // [S + 1] rows of each sequence
  std::vector<int64_t> slots;         // [T] KV-cache slot written by each token
  std::vector<std::vector<int32_t>> block_tables;  // [S] the block table of each sequence
  std::vector<int32_t> logit_rows;    // rows whose logits are wanted, in output order

  // Adds tokens[0..n) of a sequence whose first new token sits at `position`; `blocks` must
  // already cover positions up to position + n - 1. Its last row's logits are requested when
  // `want_logits`.
  void add_sequence(const int32_t* tokens, int64_t n, int64_t position, const std::vector<int32_t>& blocks,
                    int32_t block_size, bool want_logits);
  int64_t num_tokens() const { return int64_t(token_ids.size()); }
};

class Llama4Model {
 public:
  // Loads config.json and the safetensors weights of `dir` (memory-mapped, not copied).
  explicit Llama4Model(const std::string& dir);

  const ModelConfig& config() const { return config_; }
  // The dtype of the checkpoint's weights (of its embedding table).
  DType weights_dtype() const { return weights_.embed.dtype; }

  // Runs every layer over the batch, writing each token's K/V into `cache`, and stores the
  // logits of batch.logit_rows in logits[i * vocab_size ...]. Throws InvalidInputError for a
  // token id outside the vocabulary (before anything is written).
  void forward(const ForwardBatch& batch, const KvCache& cache, float* logits);

 private:
  void attention(int64_t layer, const ForwardBatch& batch, const PagedKv& kv, const AttentionBatch& ab);
  void feed_forward(int64_t layer, int64_t rows);

  Checkpoint checkpoint_;  // first: a missing folder is reported as such, before its config
  ModelConfig config_;
  ModelWeights weights_;
  std::vector<float> inv_freq_;
  Stream stream_;
  // Activations of the current pass, kept between passes to avoid reallocation.
  std::vector<float> x_, a_, q_, k_, v_, attn_;
};

}  // namespace corral
