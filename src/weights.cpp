#include "corral/weights.h"

#include <string>

#include "corral/error.h"

namespace corral {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

struct Binder {
  const Checkpoint& ckpt;
  std::string model_prefix;  // "model." or "language_model.model."
  std::string head_prefix;   // "" or "language_model."

  // The tensor `name` with the given shape and a float dtype the kernels read.
  const void* tensor(const std::string& name, const std::vector<int64_t>& shape, DType* dtype) const {
    const TensorRecord r = ckpt.get(name);
    if (r.entry->shape != shape)
      throw ShapeError("tensor '" + name + "' in " + r.file->path() + " has shape " + shape_str(r.entry->shape) +
                       ", expected " + shape_str(shape));
    const auto t = r.entry->dtype;
    if (!t || (*t != DType::F32 && *t != DType::BF16 && *t != DType::F16))
      throw DTypeError("tensor '" + name + "' in " + r.file->path() + " has dtype " + r.entry->dtype_name +
                       ", which Corral cannot run (F32, BF16 and F16 are supported)");
    *dtype = *t;
    return r.data();
  }
  MatrixRef linear(const std::string& name, int64_t out, int64_t in) const {
    MatrixRef m{nullptr, DType::F32, WeightLayout::OutIn, in, out};
    m.data = tensor(name, {out, in}, &m.dtype);
    return m;
  }
  VectorRef vector(const std::string& name, int64_t n) const {
    VectorRef v;
    v.data = tensor(name, {n}, &v.dtype);
    return v;
  }
};

}  // namespace

ModelWeights load_weights(const Checkpoint& ckpt, const ModelConfig& c) {
  // Published multimodal checkpoints keep the text model under language_model.; a text-only save
  // does not. Follow the config, but accept the other layout when that is what the file holds.
  std::string head = c.multimodal ? "language_model." : "";
  const std::string alt = c.multimodal ? "" : "language_model.";
  if (!ckpt.contains(head + "model.embed_tokens.weight") && ckpt.contains(alt + "model.embed_tokens.weight"))
    head = alt;
  const Binder b{ckpt, head + "model.", head};
  const int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size, E = c.num_experts;

  ModelWeights w;
  w.embed = b.linear(b.model_prefix + "embed_tokens.weight", V, H);
  w.final_norm = b.vector(b.model_prefix + "norm.weight", H);
  w.lm_head = c.tie_word_embeddings ? w.embed : b.linear(b.head_prefix + "lm_head.weight", V, H);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = b.model_prefix + "layers." + std::to_string(i) + ".";
    LayerWeights l;
    l.input_norm = b.vector(p + "input_layernorm.weight", H);
    l.post_attention_norm = b.vector(p + "post_attention_layernorm.weight", H);
    l.q = b.linear(p + "self_attn.q_proj.weight", c.num_heads * c.head_dim, H);
    l.k = b.linear(p + "self_attn.k_proj.weight", c.num_kv_heads * c.head_dim, H);
    l.v = b.linear(p + "self_attn.v_proj.weight", c.num_kv_heads * c.head_dim, H);
    l.o = b.linear(p + "self_attn.o_proj.weight", H, c.num_heads * c.head_dim);
    if (c.layers[i].moe) {
      MoeWeights& m = l.moe;
      m.num_experts = E;
      m.hidden = H;
      m.inter = I;
      m.router = b.linear(p + "feed_forward.router.weight", E, H);
      DType down_dtype;
      m.gate_up = b.tensor(p + "feed_forward.experts.gate_up_proj", {E, H, 2 * I}, &m.experts_dtype);
      m.down = b.tensor(p + "feed_forward.experts.down_proj", {E, I, H}, &down_dtype);
      if (down_dtype != m.experts_dtype)
        throw DTypeError("tensor '" + p + "feed_forward.experts.down_proj' has dtype " + dtype_name(down_dtype) +
                         " but gate_up_proj has " + dtype_name(m.experts_dtype) + "; both must match");
      m.shared_gate = b.linear(p + "feed_forward.shared_expert.gate_proj.weight", I, H);
      m.shared_up = b.linear(p + "feed_forward.shared_expert.up_proj.weight", I, H);
      m.shared_down = b.linear(p + "feed_forward.shared_expert.down_proj.weight", H, I);
    } else {
      const int64_t D = c.intermediate_size_mlp;
      l.mlp_gate = b.linear(p + "feed_forward.gate_proj.weight", D, H);
      l.mlp_up = b.linear(p + "feed_forward.up_proj.weight", D, H);
      l.mlp_down = b.linear(p + "feed_forward.down_proj.weight", H, D);
    }
    w.layers.push_back(l);
  }
  w.files = ckpt.open_files();
  return w;
}

}  // namespace corral
