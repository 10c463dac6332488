// Quantized checkpoints as published, read as they are (no conversion step): compressed-tensors
// (float-quantized FP8; pack-quantized int4 and int8) and transformers' fbgemm_fp8. Decides from
// config.json's quantization_config which Linears are quantized and how, checks their companion
// tensors, and decodes their codes into one code per byte for packing.
#pragma once

#include <string>
#include <vector>

#include "corral/checkpoint.h"
#include "corral/kernels/quantize.h"

namespace corral {

// How a checkpoint quantized one Linear's weights (and, for FP8, its activations).
struct QuantScheme {
  DType dtype = DType::I8;      // I8, I4 or F8_E4M3
  std::string strategy;         // "channel", "group", "tensor" or "block"
  int64_t group_size = 0;       // group: k per scale
  int64_t block_rows = 0, block_cols = 0;  // block: [rows, k] per scale
  bool symmetric = true;
  bool act_dynamic = false;     // FP8: activations rounded to fp8 at run time...
  int64_t act_group = 0;        // ...per token and per this many k (0: the whole row)
  bool fbgemm = false;          // fbgemm_fp8's tensor names and F32 row scales
};

struct CheckpointQuantization {
  std::string method;  // "" (16/32-bit weights), "compressed-tensors" or "fbgemm_fp8"
  std::string source;  // the config.json, for messages
  std::vector<std::pair<std::vector<std::string>, QuantScheme>> groups;  // targets -> scheme
  std::vector<std::string> ignore;  // compressed-tensors ignore / fbgemm modules_to_not_convert

  // The scheme of the Linear at `module` (its checkpoint path without ".weight"), or null when it
  // is stored in 16/32 bits.
  const QuantScheme* scheme_for(const std::string& module) const;
  std::string describe() const;  // e.g. "compressed-tensors int4 group 128", for logs
};

// Reads config.json's quantization_config (absent: method ""). ConfigError naming the field for
// an unknown method, format, type or strategy, or values Corral cannot run.
CheckpointQuantization load_quantization(const std::string& config_path);

// What a quantized Linear becomes in memory: its codes packed as they are (dtype, group, scales
// in scale_dtype, offsets for zero points), or, where the packed form cannot express them
// (groups not a multiple of kernels::kQuantBlock, activation-order groups), its weights decoded to
// float32 (`dense`): exact either way.
struct QuantPlan {
  bool dense = false;
  DType dtype = DType::I8;
  int64_t group = 0;
  DType scale_dtype = DType::F32;
  bool offsets = false;
  int64_t act_group = 0;
  QuantInfo info() const { return QuantInfo{group, scale_dtype, offsets, act_group}; }
};

// One quantized matrix of the checkpoint, [out, in] as nn.Linear stores it: a Linear at `module`,
// or (fbgemm_fp8's fused experts) a slice of a fused tensor.
struct QuantizedSource {
  std::string module;
  const QuantScheme* scheme = nullptr;
  int64_t out = 0, in = 0;
  // Fused experts: expert `expert` of `module` ("...experts.gate_up_proj" / "...experts.down_proj"),
  // columns [col0, col0 + out) of its [in, width] slice.
  int64_t expert = -1, col0 = 0, width = 0;
};

// Checks the source's tensors (names, shapes, dtypes: MissingTensorError / ShapeError / DTypeError
// naming the tensor and its file) and decides its plan.
QuantPlan plan_quantized(const Checkpoint& ckpt, const QuantizedSource& src);

// The source's codes, scales and zero points (plan not dense), or its float32 weights [out, in].
struct DecodedWeights {
  kernels::QuantizedBuffer codes;
  std::vector<float> dense;
};
DecodedWeights decode_quantized(const Checkpoint& ckpt, const QuantizedSource& src, const QuantPlan& plan);

}  // namespace corral
