#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <omp.h>

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
  // A routed expert with at most kStreamRows rows streams its [in, out] matrices row by row in
  // k-chunks (stream_chunk), whose partial sums are added in chunk order. With few such experts,
  // the chunks are work items of their own (so that one expert keeps every thread busy), their
  // partials kept until all are done: gate's and up's side by side in gu_partials, down's in
  // down_partials. With many, each expert is one work item (whole_expert). The others run as panels.
  bool stream = false;
  MatrixRef gate_up;  // a routed expert's gate and up side by side, as stored: [in, 2 x width]
  float* gu_partials = nullptr;
  float* down_partials = nullptr;
};

// A tile of work: rows [r0, r0 + m) and output columns [c0, c0 + n) of one MLP's projection.
struct Tile {
  int32_t mlp;
  int32_t m, n;
  int64_t r0, c0;
};

// A k-chunk of a streamed MLP's gate and up (up_chunks) or down (down_chunks).
struct Chunk {
  int32_t mlp;
  int32_t chunk;
};

// Floats per vector at the widest ISA level (AVX-512).
constexpr int64_t kWidestVector = 16;
// Streamed experts per thread from which each one is a work item of its own.
constexpr int kWholeExpertsPerThread = 2;

void add_chunks_of(int32_t mlp, const MatrixRef& w, std::vector<Chunk>& out) {
  for (int64_t c = 0; c < k_chunks(w); ++c) out.push_back({mlp, int32_t(c)});
}

// Work items of a phase: streamed chunks (memory-bound) spread evenly among panel tiles (compute-
// bound with many rows), so that the threads overlap the two. index >= 0: a chunk; < 0: tile ~index.
std::vector<int32_t> interleave(size_t chunks, size_t tiles) {
  std::vector<int32_t> out;
  size_t c = 0, t = 0;
  while (c < chunks || t < tiles) {
    // Keep the share of chunks issued in step with the share of tiles issued.
    if (c < chunks && (t == tiles || (c + 1) * tiles <= (t + 1) * chunks)) out.push_back(int32_t(c++));
    else out.push_back(~int32_t(t++));
  }
  return out;
}

// Expert e's [in, out] slice of a fused [experts, in, out] tensor, columns [c0, c0 + n).
MatrixRef expert_columns(const void* base, DType dtype, int64_t e, int64_t in, int64_t out, int64_t c0, int64_t n) {
  const char* p = static_cast<const char*>(base) + (e * in * out + c0) * int64_t(dtype_size(dtype));
  return MatrixRef{p, dtype, WeightLayout::InOut, in, n, out};
}

float swiglu(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }

// A streamed expert's h from its summed gate and up (gu: rows x 2I, gate then up).
void swiglu_rows(const Mlp& m, const float* gu, int64_t I) {
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < I; ++c) m.h[r * I + c] = swiglu(gu[r * 2 * I + c], gu[r * 2 * I + I + c]);
}

// A streamed expert's k-chunk `chunk` of gate and up, side by side into partial (rows 2I apart).
// Whole rows of gate_up stream contiguously when the width is a whole number of vectors: each
// column then falls in the same vector (or tail) as when gate and up run apart, as the panels run
// them, so the bits agree.
void stream_gate_up_chunk(float* partial, const Mlp& m, int64_t H, int64_t I, int64_t chunk) {
  if (I % kWidestVector == 0) return stream_chunk(partial, 2 * I, m.x, H, m.rows, m.gate_up, chunk);
  stream_chunk(partial, 2 * I, m.x, H, m.rows, m.gate, chunk);
  stream_chunk(partial + I, 2 * I, m.x, H, m.rows, m.up, chunk);
}

// A streamed expert's whole MLP as one work item: each k-chunk's partial sums go to `part` and are
// added to the running sum in chunk order, as add_chunks adds them (gu: rows x 2I; part: rows x
// max(2I, H)).
void whole_expert(const Mlp& m, int64_t H, int64_t I, float* gu, float* part) {
  for (int64_t c = 0; c < k_chunks(m.gate); ++c) {
    stream_gate_up_chunk(c == 0 ? gu : part, m, H, I, c);
    for (int64_t i = 0; c > 0 && i < m.rows * 2 * I; ++i) gu[i] += part[i];
  }
  swiglu_rows(m, gu, I);
  for (int64_t c = 0; c < k_chunks(m.down); ++c) {
    stream_chunk(c == 0 ? m.y : part, H, m.h, I, m.rows, m.down, c);
    for (int64_t i = 0; c > 0 && i < m.rows * H; ++i) m.y[i] += part[i];
  }
}

// Everything the parallel phases need, decided once the router has run: the permutation of
// (token, k) pairs into expert-contiguous rows, the MLPs and their work items.
struct Plan {
  int64_t R = 0;                     // routed rows: tokens x top_k
  std::vector<float> score;          // [R] by pair (token * top_k + k)
  std::vector<int64_t> row_of, pair_of;
  float *xs, *h, *y;                 // in the calling thread's scratch (see cpu::scratch)
  std::vector<Mlp> mlps;             // routed experts with tokens, then the shared expert
  std::vector<Tile> up_tiles, down_tiles;
  std::vector<Chunk> up_chunks, down_chunks;
  std::vector<int32_t> up_work, down_work;  // see interleave()
  std::vector<int32_t> streamed;
  bool whole_experts = false;  // streamed experts run one per work item (up_work indexes streamed)

