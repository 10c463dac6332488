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

// A layer's matrices as the checkpoint stores them, before packing.
struct RawLayer {
  MatrixRef q, k, v, o;
  MoeWeights moe;
  MatrixRef gate, up, down;
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
  const MatrixRef lm_head = c.tie_word_embeddings ? w.embed : b.linear(b.head_prefix + "lm_head.weight", V, H);
  std::vector<RawLayer> raw(c.num_layers);
  int64_t bytes = kernels::packed_bytes(lm_head);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = b.model_prefix + "layers." + std::to_string(i) + ".";
    LayerWeights l;
    RawLayer& r = raw[i];
    l.input_norm = b.vector(p + "input_layernorm.weight", H);
    l.post_attention_norm = b.vector(p + "post_attention_layernorm.weight", H);
    r.q = b.linear(p + "self_attn.q_proj.weight", c.num_heads * c.head_dim, H);
    r.k = b.linear(p + "self_attn.k_proj.weight", c.num_kv_heads * c.head_dim, H);
    r.v = b.linear(p + "self_attn.v_proj.weight", c.num_kv_heads * c.head_dim, H);
    r.o = b.linear(p + "self_attn.o_proj.weight", H, c.num_heads * c.head_dim);
    for (const MatrixRef* m : {&r.q, &r.k, &r.v, &r.o}) bytes += kernels::packed_bytes(*m);
    if (c.layers[i].moe) {
      MoeWeights& m = r.moe;
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
      if (m.shared_up.dtype != m.shared_gate.dtype)
        throw DTypeError("tensor '" + p + "feed_forward.shared_expert.up_proj.weight' must have gate_proj's dtype");
      bytes += kernels::packed_moe_bytes(m);
    } else {
      const int64_t D = c.intermediate_size_mlp;
      r.gate = b.linear(p + "feed_forward.gate_proj.weight", D, H);
      r.up = b.linear(p + "feed_forward.up_proj.weight", D, H);
      r.down = b.linear(p + "feed_forward.down_proj.weight", H, D);
      if (r.up.dtype != r.gate.dtype)
        throw DTypeError("tensor '" + p + "feed_forward.up_proj.weight' must have gate_proj's dtype");
      bytes += kernels::packed_glu_bytes(r.gate) + kernels::packed_bytes(r.down);
    }
    w.layers.push_back(l);
  }

  // Pack every matrix into one allocation, in layer order.
  w.packed = kernels::allocate_packed(bytes);
  char* at = w.packed.get();
  const auto pack = [&](const MatrixRef& m) {
    const MatrixRef p = kernels::pack_weights(at, m);
    at += kernels::packed_bytes(m);
    return p;
  };
  for (int64_t i = 0; i < c.num_layers; ++i) {
    LayerWeights& l = w.layers[i];
    const RawLayer& r = raw[i];
    l.q = pack(r.q);
    l.k = pack(r.k);
    l.v = pack(r.v);
    if (l.q.out % kernels::kPackedPanelCols == 0 && l.k.out % kernels::kPackedPanelCols == 0 && l.k.dtype == l.q.dtype && l.v.dtype == l.q.dtype)
      l.qkv = MatrixRef{l.q.data, l.q.dtype, WeightLayout::Packed, l.q.in, l.q.out + l.k.out + l.v.out};
    l.o = pack(r.o);
    if (c.layers[i].moe) {
      l.moe = kernels::pack_moe(at, r.moe);
      at += kernels::packed_moe_bytes(r.moe);
    } else {
      l.mlp_gate_up = kernels::pack_glu(at, r.gate, r.up);
      at += kernels::packed_glu_bytes(r.gate);
      l.mlp_down = pack(r.down);
    }
  }
  w.lm_head = pack(lm_head);
  w.files = ckpt.open_files();
  for (const auto& f : w.files) f->release_pages();  // the packed copy is what the products read
  return w;
}

}  // namespace corral
