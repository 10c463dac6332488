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

struct LayerWeights {
  VectorRef input_norm, post_attention_norm;
  MatrixRef q, k, v, o;
  MoeWeights moe;                      // MoE layers
  MatrixRef mlp_gate, mlp_up, mlp_down;  // dense layers
};

struct ModelWeights {
  MatrixRef embed;  // [vocab, hidden]
  VectorRef final_norm;
  MatrixRef lm_head;  // [vocab, hidden]; the embedding when tied
  std::vector<LayerWeights> layers;
  std::vector<std::shared_ptr<const SafetensorsFile>> files;  // keeps the mappings alive
};

// Binds every text-model tensor (Llama4ForCausalLM names, or Llama4ForConditionalGeneration's
// under language_model.; vision tensors are ignored). Throws MissingTensorError, ShapeError or
// DTypeError naming the tensor and its file.
ModelWeights load_weights(const Checkpoint& checkpoint, const ModelConfig& config);

}  // namespace corral
