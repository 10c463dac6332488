#include "corral/weights.h"

#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "corral/error.h"
#include "corral/kernels/quantize.h"
#include "corral/quantized_checkpoint.h"

namespace corral {

namespace {

// What a matrix does in the model: decides its quantization at load.
enum class Role { Attention, Mlp, Head, Router };

// One weight matrix: where its data comes from and how it is held.
struct Linear {
  std::string name;  // the checkpoint tensor (or module), for messages
  int64_t out = 0, in = 0;
  MatrixRef plain;          // 16/32-bit weights as stored (the source of quantization at load)
  QuantizedSource source;   // quantized in the checkpoint when source.scheme is set
  bool quantized = false;   // held as `plan` says (else packed as stored)
  bool at_load = false;     // quantized at load from `plain`
  QuantPlan plan;

  int64_t bytes() const {
    if (!quantized) return kernels::packed_bytes(plain);
    if (plan.dense) return kernels::packed_bytes(MatrixRef{nullptr, DType::F32, WeightLayout::OutIn, in, out});
    return kernels::packed_quantized_bytes(plan.dtype, out, in, plan.info());
  }
  int64_t glu_bytes() const {
    if (!quantized) return kernels::packed_glu_bytes(plain);
    if (plan.dense) return kernels::packed_glu_bytes(MatrixRef{nullptr, DType::F32, WeightLayout::OutIn, in, out});
    return kernels::packed_quantized_glu_bytes(plan.dtype, out, in, plan.info());
  }
};

bool same_plan(const Linear& a, const Linear& b) {
  if (a.quantized != b.quantized) return false;
  if (!a.quantized) return a.plain.dtype == b.plain.dtype;
  const QuantPlan &p = a.plan, &q = b.plan;
  return p.dense == q.dense && (p.dense || (p.dtype == q.dtype && p.info() == q.info()));
}

struct Binder {
  const Checkpoint& ckpt;
  const CheckpointQuantization& cq;
  std::string quantization;  // at load: "", "int8" or "int4"
  std::string model_prefix;  // "model." or "language_model.model."
  std::string head_prefix;   // "" or "language_model."

  // The tensor `name` with the given shape and a float dtype the kernels read.
  const void* tensor(const std::string& name, const std::vector<int64_t>& shape, DType* dtype) const {
    return float_tensor(ckpt, name, shape, dtype,
                        cq.method.empty() ? "; quantized weights need the checkpoint's quantization_config" : "");
  }
  MatrixRef matrix(const std::string& name, int64_t out, int64_t in) const {
    MatrixRef m{nullptr, DType::F32, WeightLayout::OutIn, in, out};
    m.data = tensor(name, {out, in}, &m.dtype);
    return m;
  }
  VectorRef vector(const std::string& name, int64_t n) const {
    VectorRef v;
    v.data = tensor(name, {n}, &v.dtype);
    return v;
  }

  // How a 16/32-bit matrix of `role` is quantized at load (or not).
  void quantize_at_load(Linear& l, Role role) const {
    if (quantization.empty() || role == Role::Router) return;
    const bool int4 = quantization == "int4" && role == Role::Mlp;
    l.quantized = l.at_load = true;
    l.plan.dtype = int4 ? DType::I4 : DType::I8;
    l.plan.group = int4 ? 32 : (l.in + kernels::kQuantBlock - 1) / kernels::kQuantBlock * kernels::kQuantBlock;
    l.plan.scale_dtype = int4 ? DType::BF16 : DType::F32;
  }

  // The nn.Linear at `module` ([out, in]): quantized as the checkpoint says, else as stored.
  Linear linear(const std::string& module, int64_t out, int64_t in, Role role) const {
    Linear l;
    l.name = module + ".weight";
    l.out = out;
    l.in = in;
    if (const QuantScheme* s = cq.scheme_for(module)) {
      l.source = QuantizedSource{module, s, out, in};
      l.plan = plan_quantized(ckpt, l.source);
      if (role == Role::Router) l.plan.dense = true;  // routes are chosen on exact float32 logits
      l.quantized = true;
      return l;
    }
    l.plain = matrix(module + ".weight", out, in);
    quantize_at_load(l, role);
    return l;
  }

