// The fused MoE op on CUDA (contract: corral/kernels/moe.h). Everything runs on the stream with
// no host round trip:
//   1. router logits (float32, CUDA cores), top-k per token with sigmoid scores, histogram;
//   2. prefix sums and a scatter that make each expert's (token, k) rows contiguous, each row
//      score * x[t] (the score scales the expert's input), plus the shared expert's rows x[t];
//   3. one grouped launch for gate + up of every expert with rows and of the shared expert, SwiGLU
//      in the epilogue;
//   4. one grouped launch for the down projections;
//   5. out[t] += shared[t] + the token's routed rows, summed in k order (deterministic).
// Quantized experts (experts_layout Packed: the CPU's packed matrices, quantized_product.cuh) take
// steps 3 and 4 as quantized grouped products on float32 rows (activations quantized per block
// first for int8 / int4 codes), and the shared expert runs through swiglu_mlp on x, whatever its
// format (shared_gate: its gate and up as swiglu_mlp reads them, shared_up unused).
// Products (grouped_product.cuh): tensor cores (wmma, float32 accumulation) for bfloat16 /
// float16 weights, CUDA cores in float32 for float32 weights, and for decode (at most kDecodePairs
// (token, k) pairs) a GEMV that streams each active expert's weights once. Experts without tokens
// get no work. Scratch memory comes from cudaMallocAsync on the stream.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "check.h"
#include "corral/error.h"
#include "corral/kernels/moe.h"
#include "grouped_product.cuh"
#include "moe_route.cuh"
#include "ops.h"
#include "quantized_product.cuh"
#include "scratch.h"

namespace corral::cuda {

namespace {

using namespace moe_detail;

// Up to this many (token, k) pairs the products run as GEMVs (decode).
constexpr int64_t kDecodePairs = kMaxGemvRows;

DType check_float(DType t, const char* what) {
  if (t != DType::F32 && t != DType::BF16 && t != DType::F16)
    throw DTypeError(std::string("moe ") + what + ": dtype " + dtype_name(t) + " is not supported on CUDA");
  return t;
}

}  // namespace

void moe(void* stream, float* out, const float* x, int64_t tokens, const MoeWeights& w, int top_k,
         int64_t* expert_tokens) {
  const int64_t E = w.num_experts, H = w.hidden, I = w.inter;
  if (top_k < 1 || top_k > E)
    throw InvalidInputError("moe: top_k " + std::to_string(top_k) + " must be in [1, " + std::to_string(E) + "]");
  if (H < 1 || I < 1 || E > kMaxRows)
    throw ShapeError("moe: hidden, inter and experts must be positive (hidden " + std::to_string(H) + ", inter " +
                     std::to_string(I) + ", experts " + std::to_string(E) + ")");
  const bool quantized = w.experts_layout == WeightLayout::Packed;
  if ((w.experts_layout != WeightLayout::InOut && !quantized) || w.router.packed())
    throw NotSupportedError("moe: CUDA reads the router unpacked, and the experts as the checkpoint's fused tensors "
                            "(InOut) or packed quantized (Packed)");
  check_float(w.router.dtype, "router");
  if (w.router.in != H || w.router.out != E)
    throw ShapeError("moe: router must be (experts, hidden) = (" + std::to_string(E) + ", " + std::to_string(H) + ")");
  if (!w.router.data || !w.gate_up || !w.down || !w.shared_gate.data || !w.shared_down.data)
    throw InvalidInputError("moe: a weight pointer is null");
  if (quantized && (!w.gate_up_quant.group || !w.down_quant.group))
    throw NotSupportedError("moe: packed experts on CUDA must be quantized (gate_up_quant, down_quant); float "
                            "experts are read as the checkpoint's fused tensors (InOut)");
  // Quantized experts: their kinds (gate_up, down); the shared expert is swiglu_mlp's to check.
  const int kind_gu = quantized ? quant::checked_kind(MatrixRef{w.gate_up, w.experts_dtype, WeightLayout::PackedGlu,
                                                                H, 2 * I, 0, w.gate_up_quant},
                                                      WeightLayout::PackedGlu, "moe gate_up")
                                : -1;
  const int kind_dn = quantized ? quant::checked_kind(MatrixRef{w.down, w.experts_dtype, WeightLayout::Packed, I, H, 0,
                                                                w.down_quant},
                                                      WeightLayout::Packed, "moe down")
                                : -1;
  const DType wt = quantized ? DType::F32 : check_float(w.experts_dtype, "experts");
  const DType st = quantized ? DType::F32 : check_float(w.shared_gate.dtype, "shared expert");
  const int64_t Is = quantized ? 0 : w.shared_gate.out;
  if (!quantized) {
    if (w.shared_up.dtype != st || w.shared_down.dtype != st)
      throw DTypeError("moe: the shared expert's gate, up and down must have one dtype on CUDA");
    if (Is < 1 || w.shared_gate.in != H || w.shared_up.in != H || w.shared_up.out != Is || w.shared_down.in != Is ||
        w.shared_down.out != H)
      throw ShapeError("moe: the shared expert must be gate and up (I, hidden), down (hidden, I)");
    if (w.shared_gate.packed() || w.shared_down.packed() || w.shared_gate.layout != w.shared_up.layout ||
        w.shared_gate.row_stride() != w.shared_up.row_stride())
      throw NotSupportedError("moe: the shared expert's gate and up must be unpacked, of one layout and row stride");
    if (!w.shared_up.data) throw InvalidInputError("moe: a weight pointer is null");
  }
  if (tokens <= 0) return;
  if (!out || !x) throw InvalidInputError("moe: x and out must not be null");
  const int64_t T = tokens, P = tokens * top_k;
  if (T > kMaxRows || P + T > kMaxRows)
    throw ShapeError("moe: " + std::to_string(T) + " tokens x top_k " + std::to_string(top_k) +
                     " are too many for one CUDA call");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);