  Plan(const float* logits, const float* x, int64_t T, const MoeWeights& w, int top_k, int64_t* expert_tokens) {
    const int64_t E = w.num_experts, H = w.hidden, I = w.inter;
    R = T * top_k;
    // Each token's top_k experts by logit (ties: the lower id) and their sigmoid scores.
    std::vector<int32_t> chosen(R), order(E);
    score.resize(R);
    for (int64_t t = 0; t < T; ++t) {
      const float* l = logits + t * E;
      for (int64_t e = 0; e < E; ++e) order[e] = int32_t(e);
      std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                        [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
      for (int k = 0; k < top_k; ++k) {
        chosen[t * top_k + k] = order[k];
        score[t * top_k + k] = 1.0f / (1.0f + std::exp(-l[order[k]]));
      }
    }
    // Counting sort of the pairs: each expert's rows contiguous.
    std::vector<int64_t> start(E + 1, 0);
    for (int32_t e : chosen) ++start[e + 1];
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    row_of.resize(R);
    pair_of.resize(R);
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < R; ++p) {
      row_of[p] = fill[chosen[p]]++;
      pair_of[row_of[p]] = p;
    }
    if (expert_tokens)
      for (int64_t e = 0; e < E; ++e) expert_tokens[e] += start[e + 1] - start[e];

    // Rows of every MLP in one buffer: routed rows (expert by expert), then the shared expert's.
    const int64_t Is = w.shared_gate.out;  // the shared expert's width (Llama 4: also I)
    xs = scratch(0, R * H);
    h = scratch(1, R * I + T * Is);
    y = scratch(2, (R + T) * H);
    int64_t partial_floats = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = start[e + 1] - start[e];
      if (n == 0) continue;  // an expert without tokens costs nothing
      const int64_t r = start[e];
      Mlp m{expert_columns(w.gate_up, w.experts_dtype, e, H, 2 * I, 0, I),
            expert_columns(w.gate_up, w.experts_dtype, e, H, 2 * I, I, I),
            expert_columns(w.down, w.experts_dtype, e, I, H, 0, H), xs + r * H, n, h + r * I, y + r * H};
      m.stream = n <= kStreamRows;
      m.gate_up = expert_columns(w.gate_up, w.experts_dtype, e, H, 2 * I, 0, 2 * I);
      if (m.stream) partial_floats += n * (k_chunks(m.gate) * 2 * I + k_chunks(m.down) * H);
      mlps.push_back(m);
    }
    mlps.push_back({w.shared_gate, w.shared_up, w.shared_down, x, T, h + R * I, y + R * H});
    // Many streamed experts: one work item each, their partials in cache rather than in memory.
    int64_t streamed_experts = 0;
    for (const Mlp& m : mlps) streamed_experts += m.stream;
    whole_experts = streamed_experts >= kWholeExpertsPerThread * omp_get_num_threads();  // (in the parallel region)
    if (whole_experts) partial_floats = 0;
    float* partials = scratch(3, partial_floats);
    for (size_t i = 0; i < mlps.size(); ++i) {
      Mlp& m = mlps[i];
      if (!m.stream) {
        add_tiles(int32_t(i), m.gate, up_tiles);
        add_tiles(int32_t(i), m.down, down_tiles);
        continue;
      }
      streamed.push_back(int32_t(i));
      if (whole_experts) continue;
      m.gu_partials = partials;
      partials += m.rows * k_chunks(m.gate) * 2 * I;
      m.down_partials = partials;
      partials += m.rows * k_chunks(m.down) * H;
      add_chunks_of(int32_t(i), m.gate, up_chunks);
      add_chunks_of(int32_t(i), m.down, down_chunks);
    }
    up_work = interleave(whole_experts ? streamed.size() : up_chunks.size(), up_tiles.size());
    down_work = interleave(down_chunks.size(), down_tiles.size());
  }

  void add_tiles(int32_t i, const MatrixRef& w, std::vector<Tile>& out) const {
    const int64_t panel = panel_width(w);
    for (int64_t c0 = 0; c0 < w.out; c0 += panel)
      for (int64_t r0 = 0; r0 < mlps[i].rows; r0 += kRowBlock)
        out.push_back({i, int32_t(std::min(kRowBlock, mlps[i].rows - r0)), int32_t(std::min(panel, w.out - c0)), r0, c0});
  }
};

}  // namespace

