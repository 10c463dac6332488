// The vision tower's tensors, as Llama4ForConditionalGeneration saves them.
#include <string>

#include "corral/error.h"
#include "corral/weights.h"

namespace corral {

namespace {

struct VisionBinder {
  const Checkpoint& ckpt;

  MatrixRef matrix(const std::string& name, int64_t out, int64_t in) const {
    MatrixRef m{nullptr, DType::F32, WeightLayout::OutIn, in, out};
    m.data = float_tensor(ckpt, name, {out, in}, &m.dtype);
    return m;
  }
  VectorRef vector(const std::string& name, std::vector<int64_t> shape) const {
    VectorRef v;
    v.data = float_tensor(ckpt, name, shape, &v.dtype);
    return v;
  }
};

}  // namespace

VisionWeights load_vision_weights(const Checkpoint& ckpt, const ModelConfig& config) {
  const VisionConfig& c = config.vision;
  const VisionBinder b{ckpt};
  const int64_t D = c.hidden_size, I = c.intermediate_size, P = c.projector_dim;
  const std::string m = "vision_model.";
  VisionWeights w;
  // The matrices as stored first (bound to the mapping), packed together afterwards.
  std::vector<MatrixRef*> packed;
  const auto mat = [&](MatrixRef* dst, const std::string& name, int64_t out, int64_t in) {
    *dst = b.matrix(name, out, in);
    packed.push_back(dst);
  };
  const auto vec = [&](const std::string& name, int64_t n) { return b.vector(name, {n}); };

  mat(&w.patch_embedding, m + "patch_embedding.linear.weight", D, c.num_channels * c.patch_size * c.patch_size);
  w.class_embedding = vec(m + "class_embedding", D);
  w.position_embedding = b.vector(m + "positional_embedding_vlm", {c.grid() * c.grid() + 1, D});
  w.pre_w = vec(m + "layernorm_pre.weight", D);
  w.pre_b = vec(m + "layernorm_pre.bias", D);
  w.post_w = vec(m + "layernorm_post.weight", D);
  w.post_b = vec(m + "layernorm_post.bias", D);
  w.layers.resize(size_t(c.num_layers));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    VisionLayerWeights& l = w.layers[size_t(i)];
    const std::string p = m + "model.layers." + std::to_string(i) + ".";
    l.ln1_w = vec(p + "input_layernorm.weight", D);
    l.ln1_b = vec(p + "input_layernorm.bias", D);
    l.ln2_w = vec(p + "post_attention_layernorm.weight", D);
    l.ln2_b = vec(p + "post_attention_layernorm.bias", D);
    const std::pair<MatrixRef*, VectorRef*> attn[] = {{&l.q, &l.q_b}, {&l.k, &l.k_b}, {&l.v, &l.v_b}, {&l.o, &l.o_b}};
    const char* names[] = {"q_proj", "k_proj", "v_proj", "o_proj"};
    for (int j = 0; j < 4; ++j) {
      mat(attn[j].first, p + "self_attn." + names[j] + ".weight", D, D);
      *attn[j].second = vec(p + "self_attn." + names[j] + ".bias", D);
    }
    mat(&l.fc1, p + "mlp.fc1.weight", I, D);
    l.fc1_b = vec(p + "mlp.fc1.bias", I);
    mat(&l.fc2, p + "mlp.fc2.weight", D, I);
    l.fc2_b = vec(p + "mlp.fc2.bias", D);
  }
  mat(&w.adapter_fc1, m + "vision_adapter.mlp.fc1.weight", P, I);
  mat(&w.adapter_fc2, m + "vision_adapter.mlp.fc2.weight", P, P);
  mat(&w.projector, "multi_modal_projector.linear_1.weight", config.hidden_size, P);

  int64_t bytes = 0;
  for (const MatrixRef* r : packed) bytes += kernels::packed_bytes(*r);
  w.packed = kernels::allocate_packed(bytes);
  char* at = w.packed.get();
  for (MatrixRef* r : packed) {
    const int64_t n = kernels::packed_bytes(*r);
    *r = kernels::pack_weights(at, *r);
    at += n;
  }
  w.files = ckpt.open_files();
  w.bytes = bytes;
  return w;
}

}  // namespace corral
