#include "corral/model.h"

#include <algorithm>
#include <cmath>
#include <string>

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
  for (int64_t g = 0; g < int64_t(slots.size()); ++g) {
    const std::vector<int32_t>& table = blocks.table(id, g);
    for (int64_t p = position; p < position + n; ++p) slots[g].push_back(int64_t(table[p / bs]) * bs + p % bs);
  }
  table_rows.push_back(blocks.row(id));
  seq_starts.push_back(int32_t(token_ids.size()));
  if (want_logits) logit_rows.push_back(int32_t(token_ids.size() - 1));
}

Llama4Model::Llama4Model(const std::string& dir, kernels::Activations act, const LoadOptions& load, bool enforce_eager)
    : checkpoint_(dir),
      config_(load_config(checkpoint_.config_path())),
      stream_(load.device),
      weights_(load_weights(checkpoint_, config_, load)),
      act_(act),
      enforce_eager_(enforce_eager) {
  if (config_.has_vision() && load.vision)
    vision_ = std::make_unique<VisionModel>(config_, load_vision_weights(checkpoint_, config_, stream()), act,
                                            stream());
  inv_freq_.resize(config_.head_dim / 2);
  kernels::rope_inv_freq(inv_freq_.data(), config_.head_dim, config_.rope);
  expert_tokens_.resize(config_.num_layers);
  for (int64_t l = 0; l < config_.num_layers; ++l)
    if (config_.layers[l].moe) expert_tokens_[l].assign(config_.num_experts, 0);
  const Device d = device();
  for (DeviceArray<float>* a : {&x_, &a_, &qkv_, &q_, &k_, &v_, &attn_, &inv_freq_device_, &logits_})
    *a = DeviceArray<float>(d);
  for (DeviceArray<int32_t>* a : {&ids_, &positions_, &seq_starts_, &table_rows_}) *a = DeviceArray<int32_t>(d);
  expert_counts_ = DeviceArray<int64_t>(d);
  for (DeviceArray<char>& m : plan_memory_) m = DeviceArray<char>(d);
  if (d.type == DeviceType::CUDA) {
    inv_freq_device_.assign(inv_freq_.data(), inv_freq_.size(), stream());
    const std::vector<int64_t> zeros(size_t(config_.num_layers * config_.num_experts), 0);
    expert_counts_.assign(zeros.data(), zeros.size(), stream());
    stream_.synchronize();
  }
}

const std::vector<std::vector<int64_t>>& Llama4Model::expert_tokens() {
  if (device().type == DeviceType::CUDA) {
    const int64_t E = config_.num_experts;
    std::vector<int64_t> counts(size_t(config_.num_layers * E));
    use_device(device());
    copy(counts.data(), expert_counts_.data(), counts.size() * sizeof(int64_t), stream());
    stream_.synchronize();
    for (int64_t l = 0; l < config_.num_layers; ++l)
      if (config_.layers[l].moe) std::copy_n(counts.begin() + l * E, E, expert_tokens_[l].begin());
  }
  return expert_tokens_;
}

