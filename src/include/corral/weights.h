// The tensors of a Llama 4 text model, bound to their (memory-mapped) checkpoint data, with every
// name, shape and dtype checked at load.
#pragma once

#include <memory>
#include <vector>

#include "corral/checkpoint.h"
#include "corral/config.h"
#include "corral/kernels/moe.h"

namespace corral {

struct VectorRef {
  const void* data = nullptr;
  DType dtype = DType::F32;
};

// Matrices are packed for the CPU products (kernels::pack_weights): a copy of each, made at load.
struct LayerWeights {
  VectorRef input_norm, post_attention_norm;
  MatrixRef q, k, v, o;
  // q, k and v as one product (one pass over x, one stream of panels) where their packed panels
  // lie back to back as one matrix's: q's and k's widths multiples of 64. Else data is null.
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
  kernels::PackedStorage packed;  // every packed matrix
};

// Binds every text-model tensor (Llama4ForCausalLM names, or Llama4ForConditionalGeneration's
// under language_model.; vision tensors are ignored) and packs the matrices. Throws
// MissingTensorError, ShapeError or DTypeError naming the tensor and its file.
ModelWeights load_weights(const Checkpoint& checkpoint, const ModelConfig& config);

}  // namespace corral