  // How each side's products run, and the dtype of their activations (A operands and hidden rows).
  const bool decode = P <= kDecodePairs;
  auto path_of = [&](DType t) { return decode ? Path::Gemv : t == DType::F32 ? Path::CudaCore : Path::TensorCore; };
  const Path path_r = path_of(wt), path_s = path_of(st);
  const DType act_r = path_r == Path::TensorCore ? wt : DType::F32;
  const DType act_s = path_s == Path::TensorCore ? st : DType::F32;
  // Activation rows are zero-padded to a multiple of 8 elements (16-byte pieces, float4 reads).
  const int64_t Hp = round_up(H, 8), Ip = round_up(I, 8), Isp = round_up(Is, 8);
  // Quantized experts: no shared rows (swiglu_mlp reads x), records of the routed rows.
  const int64_t shared_rows = quantized ? 0 : T;
  const int64_t rec_gu = quantized ? quant::prepared_bytes(kind_gu, w.gate_up_quant, H) : 0;
  const int64_t rec_dn = quantized ? quant::prepared_bytes(kind_dn, w.down_quant, I) : 0;

  Scratch sc(s);
  const size_t o_logits = sc.reserve(size_t(T) * E * 4), o_chosen = sc.reserve(size_t(P) * 4),
               o_score = sc.reserve(size_t(P) * 4), o_pair_row = sc.reserve(size_t(P) * 4),
               o_counts = sc.reserve(size_t(E) * 4), o_row_start = sc.reserve(size_t(E + 1) * 4),
               o_tile_start = sc.reserve(size_t(E + 1) * 4), o_active = sc.reserve(size_t(E) * 4),
               o_num_active = sc.reserve(4), o_cursor = sc.reserve(size_t(E) * 4),
               o_xs_r = sc.reserve(size_t(P) * Hp * dtype_size(act_r)),
               o_xs_s = sc.reserve(size_t(shared_rows) * Hp * dtype_size(act_s)),
               o_hid_r = sc.reserve(size_t(P) * Ip * dtype_size(act_r)),
               o_hid_s = sc.reserve(size_t(shared_rows) * Isp * dtype_size(act_s)),
               o_y_r = sc.reserve(size_t(P) * H * 4), o_y_s = sc.reserve(size_t(T) * H * 4),
               o_rec_gu = sc.reserve(size_t(P * rec_gu)), o_rec_dn = sc.reserve(size_t(P * rec_dn));
  sc.allocate();
  float* logits = sc.at<float>(o_logits);
  int* chosen = sc.at<int>(o_chosen);
  float* score = sc.at<float>(o_score);
  int* pair_row = sc.at<int>(o_pair_row);
  int* counts = sc.at<int>(o_counts);
  int* cursor = sc.at<int>(o_cursor);
  float* y_r = sc.at<float>(o_y_r);
  float* y_s = sc.at<float>(o_y_s);
  void* xs_r = sc.at<char>(o_xs_r);
  void* xs_s = sc.at<char>(o_xs_s);
  void* hid_r = sc.at<char>(o_hid_r);
  void* hid_s = sc.at<char>(o_hid_s);

  int* row_start = sc.at<int>(o_row_start);
  int* tile_start = sc.at<int>(o_tile_start);
  int* active = sc.at<int>(o_active);
  int* num_active = sc.at<int>(o_num_active);
  Groups g;
  g.row_start = row_start;
  g.tile_start = tile_start;
  g.active = active;
  g.num_active = num_active;
  g.num_experts = int(E);
  g.routed_slots = int(std::min(E, P));
  g.shared_rows = int(shared_rows);