  // Expert e's gate (part 0), up (1) or down (2) from the checkpoint's fused expert tensors
  // (gate_up_proj [E, H, 2I], down_proj [E, I, H], used as x @ W).
  Linear fused_expert(const std::string& p, int64_t e, int part, int64_t E, int64_t H, int64_t I) const {
    const std::string name = p + (part == 2 ? "feed_forward.experts.down_proj" : "feed_forward.experts.gate_up_proj");
    const int64_t in = part == 2 ? I : H, width = part == 2 ? H : 2 * I, out = part == 2 ? H : I, c0 = part == 1 ? I : 0;
    Linear l;
    l.name = name;
    l.out = out;
    l.in = in;
    if (const QuantScheme* s = cq.scheme_for(name.substr(0, name.rfind('.')))) {
      if (!s->fbgemm)
        throw ConfigError("tensor '" + name + "': fused expert tensors are quantized only by fbgemm_fp8 (" + cq.source + ")");
      l.source = QuantizedSource{name, s, out, in, e, c0, width};
      l.plan = plan_quantized(ckpt, l.source);
      l.quantized = true;
      return l;
    }
    DType dtype;
    const void* base = tensor(name, {E, in, width}, &dtype);
    const char* at = static_cast<const char*>(base) + (e * in * width + c0) * int64_t(dtype_size(dtype));
    l.plain = MatrixRef{at, dtype, WeightLayout::InOut, in, out, width};
    quantize_at_load(l, Role::Mlp);
    return l;
  }
};

// A layer's matrices before packing.
struct RawLayer {
  Linear q, k, v, o;
  Linear router, shared_gate, shared_up, shared_down;
  std::vector<Linear> gate, up, down;  // routed experts, or the dense MLP (one)
};

// The weights of a quantized Linear, decoded from the checkpoint or quantized from `plain`.
DecodedWeights materialize(const Checkpoint& ckpt, const Linear& l) {
  if (l.at_load) return DecodedWeights{kernels::quantize_weights(l.plain, l.plan.dtype, l.plan.group, l.plan.scale_dtype), {}};
  return decode_quantized(ckpt, l.source, l.plan);
}

MatrixRef dense_ref(const DecodedWeights& d, const Linear& l) {
  return MatrixRef{d.dense.data(), DType::F32, WeightLayout::OutIn, l.in, l.out};
}

void check_glu_pair(const Linear& gate, const Linear& up) {
  if (!same_plan(gate, up))
    throw DTypeError("tensors '" + gate.name + "' and '" + up.name + "' are stored in different formats; gate and "
                     "up of one MLP must match");
}

// q, k and v as one product: their packed panels back to back are one matrix's (q's and k's widths
// whole panels, one format).
bool fused_qkv(const Linear& q, const Linear& k, const Linear& v) {
  return q.out % kernels::kPackedPanelCols == 0 && k.out % kernels::kPackedPanelCols == 0 && same_plan(q, k) &&
         same_plan(q, v);
}

// Packs matrices one after the other into the model's allocation.
struct Packer {
  const Checkpoint& ckpt;
  char* at;

  MatrixRef one(const Linear& l) {
    MatrixRef m;
    if (!l.quantized) {
      m = kernels::pack_weights(at, l.plain);
    } else {
      const DecodedWeights d = materialize(ckpt, l);
      if (l.plan.dense) {
        m = kernels::pack_weights(at, dense_ref(d, l));
      } else {
        m = kernels::pack_quantized(at, d.codes.rows(), l.plan.scale_dtype);
        m.quant.act_group = l.plan.act_group;
      }
    }
    at += l.bytes();
    return m;
  }

