#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {

// Expert e's slice of a fused [experts, in, out] tensor, as an x @ W matrix.
MatrixRef expert_matrix(const void* base, DType dtype, int64_t e, int64_t in, int64_t out) {
  const char* p = static_cast<const char*>(base) + e * in * out * dtype_size(dtype);
  return MatrixRef{p, dtype, WeightLayout::InOut, in, out};
}

}  // namespace

void moe(float* out, const float* x, int64_t tokens, const MoeWeights& w, int top_k,
         int64_t* expert_tokens) {
  const int64_t E = w.num_experts, H = w.hidden, I = w.inter;
  if (top_k < 1 || top_k > E)
    throw InvalidInputError("moe: top_k " + std::to_string(top_k) + " must be in [1, " +
                            std::to_string(E) + "]");
  float_index(w.experts_dtype, "MoE experts");

  // Router: logits, the top_k experts of each token, and their sigmoid scores.
  std::vector<float> logits(tokens * E);
  linear(logits.data(), E, x, H, tokens, w.router, false);
  std::vector<int32_t> chosen(tokens * top_k);
  std::vector<float> score(tokens * top_k);
  std::vector<int32_t> order(E);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* l = logits.data() + t * E;
    for (int64_t e = 0; e < E; ++e) order[e] = int32_t(e);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    for (int k = 0; k < top_k; ++k) {
      chosen[t * top_k + k] = order[k];
      score[t * top_k + k] = 1.0f / (1.0f + std::exp(-l[order[k]]));
    }
  }

  // Counting sort of (token, slot) pairs so each expert's rows are contiguous.
  std::vector<int64_t> start(E + 1, 0);
  for (int32_t e : chosen) ++start[e + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> pair_of_row(tokens * top_k);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < tokens * top_k; ++i) pair_of_row[fill[chosen[i]]++] = i;
  }
  if (expert_tokens)
    for (int64_t e = 0; e < E; ++e) expert_tokens[e] += start[e + 1] - start[e];

  swiglu_mlp(out, x, tokens, w.shared_gate, w.shared_up, w.shared_down);

  std::vector<float> xs, ys, hidden;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (n == 0) continue;
    xs.resize(n * H);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t pair = pair_of_row[start[e] + r], t = pair / top_k;
      const float s = score[pair];
      for (int64_t i = 0; i < H; ++i) xs[r * H + i] = x[t * H + i] * s;  // score scales the input
    }
    hidden.resize(n * 2 * I);
    linear(hidden.data(), 2 * I, xs.data(), H, n, expert_matrix(w.gate_up, w.experts_dtype, e, H, 2 * I), false);
    silu_mul(hidden.data(), 2 * I, hidden.data(), hidden.data() + I, 2 * I, n, I);
    ys.resize(n * H);
    linear(ys.data(), H, hidden.data(), 2 * I, n, expert_matrix(w.down, w.experts_dtype, e, I, H), false);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t t = pair_of_row[start[e] + r] / top_k;
      for (int64_t i = 0; i < H; ++i) out[t * H + i] += ys[r * H + i];
    }
  }
}

}  // namespace corral::cpu