const float* Llama4Model::forward(const ForwardBatch& batch, KvCache& cache, float* host_logits) {
  const ModelConfig& c = config_;
  const int64_t T = batch.num_tokens();
  if (T == 0) return nullptr;
  const Stream& s = stream();
  const bool gpu = s.device.type == DeviceType::CUDA;
  use_device(s.device);
  if (gpu)  // the CPU's embedding checks the ids; the GPU's cannot throw
    for (int64_t t = 0; t < T; ++t)
      if (batch.token_ids[t] < 0 || batch.token_ids[t] >= c.vocab_size)
        throw InvalidInputError("token id " + std::to_string(batch.token_ids[t]) + " at index " + std::to_string(t) +
                                " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  const Staged in = stage(batch, cache);
  const int64_t S = int64_t(batch.table_rows.size()), R = int64_t(batch.logit_rows.size());
  bool decode = gpu && !enforce_eager_ && batch.embeddings.empty() && T == S && R == S;
  for (int64_t r = 0; decode && r < R; ++r) decode = batch.logit_rows[r] == r;
  float* out = nullptr;
  if (!decode) {
    out = compute(batch, cache, in, host_logits && !gpu ? host_logits : nullptr);
  } else {
    // A decode step: one graph per batch size S, captured at the second step of that size (the
    // first runs eagerly, growing every buffer to its size, so that nothing is allocated while
    // capturing), replayed afterwards. Exact sizes rather than vLLM's padded buckets: padding
    // rows would be routed to experts too, changing the MoE's expert counts and grouping, and so
    // a sequence's results and the expert statistics would differ from an eager step's.
    DecodeGraph& g = graphs_[S];
    if (!g.warmed) {
      out = compute(batch, cache, in, nullptr);
      g.warmed = true;
    } else {
      // A graph replays the addresses it captured: a buffer that has grown since (a larger
      // prefill) means capturing anew.
      const std::vector<const void*> now = buffers(cache);
      if (!g.graph || g.buffers != now) {
        g.graph = CudaGraph();
        try {
          g.graph = CudaGraph::capture(s, [&] { compute(batch, cache, in, nullptr); });
        } catch (const DeviceError& e) {
          throw DeviceError(std::string(e.what()) + " (capturing the CUDA graph of decode steps of " +
                            std::to_string(S) + " sequences; enforce_eager=True runs them without graphs)");
        }
        g.buffers = now;
      }
      g.graph.launch(s);
      out = logits_.data();
    }
  }
  if (host_logits && gpu) {
    copy(host_logits, out, size_t(R * c.vocab_size) * sizeof(float), s);
    synchronize(s);
  }
  return out;
}

Llama4Model::Staged Llama4Model::stage(const ForwardBatch& batch, KvCache& cache) {
  const Stream& s = stream();
  Staged in;
  in.ids = on_device(ids_, batch.token_ids, s);
  in.positions = on_device(positions_, batch.positions, s);
  const int32_t* seq_starts = on_device(seq_starts_, batch.seq_starts, s);
  // Each layer group reads its rows of the persistent block tables, brought up to date here.
  const BlockTables& pool = cache.sync_tables();
  const int32_t* table_rows = on_device(table_rows_, batch.table_rows, s);
  const int32_t S = int32_t(batch.table_rows.size());
  const size_t G = batch.slots.size();
  while (slots_.size() < G) slots_.emplace_back(s.device);
  for (int k = 0; k < 2; ++k) {
    AttentionPlan& p = plans_[k];
    p.data = plan_memory_[k].reserve(p.needed);
    p.bytes = std::max(p.bytes, p.needed);
  }
  for (size_t g = 0; g < G; ++g) {
    in.groups.push_back(
        AttentionBatch{seq_starts, S, in.positions, pool.group(int64_t(g)), table_rows, pool.max_blocks()});
    in.slots.push_back(on_device(slots_[g], batch.slots[g], s));
  }
  return in;
}

std::vector<const void*> Llama4Model::buffers(const KvCache& cache) const {
  std::vector<const void*> b = {x_.data(),   a_.data(),         qkv_.data(),        q_.data(),
                                k_.data(),   v_.data(),         attn_.data(),       logits_.data(),
                                ids_.data(), positions_.data(), seq_starts_.data(), table_rows_.data(),
                                cache.tables().group(0), plan_memory_[0].data(), plan_memory_[1].data()};
  for (const DeviceArray<int64_t>& a : slots_) b.push_back(a.data());
  return b;
}

float* Llama4Model::compute(const ForwardBatch& batch, const KvCache& cache, const Staged& in, float* host_logits) {
  const ModelConfig& c = config_;
  const int64_t T = batch.num_tokens(), H = c.hidden_size;
  const Stream& s = stream();
  float* x = x_.reserve(T * H);
  float* a = a_.reserve(T * H);
  kernels::embedding(s, x, weights_.embed.data, weights_.embed.dtype, c.vocab_size, H, in.ids, T);
  for (AttentionPlan& p : plans_) p.valid = false;  // a new batch: planned by its first layer of each kind
  for (const auto& [row, values] : batch.embeddings) copy(x + int64_t(row) * H, values, H * sizeof(float), s);

  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& w = weights_.layers[l];
    kernels::rms_norm(s, a, x, DType::F32, w.input_norm.data, w.input_norm.dtype, T, H, c.rms_norm_eps);
    const int64_t g = cache.layout().group_of_layer[l];
    attention(l, T, cache.layer(l), in.groups[g], in.positions, in.slots[g]);
    kernels::linear(s, x, H, attn_.data(), c.num_heads * c.head_dim, T, w.o, /*accumulate=*/true, act_);
    kernels::rms_norm(s, a, x, DType::F32, w.post_attention_norm.data, w.post_attention_norm.dtype, T, H,
                      c.rms_norm_eps);
    feed_forward(l, T);
  }

  // Final norm and lm_head on the requested rows only; runs of consecutive rows (a decode batch
  // is one) go through the norm together.
  const int64_t R = int64_t(batch.logit_rows.size());
  for (int64_t i = 0, j; i < R; i = j) {
    for (j = i + 1; j < R && batch.logit_rows[j] == batch.logit_rows[j - 1] + 1;) ++j;
    kernels::rms_norm(s, a + i * H, x + int64_t(batch.logit_rows[i]) * H, DType::F32, weights_.final_norm.data,
                      weights_.final_norm.dtype, j - i, H, c.rms_norm_eps);
  }
  float* out = host_logits ? host_logits : logits_.reserve(R * c.vocab_size);
  kernels::linear(s, out, c.vocab_size, a, H, R, weights_.lm_head, false, act_);
  return out;
}

