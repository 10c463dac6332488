// Llama 4's mixture-of-experts feed-forward block as one op.
#pragma once

#include "corral/kernels/linear.h"

namespace corral {

// The weights of one MoE layer. Routed experts are the fused tensors of the checkpoint:
// gate_up [experts, hidden, 2 * inter] (gate = first half of the last axis, up = second) and
// down [experts, inter, hidden], both used as x @ W. The shared expert is a SwiGLU MLP of nn.Linear
// matrices.
struct MoeWeights {
  MatrixRef router;  // [experts, hidden] (OutIn)
  const void* gate_up = nullptr;
  const void* down = nullptr;
  DType experts_dtype = DType::F32;
  MatrixRef shared_gate, shared_up, shared_down;
  int64_t num_experts = 0;
  int64_t hidden = 0;
  int64_t inter = 0;
};

namespace kernels {

// out[t] += shared(x[t]) + sum over the top_k experts e of t (by router logit) of
// expert_e(sigmoid(logit[t, e]) * x[t]); the router score scales the expert INPUT.
// x and out are [tokens, hidden] float32 (out must not alias x); out usually holds the residual.
// expert_tokens, when not null, gets += the number of tokens routed to each expert.
void moe(const Stream& stream, float* out, const float* x, int64_t tokens, const MoeWeights& w,
         int top_k, int64_t* expert_tokens = nullptr);

}  // namespace kernels
}  // namespace corral
