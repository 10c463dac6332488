#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include <omp.h>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {

// One SwiGLU MLP over a set of rows: a routed expert (its tokens, gathered and scaled by their
// router scores) or the shared expert (every token).
struct Mlp {
  MatrixRef gate_up, down;  // packed
  int kind_up, kind_down;
  const PreparedX* x;       // its input rows, from row r0
  const PreparedX* h;       // silu(gate) * up, prepared, from row r0 (the shared expert's: 0)
  float* h_out;             // [rows, inter]: where the gate/up products write h
  float* y;                 // [rows, hidden]: where down writes (the shared expert adds to out)
  int64_t r0, rows;
  bool accumulate;
};

// A work item: rows [r0, r0 + rows) of one MLP's product with one panel.
struct Item {
  int32_t mlp;
  int32_t panel;
  int64_t r0, rows;
};

void add_items(std::vector<Item>& items, int32_t mlp, const Mlp& m, const MatrixRef& w) {
  for (int64_t p = 0; p < num_panels(w); ++p)
    for (int64_t r = 0; r < m.rows; r += kRowBlock)
      items.push_back({mlp, int32_t(p), r, std::min(kRowBlock, m.rows - r)});
}

// Runs f on every item, within a parallel region: in Shares (given) or one by one.
template <class F>
void for_items(const std::vector<Item>& items, Shares* shares, RegionErrors& errors, const F& f) {
  if (shares) {
    shares->run([&](int64_t i) { errors.run([&] { f(items[i]); }); });
#pragma omp barrier
    return;
  }
  const int64_t n = int64_t(items.size());
#pragma omp for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) errors.run([&] { f(items[i]); });
}

// Rows per MLP up to which a phase's items go out in static shares.
constexpr int64_t kStreamRows = 8;

void check_packed(const MoeWeights& w) {
  if (w.experts_layout != WeightLayout::Packed || !w.router.packed() ||
      w.shared_gate.layout != WeightLayout::PackedGlu || w.shared_down.layout != WeightLayout::Packed)
    throw InvalidInputError("moe: CPU weights must be packed (kernels::pack_moe)");
  float_index(w.router.dtype, "MoE router");
  for (const MatrixRef* m : {&w.shared_gate, &w.shared_down}) gemm_kind(m->dtype, Activations::Native);
  gemm_kind(w.experts_dtype, Activations::Native);
}

}  // namespace

