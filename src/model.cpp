#include "corral/model.h"

#include <algorithm>
#include <cmath>

#include "corral/error.h"
#include "corral/kernels/attention.h"
#include "corral/kernels/embedding.h"
#include "corral/kernels/linear.h"
#include "corral/kernels/mlp.h"
#include "corral/kernels/moe.h"
#include "corral/kernels/norm.h"
#include "corral/kernels/rope.h"

namespace corral {

void ForwardBatch::add_sequence(const int32_t* tokens, int64_t n, int64_t position, const BlockManager& blocks,
                                BlockManager::SeqId id, bool want_logits, const PromptEmbeddings& e) {
  const int64_t bs = blocks.block_size();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = position + i;
    const int32_t row = p < e.length ? e.row_of[p] : -1;
    if (row >= 0) embeddings.emplace_back(int32_t(token_ids.size()), e.values + int64_t(row) * e.hidden_size);
    token_ids.push_back(row >= 0 ? e.token_id : tokens[i]);
    positions.push_back(int32_t(p));
  }
  for (int64_t g = 0; g < int64_t(tables.size()); ++g) {
    const std::vector<int32_t>& table = blocks.table(id, g);
    for (int64_t p = position; p < position + n; ++p) slots[g].push_back(int64_t(table[p / bs]) * bs + p % bs);
    tables[g].push_back(table);
  }
  seq_starts.push_back(int32_t(token_ids.size()));
  if (want_logits) logit_rows.push_back(int32_t(token_ids.size() - 1));
}

Llama4Model::Llama4Model(const std::string& dir, kernels::Activations act, const LoadOptions& load)
    : checkpoint_(dir),
      config_(load_config(checkpoint_.config_path())),
      weights_(load_weights(checkpoint_, config_, load)),
      act_(act) {
  if (config_.has_vision() && load.vision)
    vision_ = std::make_unique<VisionModel>(config_, load_vision_weights(checkpoint_, config_), act);
  inv_freq_.resize(config_.head_dim / 2);
  kernels::rope_inv_freq(inv_freq_.data(), config_.head_dim, config_.rope);
  expert_tokens_.resize(config_.num_layers);
  for (int64_t l = 0; l < config_.num_layers; ++l)
    if (config_.layers[l].moe) expert_tokens_[l].assign(config_.num_experts, 0);
}

void Llama4Model::forward(const ForwardBatch& batch, const KvCache& cache, float* logits) {
  const ModelConfig& c = config_;
  const int64_t T = batch.num_tokens(), H = c.hidden_size;
  if (T == 0) return;
  x_.resize(T * H);
  a_.resize(T * H);
  kernels::embedding(stream_, x_.data(), weights_.embed.data, weights_.embed.dtype, c.vocab_size, H,
                     batch.token_ids.data(), T);
  for (const auto& [row, values] : batch.embeddings) std::copy_n(values, H, x_.data() + int64_t(row) * H);

  // Each layer group's block tables as one padded [S, max_blocks] array for the attention kernel.
  const int64_t S = int64_t(batch.seq_starts.size()) - 1;
  std::vector<std::vector<int32_t>> tables(batch.tables.size());
  std::vector<AttentionBatch> groups(batch.tables.size());
  for (size_t g = 0; g < batch.tables.size(); ++g) {
    int32_t max_blocks = 1;
    for (const auto& t : batch.tables[g]) max_blocks = std::max(max_blocks, int32_t(t.size()));
    tables[g].assign(S * max_blocks, -1);
    for (int64_t s = 0; s < S; ++s)
      std::copy(batch.tables[g][s].begin(), batch.tables[g][s].end(), tables[g].begin() + s * max_blocks);
    groups[g] = AttentionBatch{batch.seq_starts.data(), int32_t(S), batch.positions.data(), tables[g].data(), max_blocks};
  }

  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& w = weights_.layers[l];
    kernels::rms_norm(stream_, a_.data(), x_.data(), DType::F32, w.input_norm.data, w.input_norm.dtype, T, H,
                      c.rms_norm_eps);
    const int64_t g = cache.layout().group_of_layer[l];
    attention(l, batch, cache.layer(l), groups[g], batch.slots[g].data());
    kernels::linear(stream_, x_.data(), H, attn_.data(), c.num_heads * c.head_dim, T, w.o, /*accumulate=*/true, act_);
    kernels::rms_norm(stream_, a_.data(), x_.data(), DType::F32, w.post_attention_norm.data,
                      w.post_attention_norm.dtype, T, H, c.rms_norm_eps);
    feed_forward(l, T);
  }

  // Final norm and lm_head on the requested rows only.
  const int64_t R = int64_t(batch.logit_rows.size());
  for (int64_t i = 0; i < R; ++i)
    kernels::rms_norm(stream_, a_.data() + i * H, x_.data() + int64_t(batch.logit_rows[i]) * H, DType::F32,
                      weights_.final_norm.data, weights_.final_norm.dtype, 1, H, c.rms_norm_eps);
  kernels::linear(stream_, logits, c.vocab_size, a_.data(), H, R, weights_.lm_head, false, act_);
}

