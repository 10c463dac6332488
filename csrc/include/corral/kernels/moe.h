// Llama 4's mixture-of-experts feed-forward block as one op.
#pragma once

#include "corral/kernels/linear.h"

namespace corral {

// The weights of one MoE layer. Routed experts are the fused tensors of the checkpoint:
// gate_up [experts, hidden, 2 * inter] (gate = first half of the last axis, up = second) and
// down [experts, inter, hidden], both used as x @ W. The shared expert is a SwiGLU MLP of nn.Linear
// matrices. The CPU op reads them packed (pack_moe): then experts_layout is Packed, gate_up holds
// the experts' PackedGlu matrices back to back and down their Packed ones, shared_gate is the
// PackedGlu of the shared gate and up (shared_up unused) and router and shared_down are Packed.
// The CUDA op reads float experts as the checkpoint's fused tensors (InOut) with an unpacked
// router and shared expert, or quantized experts packed as on the CPU (experts_layout Packed,
// gate_up_quant / down_quant) with an unpacked float router and a shared expert as swiglu_mlp reads
// it on CUDA (shared_gate its gate_up, quantized PackedGlu or one unpacked matrix; shared_up unused).
struct MoeWeights {
  MatrixRef router;  // [experts, hidden] (OutIn)
  const void* gate_up = nullptr;
  const void* down = nullptr;
  DType experts_dtype = DType::F32;
  QuantInfo gate_up_quant, down_quant;  // quantized experts (packed only)
  WeightLayout experts_layout = WeightLayout::InOut;
  MatrixRef shared_gate, shared_up, shared_down;
  int64_t num_experts = 0;
  int64_t hidden = 0;
  int64_t inter = 0;
};

namespace kernels {

// The packed copy of a checkpoint-layout MoE layer (sizes in bytes, dst 64-byte aligned; the
// result views dst). Quantized MoE layers are packed piece by piece by the loader (pack_quantized
// and pack_quantized_glu, the experts back to back).
int64_t packed_moe_bytes(const MoeWeights& w);
MoeWeights pack_moe(void* dst, const MoeWeights& w);

// out[t] += shared(x[t]) + sum over the top_k experts e of t (by router logit) of
// expert_e(sigmoid(logit[t, e]) * x[t]); the router score scales the expert INPUT.
// x and out are [tokens, hidden] float32 (out must not alias x); out usually holds the residual.
// expert_tokens, when not null, gets += the number of tokens routed to each expert. On CPU the
// router's product is exact float32 (its top-k decides the routes); the experts' products follow
// linear's rules.
void moe(const Stream& stream, float* out, const float* x, int64_t tokens, const MoeWeights& w,
         int top_k, int64_t* expert_tokens = nullptr, Activations act = Activations::Native);

}  // namespace kernels
}  // namespace corral