  MatrixRef glu(const Linear& gate, const Linear& up) {
    check_glu_pair(gate, up);
    MatrixRef m;
    if (!gate.quantized) {
      m = kernels::pack_glu(at, gate.plain, up.plain);
    } else {
      const DecodedWeights g = materialize(ckpt, gate), u = materialize(ckpt, up);
      if (gate.plan.dense) {
        m = kernels::pack_glu(at, dense_ref(g, gate), dense_ref(u, up));
      } else {
        m = kernels::pack_quantized_glu(at, g.codes.rows(), u.codes.rows(), gate.plan.scale_dtype);
        m.quant.act_group = gate.plan.act_group;
      }
    }
    at += gate.glu_bytes();
    return m;
  }
};

void check_same_format(const std::vector<Linear>& ls) {
  for (const Linear& l : ls)
    if (!same_plan(l, ls[0]))
      throw DTypeError("tensor '" + l.name + "' is stored in another format than '" + ls[0].name +
                       "'; every expert of a layer must match");
}

VectorRef put_vector(DeviceUploader& u, const VectorRef& v, int64_t n) {
  return VectorRef{u.put({{v.data, n * int64_t(dtype_size(v.dtype))}}), v.dtype};
}

// nn.Linear matrices, one after the other as the rows of one [sum of outs, in] matrix on the GPU.
MatrixRef put_rows(DeviceUploader& u, std::initializer_list<const Linear*> ls) {
  const Linear& first = **ls.begin();
  MatrixRef m{nullptr, first.plain.dtype, WeightLayout::OutIn, first.in, 0};
  DeviceUploader::Parts parts;
  for (const Linear* l : ls) {
    if (l->quantized) throw Error("put_rows: tensor '" + l->name + "' is quantized (a Corral bug)");
    if (l->plain.layout != WeightLayout::OutIn || l->plain.row_stride() != l->in || l->plain.dtype != m.dtype)
      throw NotSupportedError("tensor '" + l->name + "': CUDA reads dense nn.Linear matrices of one dtype per "
                              "product only so far");
    parts.emplace_back(l->plain.data, l->out * l->in * int64_t(dtype_size(m.dtype)));
    m.out += l->out;
  }
  m.data = u.put(parts);
  return m;
}

// Quantized matrices on their way to a GPU: packed (or decoded) on the host into `buffer`, reused
// matrix after matrix, then copied. Nothing is packed on the sizing pass (u.base null).
struct DevicePacker {
  DeviceUploader& u;
  const Checkpoint& ckpt;
  kernels::PackedStorage buffer;
  int64_t capacity = 0;

  // `bytes` written by fill(host buffer), at the next aligned offset or (append) right after the
  // previous matrix.
  template <class Fill>
  const void* put(int64_t bytes, bool append, Fill&& fill) {
    if (u.base) {
      synchronize(u.stream);  // the previous copy out of the buffer is done
      if (bytes > capacity) {
        buffer = kernels::allocate_packed(bytes);
        capacity = bytes;
      }
      fill(buffer.get());
    }
    const DeviceUploader::Parts parts{{buffer.get(), bytes}};
    return append ? u.append(parts) : u.put(parts);
  }

  // One Linear: as stored, packed (quantized), or float32 [out, in] rows (plan.dense).
  MatrixRef one(const Linear& l, bool append = false) {
    if (!l.quantized) return put_rows(u, {&l});
    if (l.plan.dense) {
      MatrixRef m{nullptr, DType::F32, WeightLayout::OutIn, l.in, l.out};
      m.data = put(l.out * l.in * 4, append, [&](char* dst) {
        const DecodedWeights d = materialize(ckpt, l);
        std::memcpy(dst, d.dense.data(), size_t(l.out * l.in * 4));
      });
      return m;
    }
    MatrixRef m{nullptr, l.plan.dtype, WeightLayout::Packed, l.in, l.out};
    m.quant = l.plan.info();
    m.data = put(l.bytes(), append, [&](char* dst) {
      kernels::pack_quantized(dst, materialize(ckpt, l).codes.rows(), l.plan.scale_dtype);
    });
    return m;
  }

