#include "corral/quantized_checkpoint.h"

#include <algorithm>
#include <regex>

#include <nlohmann/json.hpp>

#include "corral/error.h"
#include "json_text.h"

namespace corral {

namespace {

using json = nlohmann::json;

// A regex entry ("re:<pattern>") matches from the start of the name, as Python's re.match.
bool pattern_matches(const std::string& pattern, const std::string& name) {
  if (pattern.rfind("re:", 0) != 0) return false;
  try {
    return std::regex_search(name, std::regex(pattern.substr(3)), std::regex_constants::match_continuous);
  } catch (const std::regex_error&) {
    return false;
  }
}

// The module path as written in the checkpoint and without the multimodal prefix: configs name
// modules either way.
std::vector<std::string> spellings(const std::string& module) {
  const std::string prefix = "language_model.";
  if (module.rfind(prefix, 0) == 0) return {module, module.substr(prefix.size())};
  return {module, prefix + module};
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// Reads a quantization args object (compressed-tensors QuantizationArgs) of config group `where`.
struct Args {
  const json& obj;
  std::string where;
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw ConfigError("config field '" + where + "." + key + "' " + what);
  }
  const json* get(const std::string& key) const {
    return obj.contains(key) && !obj.at(key).is_null() ? &obj.at(key) : nullptr;
  }
  std::string str(const std::string& key, const std::string& fallback) const {
    const json* v = get(key);
    if (!v) return fallback;
    if (!v->is_string()) fail(key, "must be a string, got " + describe_json(*v));
    return v->get<std::string>();
  }
  int64_t integer(const std::string& key, int64_t fallback) const {
    const json* v = get(key);
    if (!v) return fallback;
    if (!v->is_number_integer()) fail(key, "must be an integer, got " + describe_json(*v));
    return v->get<int64_t>();
  }
  bool flag(const std::string& key, bool fallback) const {
    const json* v = get(key);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(key, "must be true or false, got " + describe_json(*v));
    return v->get<bool>();
  }
};

QuantScheme compressed_tensors_scheme(const json& group, const std::string& where, const std::string& format) {
  if (!group.contains("weights") || !group.at("weights").is_object())
    throw ConfigError("config field '" + where + ".weights' is missing: Corral runs weight-quantized checkpoints");
  const Args w{group.at("weights"), where + ".weights"};
  QuantScheme s;
  const std::string type = w.str("type", "int");
  const int64_t bits = w.integer("num_bits", 8);
  if (type == "float" && bits == 8) s.dtype = DType::F8_E4M3;
  else if (type == "int" && bits == 8) s.dtype = DType::I8;
  else if (type == "int" && bits == 4) s.dtype = DType::I4;
  else
    w.fail("type", "= \"" + type + "\" with num_bits " + std::to_string(bits) +
                       " is not supported (float 8-bit, int 4- and 8-bit are)");
  if (format == "float-quantized" ? s.dtype != DType::F8_E4M3 : format == "pack-quantized" ? s.dtype == DType::F8_E4M3 : true)
    throw ConfigError("config field '" + where + ".format' = \"" + format +
                      "\" is not supported with these weights (float-quantized fp8 and pack-quantized int4/int8 are)");
  s.strategy = w.str("strategy", "tensor");
  s.symmetric = w.flag("symmetric", true);
  if (s.strategy == "group") {
    s.group_size = w.integer("group_size", 0);
    if (s.group_size < 1) w.fail("group_size", "must be a positive integer for strategy \"group\"");
  } else if (s.strategy == "block") {
    const json* b = w.get("block_structure");
    if (!b || !b->is_array() || b->size() != 2 || !(*b)[0].is_number_integer() || !(*b)[1].is_number_integer() ||
        (*b)[0].get<int64_t>() < 1 || (*b)[1].get<int64_t>() < 1)
      w.fail("block_structure", "must be two positive integers for strategy \"block\"");
    s.block_rows = (*b)[0].get<int64_t>();
    s.block_cols = (*b)[1].get<int64_t>();
  } else if (s.strategy != "channel" && s.strategy != "tensor") {
    w.fail("strategy", "= \"" + s.strategy + "\" is not supported for weights (channel, group, tensor, block are)");
  }
  if (s.dtype == DType::F8_E4M3 && !s.symmetric) w.fail("symmetric", "must be true for fp8 weights");
  if (s.dtype != DType::F8_E4M3 && (s.strategy == "tensor" || s.strategy == "block"))
    w.fail("strategy", "= \"" + s.strategy + "\" is not supported for integer weights (channel and group are)");
  if (group.contains("input_activations") && group.at("input_activations").is_object()) {
    const Args a{group.at("input_activations"), where + ".input_activations"};
    if (a.str("type", "float") == "float" && a.integer("num_bits", 8) == 8 && s.dtype == DType::F8_E4M3 &&
        a.flag("dynamic", false)) {
      // Dynamic fp8 activations, rounded per token (a "tensor" strategy would make a token's
      // result depend on its batch: Corral rounds per token for it too).
      s.act_dynamic = true;
      s.act_group = a.str("strategy", "token") == "group" ? a.integer("group_size", 0) : 0;
    }
  }
  return s;
}

int64_t bits_of(DType t) { return t == DType::I4 ? 4 : 8; }

}  // namespace

CheckpointQuantization load_quantization(const std::string& config_path) {
  const json doc = read_json_file<ConfigError>(config_path, "model config");
  CheckpointQuantization q;
  q.source = config_path;
  if (!doc.is_object()) return q;
  const json* qc = nullptr;
  if (doc.contains("quantization_config") && !doc.at("quantization_config").is_null()) qc = &doc.at("quantization_config");
  else if (doc.contains("text_config") && doc.at("text_config").is_object() &&
           doc.at("text_config").contains("quantization_config") && !doc.at("text_config").at("quantization_config").is_null())
    qc = &doc.at("text_config").at("quantization_config");
  if (!qc) return q;
  const std::string where = "quantization_config";
  if (!qc->is_object()) throw ConfigError("config field '" + where + "' in " + config_path + " must be an object");
  const Args top{*qc, where};
  q.method = top.str("quant_method", "");
  const auto list = [&](const char* key) {
    std::vector<std::string> out;
    if (const json* v = top.get(key)) {
      if (!v->is_array()) top.fail(key, "must be a list of module names");
      for (const json& e : *v) {
        if (!e.is_string()) top.fail(key, "must be a list of module names");
        out.push_back(e.get<std::string>());
      }
    }
    return out;
  };
  if (q.method == "compressed-tensors") {
    const std::string status = top.str("quantization_status", "compressed");
    if (status != "compressed")
      top.fail("quantization_status", "= \"" + status + "\": Corral reads compressed checkpoints only");
    const std::string format = top.str("format", "");
    const json* groups = top.get("config_groups");
    if (!groups || !groups->is_object() || groups->empty()) top.fail("config_groups", "must be a non-empty object");
    for (const auto& [name, g] : groups->items()) {
      const std::string gw = where + ".config_groups." + name;
      if (!g.is_object()) throw ConfigError("config field '" + gw + "' in " + config_path + " must be an object");
      const Args ga{g, gw};
      const std::string fmt = ga.str("format", format);
      std::vector<std::string> targets;
      if (const json* t = ga.get("targets"))
        for (const json& e : *t)
          if (e.is_string()) targets.push_back(e.get<std::string>());
      if (targets.empty()) ga.fail("targets", "must list the modules the group quantizes");
      q.groups.emplace_back(targets, compressed_tensors_scheme(g, gw, fmt));
    }
    q.ignore = list("ignore");
  } else if (q.method == "fbgemm_fp8") {
    QuantScheme s;
    s.dtype = DType::F8_E4M3;
    s.strategy = "channel";
    s.fbgemm = true;
    s.act_dynamic = true;  // per row (activation_scale_ub is not applied)
    q.groups.emplace_back(std::vector<std::string>{"Linear"}, s);
    q.ignore = list("modules_to_not_convert");
  } else {
    throw ConfigError("config field '" + where + ".quant_method' in " + config_path + " = \"" + q.method +
                      "\" is not supported (compressed-tensors and fbgemm_fp8 are)");
  }
  return q;
}

const QuantScheme* CheckpointQuantization::scheme_for(const std::string& module) const {
  if (method.empty()) return nullptr;
  for (const std::string& name : spellings(module))
    for (const std::string& i : ignore) {
      if (name == i || pattern_matches(i, name)) return nullptr;
      // fbgemm_fp8's modules_to_not_convert also match at dot boundaries (prefix or suffix).
      if (method == "fbgemm_fp8" && (name.rfind(i + ".", 0) == 0 || ends_with(name, "." + i))) return nullptr;
    }
  for (const auto& [targets, scheme] : groups)
    for (const std::string& t : targets)
      for (const std::string& name : spellings(module))
        if (t == "Linear" || t == name || pattern_matches(t, name)) return &scheme;
  return nullptr;
}

std::string CheckpointQuantization::describe() const {
  if (method.empty()) return "";
  std::string out = method;
  for (const auto& [targets, s] : groups) {
    out += std::string(" ") + (s.dtype == DType::F8_E4M3 ? "fp8" : s.dtype == DType::I4 ? "int4" : "int8") + " " +
           s.strategy;
    if (s.strategy == "group") out += " " + std::to_string(s.group_size);
    if (!s.symmetric) out += " asymmetric";
    if (s.act_dynamic) out += ", dynamic fp8 activations";
  }
  return out;
}

namespace {

TensorRecord expect_tensor(const Checkpoint& ckpt, const std::string& name, const std::vector<std::vector<int64_t>>& shapes,
                           std::initializer_list<DType> dtypes) {
  const TensorRecord r = ckpt.get(name);
  if (std::find(shapes.begin(), shapes.end(), r.entry->shape) == shapes.end()) {
    std::string want;
    for (const auto& s : shapes) want += (want.empty() ? "" : " or ") + shape_string(s);
    throw ShapeError("tensor '" + name + "' in " + r.file->path() + " has shape " + shape_string(r.entry->shape) +
                     ", expected " + want);
  }
  if (!r.entry->dtype || std::find(dtypes.begin(), dtypes.end(), *r.entry->dtype) == dtypes.end()) {
    std::string want;
    for (DType t : dtypes) want += (want.empty() ? "" : ", ") + std::string(dtype_name(t));
    throw DTypeError("tensor '" + name + "' in " + r.file->path() + " has dtype " + r.entry->dtype_name +
                     ", expected " + want);
  }
  return r;
}

float scale_value(const TensorRecord& r, int64_t i) {
  switch (*r.entry->dtype) {
    case DType::BF16: return to_float(static_cast<const bf16*>(r.data())[i]);
    case DType::F16: return to_float(static_cast<const f16*>(r.data())[i]);
    default: return static_cast<const float*>(r.data())[i];
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The scale tensor's expected shapes and its group along k.
struct ScaleLayout {
  std::vector<std::vector<int64_t>> shapes;
  int64_t groups = 1;  // along k
  int64_t k_group = 0;
};

ScaleLayout scale_layout(const QuantScheme& s, int64_t out, int64_t in) {
  if (s.strategy == "group") return {{{out, ceil_div(in, s.group_size)}}, ceil_div(in, s.group_size), s.group_size};
  if (s.strategy == "block")
    return {{{ceil_div(out, s.block_rows), ceil_div(in, s.block_cols)}}, ceil_div(in, s.block_cols), s.block_cols};
  if (s.strategy == "tensor") return {{{1}, {}, {1, 1}}, 1, in};
  return {{{out, 1}}, 1, in};  // channel
}

bool trivial_g_idx(const TensorRecord& g, int64_t group, int64_t in) {
  const int32_t* idx = static_cast<const int32_t*>(g.data());
  for (int64_t c = 0; c < in; ++c)
    if (idx[c] != c / group) return false;
  return true;
}

}  // namespace

QuantPlan plan_quantized(const Checkpoint& ckpt, const QuantizedSource& src) {
  const QuantScheme& s = *src.scheme;
  const int64_t out = src.out, in = src.in;
  QuantPlan p;
  p.dtype = s.dtype;
  if (s.act_dynamic) p.act_group = s.act_group > 0 ? s.act_group : in;
  if (s.fbgemm) {
    if (src.expert >= 0) {
      const TensorRecord w = ckpt.get(src.module);
      if (w.entry->shape.size() != 3 || w.entry->shape[1] != in || w.entry->shape[0] <= src.expert ||
          w.entry->shape[2] != src.width)
        throw ShapeError("tensor '" + src.module + "' in " + w.file->path() + " has shape " +
                         shape_string(w.entry->shape) + ", expected [experts, " + std::to_string(in) + ", " +
                         std::to_string(src.width) + "]");
      expect_tensor(ckpt, src.module, {w.entry->shape}, {DType::F8_E4M3});
      const int64_t E = w.entry->shape[0];
      expect_tensor(ckpt, src.module + "_scale", {{E, 1, src.width}, {E, src.width, 1}}, {DType::F32, DType::BF16, DType::F16});
    } else {
      expect_tensor(ckpt, src.module + ".weight", {{out, in}}, {DType::F8_E4M3});
      expect_tensor(ckpt, src.module + ".weight_scale", {{out, 1}}, {DType::F32, DType::BF16, DType::F16});
    }
    p.group = in;
    p.scale_dtype = DType::F32;
    return p;
  }
  const ScaleLayout sl = scale_layout(s, out, in);
  const TensorRecord scale = expect_tensor(ckpt, src.module + ".weight_scale", sl.shapes, {DType::BF16, DType::F16, DType::F32});
  p.scale_dtype = *scale.entry->dtype == DType::BF16 ? DType::BF16 : DType::F32;
  p.group = sl.k_group;
  if (s.dtype == DType::F8_E4M3) {
    expect_tensor(ckpt, src.module + ".weight", {{out, in}}, {DType::F8_E4M3});
    return p;
  }
  const int64_t per_word = 32 / bits_of(s.dtype);
  expect_tensor(ckpt, src.module + ".weight_packed", {{out, ceil_div(in, per_word)}}, {DType::I32});
  if (ckpt.contains(src.module + ".weight_shape")) {
    const TensorRecord shape = expect_tensor(ckpt, src.module + ".weight_shape", {{2}}, {DType::I64, DType::I32});
    const auto v = [&](int i) {
      return *shape.entry->dtype == DType::I64 ? static_cast<const int64_t*>(shape.data())[i]
                                               : int64_t(static_cast<const int32_t*>(shape.data())[i]);
    };
    if (v(0) != out || v(1) != in)
      throw ShapeError("tensor '" + src.module + ".weight_shape' in " + shape.file->path() + " says [" +
                       std::to_string(v(0)) + ", " + std::to_string(v(1)) + "], expected [" + std::to_string(out) +
                       ", " + std::to_string(in) + "]");
  }
  if (!s.symmetric) {
    expect_tensor(ckpt, src.module + ".weight_zero_point", {{ceil_div(out, per_word), sl.groups}, {out, sl.groups}},
                  {DType::I32, DType::I8});
    p.offsets = true;
  }
  if (p.group % kernels::kQuantBlock != 0) {
    if (s.strategy == "channel") p.group = ceil_div(in, kernels::kQuantBlock) * kernels::kQuantBlock;
    else p.dense = true;
  }
  if (ckpt.contains(src.module + ".weight_g_idx")) {
    const TensorRecord g = expect_tensor(ckpt, src.module + ".weight_g_idx", {{in}}, {DType::I32});
    const int32_t* idx = static_cast<const int32_t*>(g.data());
    for (int64_t c = 0; c < in; ++c)
      if (idx[c] < 0 || idx[c] >= sl.groups)
        throw ShapeError("tensor '" + src.module + ".weight_g_idx' in " + g.file->path() + " has group " +
                         std::to_string(idx[c]) + " at column " + std::to_string(c) + ", outside [0, " +
                         std::to_string(sl.groups) + ")");
    if (!trivial_g_idx(g, sl.k_group, in)) p.dense = true;  // activation order: decoded to float
  }
  return p;
}

DecodedWeights decode_quantized(const Checkpoint& ckpt, const QuantizedSource& src, const QuantPlan& plan) {
  const QuantScheme& s = *src.scheme;
  const int64_t out = src.out, in = src.in;
  DecodedWeights d;
  kernels::QuantizedBuffer& b = d.codes;
  b.dtype = s.dtype;
  b.out = out;
  b.in = in;
  b.group = plan.group;
  const int64_t groups = ceil_div(in, plan.group);
  b.codes.resize(size_t(out * in));
  b.scales.resize(size_t(out * groups));
  // k -> the scale group of the checkpoint (activation order: from g_idx).
  std::vector<int32_t> group_of(static_cast<size_t>(in));
  int64_t ckpt_groups = groups;
  if (s.fbgemm) {
    const TensorRecord w = ckpt.get(src.expert >= 0 ? src.module : src.module + ".weight");
    const TensorRecord sc = ckpt.get(src.expert >= 0 ? src.module + "_scale" : src.module + ".weight_scale");
    const uint8_t* codes = static_cast<const uint8_t*>(w.data());
    for (int64_t r = 0; r < out; ++r) {
      for (int64_t k = 0; k < in; ++k)
        b.codes[r * in + k] = int8_t(src.expert >= 0 ? codes[(src.expert * in + k) * src.width + src.col0 + r] : codes[r * in + k]);
      b.scales[r] = scale_value(sc, src.expert >= 0 ? src.expert * src.width + src.col0 + r : r);
    }
  } else {
    const ScaleLayout sl = scale_layout(s, out, in);
    ckpt_groups = sl.groups;
    for (int64_t k = 0; k < in; ++k) group_of[k] = int32_t(k / sl.k_group);
    if (ckpt.contains(src.module + ".weight_g_idx")) {
      const int32_t* idx = static_cast<const int32_t*>(ckpt.get(src.module + ".weight_g_idx").data());
      std::copy(idx, idx + in, group_of.begin());
    }
    const TensorRecord sc = ckpt.get(src.module + ".weight_scale");
    for (int64_t r = 0; r < out; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        int64_t i = r * sl.groups + g;  // channel, group
        if (s.strategy == "tensor") i = 0;
        if (s.strategy == "block") i = (r / s.block_rows) * sl.groups + g;
        b.scales[r * groups + g] = scale_value(sc, i);
      }
    if (s.dtype == DType::F8_E4M3) {
      const int8_t* codes = static_cast<const int8_t*>(ckpt.get(src.module + ".weight").data());
      std::copy(codes, codes + out * in, b.codes.begin());
    } else {
      const int64_t bits = bits_of(s.dtype), per_word = 32 / bits, mask = (int64_t(1) << bits) - 1, bias = mask / 2 + 1;
      const TensorRecord pk = ckpt.get(src.module + ".weight_packed");
      const uint32_t* words = static_cast<const uint32_t*>(pk.data());
      const int64_t wpr = pk.entry->shape[1];
      for (int64_t r = 0; r < out; ++r)
        for (int64_t k = 0; k < in; ++k)
          b.codes[r * in + k] = int8_t(int64_t((words[r * wpr + k / per_word] >> (bits * (k % per_word))) & mask) - bias);
      if (!s.symmetric) {
        const TensorRecord zp = ckpt.get(src.module + ".weight_zero_point");
        b.zero_points.resize(size_t(out * groups));
        // Packed along the rows as the codes (compressed-tensors), or one value per row.
        const bool packed = *zp.entry->dtype == DType::I32 && zp.entry->shape[0] == ceil_div(out, per_word);
        for (int64_t r = 0; r < out; ++r)
          for (int64_t g = 0; g < groups; ++g) {
            int64_t z;
            if (packed) {
              const uint32_t word = static_cast<const uint32_t*>(zp.data())[(r / per_word) * sl.groups + g];
              z = int64_t((word >> (bits * (r % per_word))) & mask) - bias;
            } else {
              z = *zp.entry->dtype == DType::I32 ? static_cast<const int32_t*>(zp.data())[r * sl.groups + g]
                                                 : static_cast<const int8_t*>(zp.data())[r * sl.groups + g];
            }
            b.zero_points[r * groups + g] = int8_t(z);
          }
      }
    }
  }
  if (!plan.dense) return d;
  // Float32 weights, exactly (q - z) * s with the checkpoint's group of each k.
  d.dense.resize(size_t(out * in));
  for (int64_t r = 0; r < out; ++r)
    for (int64_t k = 0; k < in; ++k) {
      const int64_t g = std::min<int64_t>(group_of[k], ckpt_groups - 1);
      const int z = b.zero_points.empty() ? 0 : b.zero_points[r * groups + g];
      const float q = s.dtype == DType::F8_E4M3 ? to_float(fp8_e4m3{uint8_t(b.codes[r * in + k])}) : float(b.codes[r * in + k] - z);
      d.dense[r * in + k] = q * b.scales[r * groups + g];
    }
  d.codes = kernels::QuantizedBuffer{};
  return d;
}

}  // namespace corral