void Llama4Model::attention(int64_t l, const ForwardBatch& batch, const PagedKv& kv, const AttentionBatch& ab,
                            const int64_t* slots) {
  const ModelConfig& c = config_;
  const LayerSpec& spec = c.layers[l];
  const LayerWeights& w = weights_.layers[l];
  const int64_t T = batch.num_tokens(), H = c.hidden_size, d = c.head_dim;
  const int64_t qw = c.num_heads * d, kvw = c.num_kv_heads * d;
  q_.resize(T * qw);
  k_.resize(T * kvw);
  v_.resize(T * kvw);
  attn_.resize(T * qw);
  if (w.qkv.data) {  // one product, then its rows split into q, k and v
    const int64_t n = qw + 2 * kvw;
    qkv_.resize(T * n);
    kernels::linear(stream_, qkv_.data(), n, a_.data(), H, T, w.qkv, false, act_);
    for (int64_t t = 0; t < T; ++t) {
      const float* row = qkv_.data() + t * n;
      std::copy_n(row, qw, q_.data() + t * qw);
      std::copy_n(row + qw, kvw, k_.data() + t * kvw);
      std::copy_n(row + qw + kvw, kvw, v_.data() + t * kvw);
    }
  } else {
    kernels::linear(stream_, q_.data(), qw, a_.data(), H, T, w.q, false, act_);
    kernels::linear(stream_, k_.data(), kvw, a_.data(), H, T, w.k, false, act_);
    kernels::linear(stream_, v_.data(), kvw, a_.data(), H, T, w.v, false, act_);
  }
  // Llama 4's order: RoPE, then QK norm (both RoPE layers only), then temperature (NoPE layers).
  if (spec.use_rope) {
    kernels::rope_interleaved(stream_, q_.data(), qw, T, c.num_heads, d, batch.positions.data(), inv_freq_.data());
    kernels::rope_interleaved(stream_, k_.data(), kvw, T, c.num_kv_heads, d, batch.positions.data(), inv_freq_.data());
  }
  if (spec.qk_norm) {
    kernels::rms_norm(stream_, q_.data(), q_.data(), DType::F32, nullptr, DType::F32, T * c.num_heads, d, c.rms_norm_eps);
    kernels::rms_norm(stream_, k_.data(), k_.data(), DType::F32, nullptr, DType::F32, T * c.num_kv_heads, d,
                      c.rms_norm_eps);
  }
  if (spec.temperature_tuning)
    kernels::attn_temperature_scale(stream_, q_.data(), qw, T, qw, batch.positions.data(), c.attn_scale, c.floor_scale);
  kernels::kv_cache_write(stream_, kv, k_.data(), v_.data(), kvw, T, slots);
  kernels::paged_attention(stream_, attn_.data(), q_.data(), c.num_heads, kv, ab, float(1.0 / std::sqrt(double(d))),
                           spec.chunked ? c.attention_chunk_size : 0);
}

void Llama4Model::feed_forward(int64_t l, int64_t T) {
  const ModelConfig& c = config_;
  const LayerWeights& w = weights_.layers[l];
  if (c.layers[l].moe) {
    kernels::moe(stream_, x_.data(), a_.data(), T, w.moe, int(c.top_k), expert_tokens_[l].data(), act_);
    return;
  }
  kernels::swiglu_mlp(stream_, x_.data(), a_.data(), T, w.mlp_gate_up, w.mlp_down, act_);
}

}  // namespace corral