  // Gate and up of one MLP as swiglu_mlp reads them on CUDA: one [2 * out, in] matrix (gate rows,
  // then up rows) or their packed quantized pair (PackedGlu).
  MatrixRef glu(const Linear& gate, const Linear& up, bool append = false) {
    check_glu_pair(gate, up);
    if (!gate.quantized) return put_rows(u, {&gate, &up});
    const int64_t n = gate.out * gate.in;
    if (gate.plan.dense) {
      MatrixRef m{nullptr, DType::F32, WeightLayout::OutIn, gate.in, 2 * gate.out};
      m.data = put(2 * n * 4, append, [&](char* dst) {
        std::memcpy(dst, materialize(ckpt, gate).dense.data(), size_t(n * 4));
        std::memcpy(dst + n * 4, materialize(ckpt, up).dense.data(), size_t(n * 4));
      });
      return m;
    }
    MatrixRef m{nullptr, gate.plan.dtype, WeightLayout::PackedGlu, gate.in, 2 * gate.out};
    m.quant = gate.plan.info();
    m.data = put(gate.glu_bytes(), append, [&](char* dst) {
      const DecodedWeights g = materialize(ckpt, gate), v = materialize(ckpt, up);
      kernels::pack_quantized_glu(dst, g.codes.rows(), v.codes.rows(), gate.plan.scale_dtype);
    });
    return m;
  }
};

// A layer's q, k and v: one qkv matrix (float weights as stored; quantized ones where the CPU fuses
// them), else three.
void put_attention_inputs(DevicePacker& dp, const RawLayer& r, LayerWeights& l) {
  if (!r.q.quantized && !r.k.quantized && !r.v.quantized) {
    l.qkv = put_rows(dp.u, {&r.q, &r.k, &r.v});
    return;
  }
  const bool fused = fused_qkv(r.q, r.k, r.v);
  l.q = dp.one(r.q);
  l.k = dp.one(r.k, fused);
  l.v = dp.one(r.v, fused);
  if (fused) {
    l.qkv = l.q;
    l.qkv.out = l.q.out + l.k.out + l.v.out;
  }
}

// A MoE layer's experts decoded to float32 (QuantPlan::dense, e.g. activation-order groups) as the
// float path reads them: fused [E, H, 2I] and [E, I, H] tensors (x @ W), and a float shared expert.
void put_decoded_experts(DevicePacker& dp, const RawLayer& r, MoeWeights& m) {
  for (const Linear* l : {&r.shared_gate, &r.shared_up, &r.shared_down})
    if (l->quantized && !l->plan.dense)
      throw NotSupportedError("tensor '" + l->name + "': CUDA runs a quantized shared expert beside quantized "
                              "experts only, not beside experts decoded to float32");
  const int64_t H = m.hidden, I = m.inter;
  // dst[k, c] = rows[c][k] for the [out, in] rows of each part, their columns side by side.
  const auto fused = [&](std::initializer_list<const Linear*> parts, char* dst) {
    float* out = reinterpret_cast<float*>(dst);
    int64_t c0 = 0, width = 0;
    for (const Linear* l : parts) width += l->out;
    for (const Linear* l : parts) {
      const DecodedWeights d = materialize(dp.ckpt, *l);
      for (int64_t c = 0; c < l->out; ++c)
        for (int64_t k = 0; k < l->in; ++k) out[k * width + c0 + c] = d.dense[size_t(c * l->in + k)];
      c0 += l->out;
    }
  };
  for (size_t e = 0; e < r.gate.size(); ++e) {
    const void* p = dp.put(H * 2 * I * 4, e > 0, [&](char* dst) { fused({&r.gate[e], &r.up[e]}, dst); });
    if (e == 0) m.gate_up = p;
  }
  for (size_t e = 0; e < r.down.size(); ++e) {
    const void* p = dp.put(I * H * 4, e > 0, [&](char* dst) { fused({&r.down[e]}, dst); });
    if (e == 0) m.down = p;
  }
  m.experts_dtype = DType::F32;
  m.experts_layout = WeightLayout::InOut;
  m.shared_gate = dp.one(r.shared_gate);
  m.shared_up = dp.one(r.shared_up);
  m.shared_down = dp.one(r.shared_down);
}

// A MoE layer's quantized experts as the CPU holds them (E PackedGlu matrices back to back, then E
// Packed ones) and its shared expert (DevicePacker::glu, one); decoded ones: put_decoded_experts.
void put_quantized_experts(DevicePacker& dp, const RawLayer& r, MoeWeights& m) {
  const Linear &g = r.gate[0], &d = r.down[0];
  if (g.quantized && d.quantized && g.plan.dense && d.plan.dense) return put_decoded_experts(dp, r, m);
  if (!g.quantized || !d.quantized || g.plan.dense || d.plan.dense || g.plan.dtype != d.plan.dtype)
    throw NotSupportedError("tensors '" + g.name + "' and '" + d.name + "': CUDA runs quantized experts only when "
                            "gate, up and down are all held quantized in one code type (or all decoded to float32)");
  const size_t E = r.gate.size();
  for (size_t e = 0; e < E; ++e) {
    const MatrixRef gu = dp.glu(r.gate[e], r.up[e], e > 0);
    if (e == 0) m.gate_up = gu.data, m.gate_up_quant = gu.quant;
  }
  for (size_t e = 0; e < E; ++e) {
    const MatrixRef dn = dp.one(r.down[e], e > 0);
    if (e == 0) m.down = dn.data, m.down_quant = dn.quant;
  }
  m.experts_dtype = g.plan.dtype;
  m.experts_layout = WeightLayout::Packed;
  m.shared_gate = dp.glu(r.shared_gate, r.shared_up);
  m.shared_up = MatrixRef{};
  m.shared_down = dp.one(r.shared_down);
}

// A MoE layer's float experts: transformers' fused tensors as stored, the shared expert's matrices
// one by one.
void put_float_experts(DeviceUploader& u, const RawLayer& r, MoeWeights& m) {
  const Linear &g = r.gate[0], &d = r.down[0];
  if (g.plain.layout != WeightLayout::InOut)
    throw NotSupportedError("tensor '" + g.name + "': CUDA runs float experts from transformers' fused "
                            "bfloat16, float16 or float32 tensors only");
  m.experts_dtype = g.plain.dtype;
  m.experts_layout = WeightLayout::InOut;
  const int64_t elems = m.num_experts * m.hidden * m.inter, size = int64_t(dtype_size(g.plain.dtype));
  m.gate_up = u.put({{g.plain.data, 2 * elems * size}});  // [E, H, 2I] from expert 0's gate slice
  m.down = u.put({{d.plain.data, elems * size}});         // [E, I, H]
  m.shared_gate = put_rows(u, {&r.shared_gate});
  m.shared_up = put_rows(u, {&r.shared_up});
  m.shared_down = put_rows(u, {&r.shared_down});
}

// The text model's tensors on a GPU (see LayerWeights), from the bound checkpoint tensors:
// `host` holds the embedding and the norms, `raw` the layers' matrices.
void place_on_device(DeviceUploader& u, const ModelConfig& c, const ModelWeights& host, const std::vector<RawLayer>& raw,
                     const Linear& lm_head, const Checkpoint& ckpt, ModelWeights& w) {
  const int64_t H = c.hidden_size, V = c.vocab_size;
  w.embed = host.embed;
  w.embed.data = u.put({{host.embed.data, V * H * int64_t(dtype_size(host.embed.dtype))}});
  w.final_norm = put_vector(u, host.final_norm, H);
  w.layers.resize(raw.size());
  DevicePacker dp{u, ckpt, {}};
  for (size_t i = 0; i < raw.size(); ++i) {
    const RawLayer& r = raw[i];
    LayerWeights& l = w.layers[i];
    l.input_norm = put_vector(u, host.layers[i].input_norm, H);
    l.post_attention_norm = put_vector(u, host.layers[i].post_attention_norm, H);
    put_attention_inputs(dp, r, l);
    l.o = dp.one(r.o);
    if (c.layers[i].moe) {
      MoeWeights& m = l.moe;
      m.num_experts = c.num_experts;
      m.hidden = H;
      m.inter = c.intermediate_size;
      m.router = dp.one(r.router);  // float: as stored, or decoded to float32 (plan.dense)
      const Linear &g = r.gate[0], &d = r.down[0];
      if (g.quantized || d.quantized) {
        put_quantized_experts(dp, r, m);
      } else {
        put_float_experts(u, r, m);
      }
    } else {
      l.mlp_gate_up = dp.glu(r.gate[0], r.up[0]);
      l.mlp_down = dp.one(r.down[0]);
    }
    if (u.base)
      for (const auto& f : ckpt.open_files()) f->release_pages();
  }
  w.lm_head = lm_head.plain.data == host.embed.data && !lm_head.quantized ? w.embed : dp.one(lm_head);
}

}  // namespace

const void* float_tensor(const Checkpoint& ckpt, const std::string& name, const std::vector<int64_t>& shape,
                         DType* dtype, const std::string& hint) {
  const TensorRecord r = ckpt.get(name);
  if (r.entry->shape != shape)
    throw ShapeError("tensor '" + name + "' in " + r.file->path() + " has shape " + shape_string(r.entry->shape) +
                     ", expected " + shape_string(shape));
  const auto t = r.entry->dtype;
  if (!t || (*t != DType::F32 && *t != DType::BF16 && *t != DType::F16))
    throw DTypeError("tensor '" + name + "' in " + r.file->path() + " has dtype " + r.entry->dtype_name +
                     ", which Corral cannot run here (F32, BF16 and F16 are supported" + hint + ")");
  *dtype = *t;
  return r.data();
}

ModelWeights load_weights(const Checkpoint& ckpt, const ModelConfig& c, const LoadOptions& options) {
  // Published multimodal checkpoints keep the text model under language_model.; a text-only save
  // does not. Follow the config, but accept the other layout when that is what the file holds.
  std::string head = c.multimodal ? "language_model." : "";
  const std::string alt = c.multimodal ? "" : "language_model.";
  if (!ckpt.contains(head + "model.embed_tokens.weight") && ckpt.contains(alt + "model.embed_tokens.weight"))
    head = alt;
  const CheckpointQuantization cq = load_quantization(ckpt.config_path());
  std::string quantization = options.quantization == "none" ? "" : options.quantization;
  if (!quantization.empty() && quantization != "int8" && quantization != "int4")
    throw InvalidInputError("quantization='" + quantization + "' is not one of none, int8, int4");
  if (!quantization.empty() && !cq.method.empty())
    throw InvalidInputError("quantization='" + quantization + "': the checkpoint is already quantized (" +
                            cq.describe() + ", " + cq.source + ")");
  const Binder b{ckpt, cq, quantization, head + "model.", head};
  const int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size, E = c.num_experts;

  ModelWeights w;
  w.embed = b.matrix(b.model_prefix + "embed_tokens.weight", V, H);
  w.final_norm = b.vector(b.model_prefix + "norm.weight", H);
  Linear lm_head;
  if (c.tie_word_embeddings) {
    lm_head.name = b.model_prefix + "embed_tokens.weight";
    lm_head.out = V;
    lm_head.in = H;
    lm_head.plain = w.embed;
    b.quantize_at_load(lm_head, Role::Head);
  } else {
    lm_head = b.linear(b.head_prefix + "lm_head", V, H, Role::Head);
  }
  std::vector<RawLayer> raw(c.num_layers);
  int64_t bytes = lm_head.bytes();
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = b.model_prefix + "layers." + std::to_string(i) + ".";
    LayerWeights l;
    RawLayer& r = raw[i];
    l.input_norm = b.vector(p + "input_layernorm.weight", H);
    l.post_attention_norm = b.vector(p + "post_attention_layernorm.weight", H);
    r.q = b.linear(p + "self_attn.q_proj", c.num_heads * c.head_dim, H, Role::Attention);
    r.k = b.linear(p + "self_attn.k_proj", c.num_kv_heads * c.head_dim, H, Role::Attention);
    r.v = b.linear(p + "self_attn.v_proj", c.num_kv_heads * c.head_dim, H, Role::Attention);
    r.o = b.linear(p + "self_attn.o_proj", H, c.num_heads * c.head_dim, Role::Attention);
    for (const Linear* m : {&r.q, &r.k, &r.v, &r.o}) bytes += m->bytes();
    if (c.layers[i].moe) {
      r.router = b.linear(p + "feed_forward.router", E, H, Role::Router);
      // Experts fused as transformers saves them, or one Linear each (compressed-tensors).
      const bool fused = ckpt.contains(p + "feed_forward.experts.gate_up_proj") ||
                         (!ckpt.contains(p + "feed_forward.experts.0.gate_proj.weight") &&
                          !ckpt.contains(p + "feed_forward.experts.0.gate_proj.weight_packed"));
      for (int64_t e = 0; e < E; ++e) {
        const std::string x = p + "feed_forward.experts." + std::to_string(e) + ".";
        r.gate.push_back(fused ? b.fused_expert(p, e, 0, E, H, I) : b.linear(x + "gate_proj", I, H, Role::Mlp));
        r.up.push_back(fused ? b.fused_expert(p, e, 1, E, H, I) : b.linear(x + "up_proj", I, H, Role::Mlp));
        r.down.push_back(fused ? b.fused_expert(p, e, 2, E, H, I) : b.linear(x + "down_proj", H, I, Role::Mlp));
        bytes += r.gate.back().glu_bytes() + r.down.back().bytes();
      }
      check_same_format(r.gate);
      check_same_format(r.down);
      r.shared_gate = b.linear(p + "feed_forward.shared_expert.gate_proj", I, H, Role::Mlp);
      r.shared_up = b.linear(p + "feed_forward.shared_expert.up_proj", I, H, Role::Mlp);
      r.shared_down = b.linear(p + "feed_forward.shared_expert.down_proj", H, I, Role::Mlp);
      bytes += r.router.bytes() + r.shared_gate.glu_bytes() + r.shared_down.bytes();
    } else {
      const int64_t D = c.intermediate_size_mlp;
      r.gate.push_back(b.linear(p + "feed_forward.gate_proj", D, H, Role::Mlp));
      r.up.push_back(b.linear(p + "feed_forward.up_proj", D, H, Role::Mlp));
      r.down.push_back(b.linear(p + "feed_forward.down_proj", H, D, Role::Mlp));
      bytes += r.gate[0].glu_bytes() + r.down[0].bytes();
    }
    w.layers.push_back(l);
  }