void Llama4Model::attention(int64_t l, int64_t T, const PagedKv& kv, const AttentionBatch& ab, const int32_t* positions,
                            const int64_t* slots) {
  const ModelConfig& c = config_;
  const LayerSpec& spec = c.layers[l];
  const LayerWeights& w = weights_.layers[l];
  const Stream& s = stream();
  const int64_t H = c.hidden_size, d = c.head_dim;
  const int64_t qw = c.num_heads * d, kvw = c.num_kv_heads * d;
  float *q = q_.reserve(T * qw), *k = k_.reserve(T * kvw), *v = v_.reserve(T * kvw);
  float* out = attn_.reserve(T * qw);
  if (w.qkv.data) {  // one product, then its rows split into q, k and v
    const int64_t n = qw + 2 * kvw;
    float* qkv = qkv_.reserve(T * n);
    kernels::linear(s, qkv, n, a_.data(), H, T, w.qkv, false, act_);
    const size_t row = size_t(n) * sizeof(float), f = sizeof(float);
    copy_rows(q, qw * f, qkv, row, qw * f, T, s);
    copy_rows(k, kvw * f, qkv + qw, row, kvw * f, T, s);
    copy_rows(v, kvw * f, qkv + qw + kvw, row, kvw * f, T, s);
  } else {
    kernels::linear(s, q, qw, a_.data(), H, T, w.q, false, act_);
    kernels::linear(s, k, kvw, a_.data(), H, T, w.k, false, act_);
    kernels::linear(s, v, kvw, a_.data(), H, T, w.v, false, act_);
  }
  // Llama 4's order: RoPE, then QK norm (both RoPE layers only), then temperature (NoPE layers).
  const float* inv_freq = s.device.type == DeviceType::CUDA ? inv_freq_device_.data() : inv_freq_.data();
  if (spec.use_rope) {
    kernels::rope_interleaved(s, q, qw, T, c.num_heads, d, positions, inv_freq);
    kernels::rope_interleaved(s, k, kvw, T, c.num_kv_heads, d, positions, inv_freq);
  }
  if (spec.qk_norm) {
    kernels::rms_norm(s, q, q, DType::F32, nullptr, DType::F32, T * c.num_heads, d, c.rms_norm_eps);
    kernels::rms_norm(s, k, k, DType::F32, nullptr, DType::F32, T * c.num_kv_heads, d, c.rms_norm_eps);
  }
  if (spec.temperature_tuning) kernels::attn_temperature_scale(s, q, qw, T, qw, positions, c.attn_scale, c.floor_scale);
  kernels::kv_cache_write(s, kv, k, v, kvw, T, slots);
  kernels::paged_attention(s, out, q, c.num_heads, kv, ab, float(1.0 / std::sqrt(double(d))),
                           spec.chunked ? c.attention_chunk_size : 0, &plans_[spec.chunked ? 1 : 0]);
}

void Llama4Model::feed_forward(int64_t l, int64_t T) {
  const ModelConfig& c = config_;
  const LayerWeights& w = weights_.layers[l];
  if (c.layers[l].moe) {
    int64_t* counts = device().type == DeviceType::CUDA ? expert_counts_.data() + l * c.num_experts
                                                        : expert_tokens_[l].data();
    kernels::moe(stream(), x_.data(), a_.data(), T, w.moe, int(c.top_k), counts, act_);
    return;
  }
  kernels::swiglu_mlp(stream(), x_.data(), a_.data(), T, w.mlp_gate_up, w.mlp_down, act_);
}

}  // namespace corral
