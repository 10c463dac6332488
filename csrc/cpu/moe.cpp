#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "corral/error.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {

// One SwiGLU MLP applied to a set of rows: a routed expert (its tokens, gathered and scaled by
// their router scores) or the shared expert (every token).
struct Mlp {
  MatrixRef gate, up, down;
  const float* x;  // [rows, hidden]
  int64_t rows;
  float* h;  // [rows, gate.out]: silu(x . gate) * (x . up)
  float* y;  // [rows, hidden]: h . down
  // A routed expert with at most kStreamRows rows streams its [in, out] matrices row by row, in
  // k-chunks whose partial sums are added afterwards (see kKChunk): gate's and up's side by side
  // in gu_partials, down's in down_partials.
  bool stream = false;
  float* gu_partials = nullptr;
  float* down_partials = nullptr;
};

// A tile of work: rows [r0, r0 + m) and output columns [c0, c0 + n) of one MLP's projection.
struct Tile {
  int32_t mlp;
  int32_t m, n;
  int64_t r0, c0;
};

std::vector<Tile> tiles(const std::vector<Mlp>& mlps, bool down) {
  std::vector<Tile> out;
  for (size_t i = 0; i < mlps.size(); ++i) {
    if (mlps[i].stream) continue;
    const MatrixRef& w = down ? mlps[i].down : mlps[i].gate;
    const int64_t panel = panel_width(w);
    for (int64_t c0 = 0; c0 < w.out; c0 += panel)
      for (int64_t r0 = 0; r0 < mlps[i].rows; r0 += kRowBlock)
        out.push_back({int32_t(i), int32_t(std::min(kRowBlock, mlps[i].rows - r0)),
                       int32_t(std::min(panel, w.out - c0)), r0, c0});
  }
  return out;
}

// Expert e's [in, out] slice of a fused [experts, in, out] tensor, columns [c0, c0 + n).
MatrixRef expert_columns(const void* base, DType dtype, int64_t e, int64_t in, int64_t out, int64_t c0, int64_t n) {
  const char* p = static_cast<const char*>(base) + (e * in * out + c0) * int64_t(dtype_size(dtype));
  return MatrixRef{p, dtype, WeightLayout::InOut, in, n, out};
}

}  // namespace

void moe(float* out, const float* x, int64_t tokens, const MoeWeights& w, int top_k,
         int64_t* expert_tokens) {
  const int64_t E = w.num_experts, H = w.hidden, I = w.inter, T = tokens;
  if (top_k < 1 || top_k > E)
    throw InvalidInputError("moe: top_k " + std::to_string(top_k) + " must be in [1, " + std::to_string(E) + "]");
  for (const MatrixRef* m : {&w.router, &w.shared_gate, &w.shared_up, &w.shared_down}) float_index(m->dtype, "MoE weight");
  float_index(w.experts_dtype, "MoE experts");
  if (T <= 0) return;

  // Router: logits, each token's top_k experts (ties: the lower id) and their sigmoid scores.
  std::vector<float> logits(T * E);
  linear(logits.data(), E, x, H, T, w.router, false);
  std::vector<int32_t> chosen(T * top_k);
  std::vector<float> score(T * top_k);
  std::vector<int32_t> order(E);
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

  // Counting sort of the (token, k) pairs: each expert's rows contiguous, row_of[pair] its row.
  const int64_t R = T * top_k;
  std::vector<int64_t> start(E + 1, 0);
  for (int32_t e : chosen) ++start[e + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> row_of(R), pair_of(R);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < R; ++p) {
      row_of[p] = fill[chosen[p]]++;
      pair_of[row_of[p]] = p;
    }
  }
  if (expert_tokens)
    for (int64_t e = 0; e < E; ++e) expert_tokens[e] += start[e + 1] - start[e];

  // Rows of every MLP in one buffer: routed rows (expert by expert), then the shared expert's.
  const int64_t Is = w.shared_gate.out;  // the shared expert's width (Llama 4: also I)
  std::vector<float> xs(R * H), h(R * I + T * Is), y((R + T) * H);
  std::vector<Mlp> mlps;
  int64_t partial_floats = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (n == 0) continue;  // an expert without tokens costs nothing
    const int64_t r = start[e];
    Mlp m{expert_columns(w.gate_up, w.experts_dtype, e, H, 2 * I, 0, I),
          expert_columns(w.gate_up, w.experts_dtype, e, H, 2 * I, I, I),
          expert_columns(w.down, w.experts_dtype, e, I, H, 0, H), xs.data() + r * H, n,
          h.data() + r * I, y.data() + r * H};
    m.stream = n <= kStreamRows;
    if (m.stream) partial_floats += n * (k_chunks(m.gate) * 2 * I + k_chunks(m.down) * H);
    mlps.push_back(m);
  }
  mlps.push_back({w.shared_gate, w.shared_up, w.shared_down, x, T, h.data() + R * I, y.data() + R * H});
  std::vector<float> partials(partial_floats, 0.f);
  struct Chunk {
    int32_t mlp;
    int32_t chunk;
  };
  std::vector<Chunk> gu_chunks, down_chunks;
  std::vector<int32_t> streamed;
  for (size_t i = 0, at = 0; i < mlps.size(); ++i) {
    Mlp& m = mlps[i];
    if (!m.stream) continue;
    streamed.push_back(int32_t(i));
    m.gu_partials = partials.data() + at;
    at += m.rows * k_chunks(m.gate) * 2 * I;
    m.down_partials = partials.data() + at;
    at += m.rows * k_chunks(m.down) * H;
    for (int64_t c = 0; c < k_chunks(m.gate); ++c) gu_chunks.push_back({int32_t(i), int32_t(c)});
    for (int64_t c = 0; c < k_chunks(m.down); ++c) down_chunks.push_back({int32_t(i), int32_t(c)});
  }
  const std::vector<Tile> up_tiles = tiles(mlps, false), down_tiles = tiles(mlps, true);
  auto swiglu = [](float g, float u) { return g / (1.0f + std::exp(-g)) * u; };

  // One parallel region: gate and up with SwiGLU; down; combine. Experts with many rows run as
  // panels of output columns, the others stream their weights in k-chunks.