  std::string format = dtype_name(w.embed.dtype);
  if (!cq.method.empty()) format = cq.describe();
  else if (!quantization.empty()) format = quantization + " (quantized at load from " + format + ")";
  if (options.device.type == DeviceType::CUDA) {
    StreamOwner stream(options.device);
    ModelWeights d;  // `w` keeps the host tensors both passes read
    d.device_data = upload_to_device(stream.get(),
                                     [&](DeviceUploader& u) { place_on_device(u, c, w, raw, lm_head, ckpt, d); });
    d.files = ckpt.open_files();
    for (const auto& f : d.files) f->release_pages();
    d.bytes = int64_t(d.device_data.size());
    d.format = format;
    return d;
  }

  // Pack every matrix into one allocation, in layer order; each layer's checkpoint pages are
  // dropped once it is packed, so memory never holds more than one layer beyond the packed model.
  w.packed = kernels::allocate_packed(bytes);
  Packer pk{ckpt, w.packed.get()};
  for (int64_t i = 0; i < c.num_layers; ++i) {
    LayerWeights& l = w.layers[i];
    const RawLayer& r = raw[i];
    l.q = pk.one(r.q);
    l.k = pk.one(r.k);
    l.v = pk.one(r.v);
    if (fused_qkv(r.q, r.k, r.v)) {
      l.qkv = l.q;
      l.qkv.out = l.q.out + l.k.out + l.v.out;
    }
    l.o = pk.one(r.o);
    if (c.layers[i].moe) {
      MoeWeights& m = l.moe;
      m.num_experts = E;
      m.hidden = H;
      m.inter = I;
      m.router = pk.one(r.router);
      m.gate_up = pk.at;
      MatrixRef gu, dn;
      for (int64_t e = 0; e < E; ++e) gu = pk.glu(r.gate[e], r.up[e]);
      m.down = pk.at;
      for (int64_t e = 0; e < E; ++e) dn = pk.one(r.down[e]);
      if (gu.dtype != dn.dtype)
        throw DTypeError("tensors '" + r.gate[0].name + "' and '" + r.down[0].name + "' are stored in different "
                         "formats; the experts' matrices must match");
      m.experts_dtype = gu.dtype;
      m.gate_up_quant = gu.quant;
      m.down_quant = dn.quant;
      m.experts_layout = WeightLayout::Packed;
      m.shared_gate = pk.glu(r.shared_gate, r.shared_up);
      m.shared_down = pk.one(r.shared_down);
    } else {
      l.mlp_gate_up = pk.glu(r.gate[0], r.up[0]);
      l.mlp_down = pk.one(r.down[0]);
    }
    for (const auto& f : ckpt.open_files()) f->release_pages();
  }
  w.lm_head = pk.one(lm_head);
  if (pk.at != w.packed.get() + bytes) throw Error("load_weights: packed sizes disagree (a Corral bug)");
  w.files = ckpt.open_files();
  for (const auto& f : w.files) f->release_pages();  // the packed copy is what the products read

  w.bytes = bytes + V * H * int64_t(dtype_size(w.embed.dtype)) + (2 * c.num_layers + 1) * H * int64_t(dtype_size(w.final_norm.dtype));
  w.format = format;
  return w;
}

}  // namespace corral