  // 1. Router logits [T, E] in float32, as the shared-expert side of a product over all tokens: a
  // GEMV over chunks of 8 tokens (the router stays in L2) when x allows its float4 reads, else the
  // CUDA-core GEMM.
  {
    const bool gemv = aligned16(x) && H % 8 == 0 && ceil_div(T, kMaxGemvRows) <= 65535;
    CORRAL_CUDA_CHECK(cudaMemsetAsync(counts, 0, size_t(E) * sizeof(int), s));
    dense_product("moe", s, matrix_operand(x, H, w.router, logits, E, E, H), T, w.router.dtype,
                  gemv ? Path::Gemv : Path::CudaCore);
  }
  route_topk<<<unsigned(ceil_div(T, 8)), 256, 0, s>>>(logits, T, int(E), top_k, chosen, score, counts);
  CORRAL_CUDA_CHECK_LAUNCH();

  // 2. Expert-contiguous rows.
  const int scan_threads = int(std::min<int64_t>(1024, round_up(E, 32)));
  route_scan<<<1, scan_threads, 0, s>>>(counts, int(E), row_start, tile_start, active, num_active, cursor,
                                        expert_tokens);
  CORRAL_CUDA_CHECK_LAUNCH();
  route_gather<<<unsigned(P + shared_rows), 256, 0, s>>>(x, H, top_k, P, chosen, score, cursor, pair_row, xs_r, act_r, xs_s,
                                               act_s, Hp);
  CORRAL_CUDA_CHECK_LAUNCH();

  if (quantized) {
    // 3 and 4 on the quantized experts; no tile has more rows than there are pairs.
    const int64_t tiles = ceil_div(P, kTileM) + std::min(E, P), max_rows = std::min<int64_t>(P, kTileM);
    // C = rows . each expert's matrix (rows ld floats apart), the rows prepared into rec first.
    auto experts = [&](const void* rows, int64_t ld, char* rec, const void* m, int64_t stride, void* c, int64_t ldc,
                       int64_t n, int64_t k, int kind, const QuantInfo& q, bool glu) {
      const quant::Prepared a = quant::prepare(s, rec, static_cast<const float*>(rows), ld, P, k, kind, q);
      const quant::QuantOperand op{a.a, a.lda, m, stride, static_cast<float*>(c), ldc, n, k, q, 0};
      quant::launch(s, g, op, quant::QuantOperand{}, kind, glu, max_rows, tiles);
    };
    experts(xs_r, Hp, sc.at<char>(o_rec_gu), w.gate_up,
            kernels::packed_quantized_glu_bytes(w.experts_dtype, I, H, w.gate_up_quant), hid_r, Ip, I, H, kind_gu,
            w.gate_up_quant, true);
    experts(hid_r, Ip, sc.at<char>(o_rec_dn), w.down, kernels::packed_quantized_bytes(w.experts_dtype, H, I, w.down_quant),
            y_r, H, H, I, kind_dn, w.down_quant, false);
    CORRAL_CUDA_CHECK(cudaMemsetAsync(y_s, 0, size_t(T * H) * sizeof(float), s));
    swiglu_mlp(stream, y_s, x, T, w.shared_gate, w.shared_down, kernels::Activations::Native);
  } else {
    // 3 and 4. Gate + up (SwiGLU), then down; one launch each when both sides share a weight dtype.
    // No expert has more rows than there are tokens.
    auto run = [&](const Operand& r, const Operand& sh, bool swiglu) {
      Product p{"moe", s, g, r, sh, swiglu, P, T, E, gemv_rows_for(T)};
      if (wt == st) return launch(p, wt, path_r);
      Product pr = p, ps = p;
      pr.g.shared_rows = 0;
      ps.g.num_experts = 0;
      ps.g.routed_slots = 0;
      launch(pr, wt, path_r);
      launch(ps, st, path_s);
    };
    // Expert 0's gate: the first I columns of its [H, 2I] gate_up; up: the next I.
    Operand gu_r = matrix_operand(xs_r, Hp, MatrixRef{w.gate_up, wt, WeightLayout::InOut, H, I, 2 * I}, hid_r, Ip, I, H);
    gu_r.b1 = static_cast<const char*>(w.gate_up) + I * int64_t(dtype_size(wt));
    gu_r.b_stride = H * 2 * I;
    Operand gu_s = matrix_operand(xs_s, Hp, w.shared_gate, hid_s, Isp, Is, H);
    gu_s.b1 = w.shared_up.data;  // same layout and strides as the gate (checked above)
    run(gu_r, gu_s, true);

    Operand dn_r = matrix_operand(hid_r, Ip, MatrixRef{w.down, wt, WeightLayout::InOut, I, H}, y_r, H, H, I);
    dn_r.b_stride = I * H;
    run(dn_r, matrix_operand(hid_s, Isp, w.shared_down, y_s, H, H, Is), false);
  }
  // 5. out[t] += shared[t] + routed rows of t in k order.
  route_combine<<<unsigned(T), 256, 0, s>>>(out, y_r, y_s, pair_row, H, top_k);
  CORRAL_CUDA_CHECK_LAUNCH();
}

}  // namespace corral::cuda