#pragma omp parallel
  {
    // The routed rows' inputs: x scaled by the router score (Llama 4 scales the expert input).
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t p = pair_of[r];
      const float* src = x + (p / top_k) * H;
      for (int64_t i = 0; i < H; ++i) xs[r * H + i] = src[i] * score[p];
    }
    std::vector<float> g(kRowBlock * 64), u(kRowBlock * 64), gu(kStreamRows * 2 * I);
#pragma omp for schedule(dynamic, 1) nowait
    for (size_t i = 0; i < up_tiles.size(); ++i) {
      const Tile& t = up_tiles[i];
      const Mlp& m = mlps[t.mlp];
      const float* xr = m.x + t.r0 * H;
      gemm_panel(g.data(), t.n, xr, H, t.m, m.gate, t.c0, t.n, false);
      gemm_panel(u.data(), t.n, xr, H, t.m, m.up, t.c0, t.n, false);
      for (int64_t r = 0; r < t.m; ++r)  // SwiGLU on the tile while it is in cache
        for (int64_t c = 0; c < t.n; ++c)
          m.h[(t.r0 + r) * m.gate.out + t.c0 + c] = swiglu(g[r * t.n + c], u[r * t.n + c]);
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < gu_chunks.size(); ++i) {
      // Gate and up apart, as the panels do them: vectors and tails fall on the same columns.
      const Mlp& m = mlps[gu_chunks[i].mlp];
      float* partial = m.gu_partials + gu_chunks[i].chunk * m.rows * 2 * I;
      stream_chunk(partial, 2 * I, m.x, H, m.rows, m.gate, gu_chunks[i].chunk);
      stream_chunk(partial + I, 2 * I, m.x, H, m.rows, m.up, gu_chunks[i].chunk);
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < streamed.size(); ++i) {
      const Mlp& m = mlps[streamed[i]];
      add_chunks(gu.data(), 2 * I, m.gu_partials, m.rows * 2 * I, k_chunks(m.gate), m.rows, 2 * I, 0, 2 * I, false);
      for (int64_t r = 0; r < m.rows; ++r)
        for (int64_t c = 0; c < I; ++c) m.h[r * I + c] = swiglu(gu[r * 2 * I + c], gu[r * 2 * I + I + c]);
    }
#pragma omp for schedule(dynamic, 1) nowait
    for (size_t i = 0; i < down_tiles.size(); ++i) {
      const Tile& t = down_tiles[i];
      const Mlp& m = mlps[t.mlp];
      gemm_panel(m.y + t.r0 * H + t.c0, H, m.h + t.r0 * m.gate.out, m.gate.out, t.m, m.down, t.c0, t.n, false);
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < down_chunks.size(); ++i) {
      const Mlp& m = mlps[down_chunks[i].mlp];
      stream_chunk(m.down_partials + down_chunks[i].chunk * m.rows * H, H, m.h, I, m.rows, m.down,
                   down_chunks[i].chunk);
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < streamed.size(); ++i) {
      const Mlp& m = mlps[streamed[i]];
      add_chunks(m.y, H, m.down_partials, m.rows * H, k_chunks(m.down), m.rows, H, 0, H, false);
    }
    // Back to token order: out += shared + the routed outputs, in k order.
#pragma omp for schedule(static)
    for (int64_t tok = 0; tok < T; ++tok) {
      float* o = out + tok * H;
      const float* shared = y.data() + (R + tok) * H;
      for (int64_t i = 0; i < H; ++i) {
        float sum = shared[i];
        for (int k = 0; k < top_k; ++k) sum += y[row_of[tok * top_k + k] * H + i];
        o[i] += sum;
      }
    }
  }
}

}  // namespace corral::cpu