void moe(float* out, const float* x, int64_t tokens, const MoeWeights& w, int top_k,
         int64_t* expert_tokens) {
  const int64_t E = w.num_experts, H = w.hidden, I = w.inter, T = tokens;
  if (top_k < 1 || top_k > E)
    throw InvalidInputError("moe: top_k " + std::to_string(top_k) + " must be in [1, " + std::to_string(E) + "]");
  for (const MatrixRef* m : {&w.router, &w.shared_gate, &w.shared_up, &w.shared_down}) float_index(m->dtype, "MoE weight");
  float_index(w.experts_dtype, "MoE experts");
  if (T <= 0) return;

  std::vector<float> logits(T * E);
  std::unique_ptr<Plan> plan;
  const int64_t router_panels = (E + panel_width(w.router) - 1) / panel_width(w.router);
  const int64_t row_blocks = (T + kRowBlock - 1) / kRowBlock;

  // One parallel region: router; plan; gate and up with SwiGLU; down; combine. Experts with many
  // rows run as panels of output columns, the others stream their weights in k-chunks.
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < router_panels * row_blocks; ++i) {
      const int64_t c0 = (i / row_blocks) * panel_width(w.router), r0 = (i % row_blocks) * kRowBlock;
      gemm_panel(logits.data() + r0 * E + c0, E, x + r0 * H, H, std::min(kRowBlock, T - r0), w.router, c0,
                 std::min(panel_width(w.router), E - c0), false);
    }
#pragma omp single
    plan = std::make_unique<Plan>(logits.data(), x, T, w, top_k, expert_tokens);
    Plan& p = *plan;

    // The routed rows' inputs: x scaled by the router score (Llama 4 scales the expert input).
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.R; ++r) {
      const int64_t pair = p.pair_of[r];
      const float* src = x + (pair / top_k) * H;
      for (int64_t i = 0; i < H; ++i) p.xs[r * H + i] = src[i] * p.score[pair];
    }
    std::vector<float> g(kRowBlock * 256), u(kRowBlock * 256);
    // This thread's buffers for streamed experts (the calling thread's slots 0-3 hold the plan's).
    float* gu = scratch(4, kStreamRows * 2 * I);
    float* part = p.whole_experts ? scratch(5, kStreamRows * std::max(2 * I, H)) : nullptr;
#pragma omp for schedule(dynamic, 1)
    for (size_t w = 0; w < p.up_work.size(); ++w) {
      if (p.up_work[w] >= 0 && p.whole_experts) {
        whole_expert(p.mlps[p.streamed[p.up_work[w]]], H, I, gu, part);
        continue;
      }
      if (p.up_work[w] >= 0) {
        const Chunk& c = p.up_chunks[p.up_work[w]];
        const Mlp& m = p.mlps[c.mlp];
        stream_gate_up_chunk(m.gu_partials + c.chunk * m.rows * 2 * I, m, H, I, c.chunk);
        continue;
      }
      const Tile& t = p.up_tiles[~p.up_work[w]];
      const Mlp& m = p.mlps[t.mlp];
      const float* xr = m.x + t.r0 * H;
      gemm_panel(g.data(), t.n, xr, H, t.m, m.gate, t.c0, t.n, false);
      gemm_panel(u.data(), t.n, xr, H, t.m, m.up, t.c0, t.n, false);
      for (int64_t r = 0; r < t.m; ++r)  // SwiGLU on the tile while it is in cache
        for (int64_t c = 0; c < t.n; ++c)
          m.h[(t.r0 + r) * m.gate.out + t.c0 + c] = swiglu(g[r * t.n + c], u[r * t.n + c]);
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < (p.whole_experts ? 0 : p.streamed.size()); ++i) {
      const Mlp& m = p.mlps[p.streamed[i]];
      add_chunks(gu, 2 * I, m.gu_partials, 2 * I, m.rows * 2 * I, k_chunks(m.gate), m.rows, 0, 2 * I, false);
      swiglu_rows(m, gu, I);
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t w = 0; w < p.down_work.size(); ++w) {
      if (p.down_work[w] >= 0) {
        const Chunk& c = p.down_chunks[p.down_work[w]];
        const Mlp& m = p.mlps[c.mlp];
        stream_chunk(m.down_partials + c.chunk * m.rows * H, H, m.h, I, m.rows, m.down, c.chunk);
        continue;
      }
      const Tile& t = p.down_tiles[~p.down_work[w]];
      const Mlp& m = p.mlps[t.mlp];
      gemm_panel(m.y + t.r0 * H + t.c0, H, m.h + t.r0 * m.gate.out, m.gate.out, t.m, m.down, t.c0, t.n, false);
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < (p.whole_experts ? 0 : p.streamed.size()); ++i) {
      const Mlp& m = p.mlps[p.streamed[i]];
      add_chunks(m.y, H, m.down_partials, H, m.rows * H, k_chunks(m.down), m.rows, 0, H, false);
    }
    // Back to token order: out += shared + the routed outputs, in k order.
#pragma omp for schedule(static)
    for (int64_t tok = 0; tok < T; ++tok) {
      float* o = out + tok * H;
      const float* shared = p.y + (p.R + tok) * H;
      for (int64_t i = 0; i < H; ++i) {
        float sum = shared[i];
        for (int k = 0; k < top_k; ++k) sum += p.y[p.row_of[tok * top_k + k] * H + i];
        o[i] += sum;
      }
    }
  }
}

}  // namespace corral::cpu
