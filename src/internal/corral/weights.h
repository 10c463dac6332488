// The tensors of a Llama 4 text model, bound to their (memory-mapped) checkpoint data, with every
// name, shape and dtype checked at load.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "corral/checkpoint.h"
#include "corral/config.h"
#include "corral/device.h"
#include "corral/kernels/moe.h"

namespace corral {

struct VectorRef {
  const void* data = nullptr;
  DType dtype = DType::F32;
};

// Matrices are packed for the CPU products (kernels::pack_weights, pack_quantized): a copy of
// each, made at load. On a GPU float matrices are device copies as stored (OutIn nn.Linear
// matrices, the fused expert tensors InOut), with q, k and v as one [q + k + v widths, hidden]
// matrix (qkv) and a dense MLP's gate and up as one [2 * intermediate, hidden] matrix
// (mlp_gate_up); quantized ones are the CPU's packed matrices (pack_quantized, pack_quantized_glu)
// copied there, or float32 [out, in] rows where the CPU packs them as float32 (QuantPlan::dense).
struct LayerWeights {
  VectorRef input_norm, post_attention_norm;
  MatrixRef q, k, v, o;
  // q, k and v as one product (one pass over x, one stream of panels) where their packed panels
  // lie back to back as one matrix's: q's and k's widths multiples of 64, one format. Else null.
  MatrixRef qkv;
  MoeWeights moe;                  // MoE layers (kernels::pack_moe)
  MatrixRef mlp_gate_up, mlp_down;  // dense layers; gate and up packed together (kernels::pack_glu)
};

struct ModelWeights {
  MatrixRef embed;  // [vocab, hidden], as stored (rows are gathered, not multiplied)
  VectorRef final_norm;
  MatrixRef lm_head;  // [vocab, hidden], packed (from the embedding when tied)
  std::vector<LayerWeights> layers;
  std::vector<std::shared_ptr<const SafetensorsFile>> files;  // keeps the mappings alive
  kernels::PackedStorage packed;  // every packed matrix (CPU)
  DeviceBuffer device_data;       // every tensor (GPU)
  int64_t bytes = 0;              // bytes of weights held: packed matrices, embedding, norms
  std::string format;             // e.g. "bfloat16", "int4 (quantized at load)", for logs
};

// The vision tower of a multimodal checkpoint (vision_model.* and multi_modal_projector.*), never
// quantized: on the CPU matrices packed for its products and vectors bound to the mapping; on a
// GPU every tensor copied there as stored.
struct VisionLayerWeights {
  VectorRef ln1_w, ln1_b, ln2_w, ln2_b;  // input_layernorm, post_attention_layernorm
  MatrixRef q, k, v, o, fc1, fc2;
  VectorRef q_b, k_b, v_b, o_b, fc1_b, fc2_b;
};

struct VisionWeights {
  MatrixRef patch_embedding;     // [hidden, channels * patch^2], no bias
  VectorRef class_embedding;     // [hidden]
  VectorRef position_embedding;  // [grid^2 + 1, hidden], the CLS row last
  VectorRef pre_w, pre_b, post_w, post_b;
  std::vector<VisionLayerWeights> layers;
  MatrixRef adapter_fc1, adapter_fc2;  // [projector, intermediate], [projector, projector]
  MatrixRef projector;                 // [text hidden, projector]
  std::vector<std::shared_ptr<const SafetensorsFile>> files;  // keeps the mappings alive
  kernels::PackedStorage packed;  // CPU
  DeviceBuffer device_data;       // GPU
  int64_t bytes = 0;
};

// Binds and packs the vision tower's tensors. Throws MissingTensorError, ShapeError or DTypeError
// naming the tensor and its file.
VisionWeights load_vision_weights(const Checkpoint& checkpoint, const ModelConfig& config, const Stream& stream = {});

// The tensor `name` of `shape` in a float dtype the kernels read (F32, BF16, F16), its dtype in
// *dtype; ShapeError or DTypeError naming the tensor and its file otherwise (`hint` ends the
// latter's message).
const void* float_tensor(const Checkpoint& checkpoint, const std::string& name, const std::vector<int64_t>& shape,
                         DType* dtype, const std::string& hint = "");

// Both loaders' way onto a GPU: every tensor copied as stored into one device allocation.
// upload_to_device runs place(u) twice over the same tensors: first to size the allocation
// (u.put returns null), then to copy into it (u.put returns the device address).
struct DeviceUploader {
  using Parts = std::vector<std::pair<const void*, int64_t>>;  // (host data, bytes)
  const Stream& stream;
  char* base = nullptr;
  int64_t at = 0;

  // The parts back to back from a 256-byte aligned offset.
  const void* put(const Parts& parts) {
    at = (at + 255) / 256 * 256;
    return append(parts);
  }
  // The parts right after the previous ones (matrices that must lie back to back, e.g. experts).
  const void* append(const Parts& parts) {
    char* start = base ? base + at : nullptr;
    for (const auto& [src, bytes] : parts) {
      if (base) copy(base + at, src, size_t(bytes), stream);
      at += bytes;
    }
    return start;
  }
};

template <class Place>
DeviceBuffer upload_to_device(const Stream& stream, Place&& place) {
  DeviceUploader sizing{stream};
  place(sizing);
  DeviceBuffer buffer(stream.device, size_t(sizing.at));
  DeviceUploader copying{stream, static_cast<char*>(buffer.data())};
  place(copying);
  synchronize(stream);
  return buffer;
}

// Weight quantization at load, for 16/32-bit checkpoints:
//   "" or "none": as stored;
//   "int8": every linear (attention, MLPs, experts, lm_head) int8 with one scale per output row;
//   "int4": MLPs and experts int4 in groups of 32 k (bf16 scales), attention and lm_head int8.
// The router, the norms and the embedding stay as stored. Quantized checkpoints (see
// quantized_checkpoint.h) load as published and take no quantization here.
struct LoadOptions {
  std::string quantization;
  bool vision = true;  // load the vision encoder of a multimodal checkpoint
  Device device;       // where the text model's weights go (the vision encoder's: see load_vision_weights)
};

// Binds every text-model tensor (Llama4ForCausalLM names, or Llama4ForConditionalGeneration's
// under language_model.; vision tensors are ignored) and packs the matrices, layer by layer (the
// checkpoint's pages are dropped after each: memory holds the packed model and one layer).
// Throws MissingTensorError, ShapeError or DTypeError naming the tensor and its file,
// ConfigError for a quantization_config Corral cannot run, InvalidInputError for a bad option.
// On a GPU quantized weights are packed on the host one matrix at a time and copied there.
ModelWeights load_weights(const Checkpoint& checkpoint, const ModelConfig& config, const LoadOptions& options = {});

}  // namespace corral
