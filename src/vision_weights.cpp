// The vision tower's tensors, as Llama4ForConditionalGeneration saves them.
#include <string>
#include <utility>
#include <vector>

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

VisionWeights load_vision_weights(const Checkpoint& ckpt, const ModelConfig& config, const Stream& stream) {
  const VisionConfig& c = config.vision;
  const VisionBinder b{ckpt};
  const int64_t D = c.hidden_size, I = c.intermediate_size, P = c.projector_dim;
  const std::string m = "vision_model.";
  VisionWeights w;
  // Every tensor as stored first (bound to the mapping); then the matrices are packed for the CPU,
  // or everything is copied to the GPU.
  std::vector<MatrixRef*> packed;
  std::vector<std::pair<VectorRef*, int64_t>> vectors;  // with their element counts
  const auto mat = [&](MatrixRef* dst, const std::string& name, int64_t out, int64_t in) {
    *dst = b.matrix(name, out, in);
    packed.push_back(dst);
  };
  const auto bind = [&](VectorRef* dst, const std::string& name, std::vector<int64_t> shape) {
    *dst = b.vector(name, shape);
    vectors.emplace_back(dst, shape.size() == 1 ? shape[0] : shape[0] * shape[1]);
  };

  mat(&w.patch_embedding, m + "patch_embedding.linear.weight", D, c.num_channels * c.patch_size * c.patch_size);
  bind(&w.class_embedding, m + "class_embedding", {D});
  bind(&w.position_embedding, m + "positional_embedding_vlm", {c.grid() * c.grid() + 1, D});
  bind(&w.pre_w, m + "layernorm_pre.weight", {D});
  bind(&w.pre_b, m + "layernorm_pre.bias", {D});
  bind(&w.post_w, m + "layernorm_post.weight", {D});
  bind(&w.post_b, m + "layernorm_post.bias", {D});
  w.layers.resize(size_t(c.num_layers));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    VisionLayerWeights& l = w.layers[size_t(i)];
    const std::string p = m + "model.layers." + std::to_string(i) + ".";
    bind(&l.ln1_w, p + "input_layernorm.weight", {D});
    bind(&l.ln1_b, p + "input_layernorm.bias", {D});
    bind(&l.ln2_w, p + "post_attention_layernorm.weight", {D});
    bind(&l.ln2_b, p + "post_attention_layernorm.bias", {D});
    const std::pair<MatrixRef*, VectorRef*> attn[] = {{&l.q, &l.q_b}, {&l.k, &l.k_b}, {&l.v, &l.v_b}, {&l.o, &l.o_b}};
    const char* names[] = {"q_proj", "k_proj", "v_proj", "o_proj"};
    for (int j = 0; j < 4; ++j) {
      mat(attn[j].first, p + "self_attn." + names[j] + ".weight", D, D);
      bind(attn[j].second, p + "self_attn." + names[j] + ".bias", {D});
    }
    mat(&l.fc1, p + "mlp.fc1.weight", I, D);
    bind(&l.fc1_b, p + "mlp.fc1.bias", {I});
    mat(&l.fc2, p + "mlp.fc2.weight", D, I);
    bind(&l.fc2_b, p + "mlp.fc2.bias", {D});
  }
  mat(&w.adapter_fc1, m + "vision_adapter.mlp.fc1.weight", P, I);
  mat(&w.adapter_fc2, m + "vision_adapter.mlp.fc2.weight", P, P);
  mat(&w.projector, "multi_modal_projector.linear_1.weight", config.hidden_size, P);

  if (stream.device.type == DeviceType::CUDA) {  // every tensor as stored, one allocation
    std::vector<std::pair<const void**, int64_t>> tensors;  // each tensor's data pointer and bytes
    for (MatrixRef* r : packed) tensors.emplace_back(&r->data, r->in * r->out * int64_t(dtype_size(r->dtype)));
    for (const auto& [v, n] : vectors) tensors.emplace_back(&v->data, n * int64_t(dtype_size(v->dtype)));
    std::vector<const void*> host;  // the mapping's addresses, read by both passes
    for (const auto& t : tensors) host.push_back(*t.first);
    w.device_data = upload_to_device(stream, [&](DeviceUploader& u) {
      for (size_t i = 0; i < tensors.size(); ++i) *tensors[i].first = u.put({{host[i], tensors[i].second}});
    });
    w.bytes = int64_t(w.device_data.size());
  } else {
    int64_t bytes = 0;
    for (const MatrixRef* r : packed) bytes += kernels::packed_bytes(*r);
    w.packed = kernels::allocate_packed(bytes);
    char* at = w.packed.get();
    for (MatrixRef* r : packed) {
      const int64_t n = kernels::packed_bytes(*r);
      *r = kernels::pack_weights(at, *r);
      at += n;
    }
    w.bytes = bytes;
  }
  w.files = ckpt.open_files();
  return w;
}

}  // namespace corral