void moe(float* out, const float* x, int64_t tokens, const MoeWeights& w, int top_k,
         int64_t* expert_tokens, Activations act) {
  const int64_t E = w.num_experts, H = w.hidden, I = w.inter, T = tokens;
  if (top_k < 1 || top_k > E)
    throw InvalidInputError("moe: top_k " + std::to_string(top_k) + " must be in [1, " + std::to_string(E) + "]");
  check_packed(w);
  if (T <= 0) return;
  const int64_t Is = w.shared_gate.out / 2, R = T * top_k;  // the shared expert's width; routed rows

  // The router, exact in float32: its top-k decides the routes.
  std::vector<float> logits(T * E);
  product(logits.data(), E, x, H, T, w.router, gemm_kind(w.router.dtype, Activations::Float32), false);

  // Each token's top_k experts by logit (ties: the lower id) and their sigmoid scores.
  std::vector<int32_t> chosen(R), order(E);
  std::vector<float> score(R);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits.data() + t * E;
    for (int64_t e = 0; e < E; ++e) order[e] = int32_t(e);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    for (int k = 0; k < top_k; ++k) {
      chosen[t * top_k + k] = order[k];
      score[t * top_k + k] = 1.0f / (1.0f + std::exp(-l[order[k]]));
    }
  }
  // Counting sort of the (token, k) pairs: each expert's rows contiguous.
  std::vector<int64_t> start(E + 1, 0), row_of(R);
  for (int32_t e : chosen) ++start[e + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < R; ++p) row_of[p] = fill[chosen[p]]++;
  if (expert_tokens)
    for (int64_t e = 0; e < E; ++e) expert_tokens[e] += start[e + 1] - start[e];

  // The routed rows' inputs: x scaled by the router score (Llama 4 scales the expert input).
  float* xs = static_cast<float*>(scratch(1, R * H * 4));
  for (int64_t p = 0; p < R; ++p) {
    const float* src = x + (p / top_k) * H;
    float* dst = xs + row_of[p] * H;
    for (int64_t i = 0; i < H; ++i) dst[i] = src[i] * score[p];
  }
  const int ke = gemm_kind(w.experts_dtype, act), ks = gemm_kind(w.shared_gate.dtype, act),
            kd = gemm_kind(w.shared_down.dtype, act);
  const PreparedX xs_p = prepare(2, xs, H, R, H, ke, w.gate_up_quant.act_group);
  const PreparedX x_p = prepare(3, x, H, T, H, ks, w.shared_gate.quant.act_group);
  float* h = static_cast<float*>(scratch(4, (R * I + T * Is) * 4));
  float* y = static_cast<float*>(scratch(5, R * H * 4));
  const int64_t hr_words = R * prepared_row_words(ke, I);
  char* h_buf = static_cast<char*>(scratch(0, (hr_words + T * prepared_row_words(kd, Is)) * 4));
  PreparedX hr_p{}, hs_p{};

  // The MLPs: experts with tokens (an idle one costs nothing), then the shared expert.
  std::vector<Mlp> mlps;
  MatrixRef gu0{w.gate_up, w.experts_dtype, WeightLayout::PackedGlu, H, 2 * I};
  MatrixRef dn0{w.down, w.experts_dtype, WeightLayout::Packed, I, H};
  gu0.quant = w.gate_up_quant;
  dn0.quant = w.down_quant;
  const int64_t gu_bytes = num_panels(gu0) * panel_bytes(gu0);
  const int64_t dn_bytes = num_panels(dn0) * panel_bytes(dn0);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r = start[e], n = start[e + 1] - start[e];
    if (n == 0) continue;
    MatrixRef gu = gu0, dn = dn0;
    gu.data = static_cast<const char*>(w.gate_up) + e * gu_bytes;
    dn.data = static_cast<const char*>(w.down) + e * dn_bytes;
    mlps.push_back({gu, dn, ke, ke, &xs_p, &hr_p, h + r * I, y + r * H, r, n, false});
  }
  mlps.push_back({w.shared_gate, w.shared_down, ks, kd, &x_p, &hs_p, h + R * I, out, 0, T, true});
  std::vector<Item> up_items, down_items;
  for (size_t i = 0; i < mlps.size(); ++i) {
    add_items(up_items, int32_t(i), mlps[i], mlps[i].gate_up);
    add_items(down_items, int32_t(i), mlps[i], mlps[i].down);
  }

  const auto up = [&](const Item& it) {
    const Mlp& m = mlps[it.mlp];
    const int64_t ld = output_width(m.gate_up);
    gemm_panel(m.h_out + it.r0 * ld, ld, *m.x, m.r0 + it.r0, it.rows, m.gate_up, m.kind_up, it.panel, false);
  };
  const auto down = [&](const Item& it) {
    const Mlp& m = mlps[it.mlp];
    gemm_panel(m.y + it.r0 * H, H, *m.h, m.r0 + it.r0, it.rows, m.down, m.kind_down, it.panel, m.accumulate);
  };
  // Few rows per MLP (decode): memory-bound items, in Shares (each thread's panels one contiguous
  // stream). Many rows: compute-bound items of experts with different row counts, one by one.
  int64_t most_rows = 0;
  for (const Mlp& m : mlps) most_rows = std::max(most_rows, m.rows);
  const int threads = omp_get_max_threads();
  std::optional<Shares> up_shares, down_shares;
  if (most_rows <= kStreamRows) {
    up_shares.emplace(int64_t(up_items.size()), threads);
    down_shares.emplace(int64_t(down_items.size()), threads);
  }

  RegionErrors errors;
#pragma omp parallel
  {
    for_items(up_items, up_shares ? &*up_shares : nullptr, errors, up);
#pragma omp single
    errors.run([&] {
      hr_p = prepare_in(h_buf, h, I, R, I, ke, w.down_quant.act_group);
      hs_p = prepare_in(h_buf + hr_words * 4, h + R * I, Is, T, Is, kd, w.shared_down.quant.act_group);
    });
    for_items(down_items, down_shares ? &*down_shares : nullptr, errors, down);
    // Back to token order: out (+ the shared expert, already added) += the routed outputs, in k order.
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float* o = out + t * H;
      for (int k = 0; k < top_k; ++k) {
        const float* src = y + row_of[t * top_k + k] * H;
        for (int64_t i = 0; i < H; ++i) o[i] += src[i];
      }
    }
  }
  errors.rethrow();
}

}  // namespace corral::cpu
