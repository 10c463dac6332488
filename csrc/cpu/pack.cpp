// Repacking weights at load into the layout the CPU products read (see simd/gemm.h): panels of
// kPanelCols output columns, each contiguous, k in steps of P (2 for bfloat16) per column.
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "corral/error.h"
#include "corral/kernels/moe.h"
#include "isa.h"
#include "ops.h"

namespace corral::cpu {

namespace {

constexpr int64_t kGluHalf = kPanelCols / 2;

void check_source(const MatrixRef& w, const char* what) {
  float_index(w.dtype, what);
  if (w.packed()) throw InvalidInputError(std::string(what) + ": already packed");
  if (w.in < 1 || w.out < 1)
    throw ShapeError(std::string(what) + ": a weight matrix needs in, out >= 1 (got " + std::to_string(w.in) + ", " +
                     std::to_string(w.out) + ")");
}

// Element (k, col) of a source matrix, as raw bits of E bytes.
template <class E>
E element(const MatrixRef& w, int64_t k, int64_t col) {
  const E* d = static_cast<const E*>(w.data);
  return w.layout == WeightLayout::OutIn ? d[col * w.row_stride() + k] : d[k * w.row_stride() + col];
}

// Writes panels [0, panels): lane c of panel p holds column col_of(p, c) of source_of(c), or
// zeros where col_of says -1 (columns past the end).
template <class E, class Source, class Col>
void pack_panels(void* dst, DType dtype, int64_t in, int64_t panels, Source source_of, Col col_of) {
  const int64_t p = step_of(dtype), pb = panel_bytes(dtype, in);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t q = 0; q < panels; ++q) {
    E* out = reinterpret_cast<E*>(static_cast<char*>(dst) + q * pb);
    std::memset(out, 0, size_t(pb));
    for (int64_t c = 0; c < kPanelCols; ++c) {
      const int64_t col = col_of(q, c);
      if (col < 0) continue;
      const MatrixRef& src = source_of(c);
      for (int64_t k = 0; k < in; ++k) out[(k / p) * kPanelCols * p + c * p + k % p] = element<E>(src, k, col);
    }
  }
}

template <class Source, class Col>
void pack_any(void* dst, DType dtype, int64_t in, int64_t panels, Source source_of, Col col_of) {
  if (dtype_size(dtype) == 4) pack_panels<uint32_t>(dst, dtype, in, panels, source_of, col_of);
  else pack_panels<uint16_t>(dst, dtype, in, panels, source_of, col_of);
}

}  // namespace

int64_t step_of(DType t) { return t == DType::BF16 ? 2 : 1; }

int64_t panel_bytes(DType t, int64_t in) {
  const int64_t p = step_of(t);
  return (in + p - 1) / p * p * kPanelCols * int64_t(dtype_size(t));
}

}  // namespace corral::cpu

namespace corral::kernels {

using cpu::kGluHalf;
using cpu::kPanelCols;

PackedStorage allocate_packed(int64_t bytes) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t size = (size_t(std::max<int64_t>(bytes, 1)) + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, size);
  if (!p) throw std::bad_alloc();
  madvise(p, size, MADV_HUGEPAGE);  // advice only: without transparent huge pages it changes nothing
  return PackedStorage(static_cast<char*>(p));
}

int64_t packed_bytes(const MatrixRef& w) {
  cpu::check_source(w, "pack_weights");
  return (w.out + kPanelCols - 1) / kPanelCols * cpu::panel_bytes(w.dtype, w.in);
}

MatrixRef pack_weights(void* dst, const MatrixRef& w) {
  const int64_t panels = packed_bytes(w) / cpu::panel_bytes(w.dtype, w.in);
  cpu::pack_any(
      dst, w.dtype, w.in, panels, [&](int64_t) -> const MatrixRef& { return w; },
      [&](int64_t q, int64_t c) { return q * kPanelCols + c < w.out ? q * kPanelCols + c : -1; });
  return MatrixRef{dst, w.dtype, WeightLayout::Packed, w.in, w.out, 0};
}

int64_t packed_glu_bytes(const MatrixRef& gate) {
  cpu::check_source(gate, "pack_glu");
  return (gate.out + kGluHalf - 1) / kGluHalf * cpu::panel_bytes(gate.dtype, gate.in);
}

MatrixRef pack_glu(void* dst, const MatrixRef& gate, const MatrixRef& up) {
  cpu::check_source(up, "pack_glu");
  if (up.in != gate.in || up.out != gate.out || up.dtype != gate.dtype)
    throw ShapeError("pack_glu: gate and up must have one shape and dtype");
  const int64_t panels = packed_glu_bytes(gate) / cpu::panel_bytes(gate.dtype, gate.in), I = gate.out;
  cpu::pack_any(
      dst, gate.dtype, gate.in, panels, [&](int64_t c) -> const MatrixRef& { return c < kGluHalf ? gate : up; },
      [&](int64_t q, int64_t c) { return q * kGluHalf + c % kGluHalf < I ? q * kGluHalf + c % kGluHalf : -1; });
  return MatrixRef{dst, gate.dtype, WeightLayout::PackedGlu, gate.in, 2 * I, 0};
}

namespace {

// Expert e's gate, up and down as matrices of the checkpoint's fused tensors.
MatrixRef expert_matrix(const void* base, DType t, int64_t e, int64_t in, int64_t width, int64_t c0, int64_t n) {
  const char* p = static_cast<const char*>(base) + (e * in * width + c0) * int64_t(dtype_size(t));
  return MatrixRef{p, t, WeightLayout::InOut, in, n, width};
}

}  // namespace

int64_t packed_moe_bytes(const MoeWeights& w) {
  const int64_t E = w.num_experts, H = w.hidden, I = w.inter;
  if (w.experts_layout != WeightLayout::InOut)
    throw InvalidInputError("pack_moe: the experts must be the checkpoint's fused [in, out] tensors");
  const MatrixRef gate = expert_matrix(w.gate_up, w.experts_dtype, 0, H, 2 * I, 0, I);
  const MatrixRef down = expert_matrix(w.down, w.experts_dtype, 0, I, H, 0, H);
  return (packed_bytes(w.router)) + E * (packed_glu_bytes(gate)) +
         E * (packed_bytes(down)) + (packed_glu_bytes(w.shared_gate)) +
         (packed_bytes(w.shared_down));
}

MoeWeights pack_moe(void* dst, const MoeWeights& w) {
  const int64_t E = w.num_experts, H = w.hidden, I = w.inter;
  packed_moe_bytes(w);  // checks
  char* at = static_cast<char*>(dst);
  const auto next = [&](int64_t bytes) {
    char* p = at;
    at += bytes;  // whole panels: multiples of 128 bytes
    return p;
  };
  MoeWeights p = w;
  p.experts_layout = WeightLayout::Packed;
  p.router = pack_weights(next(packed_bytes(w.router)), w.router);
  const auto gate = [&](int64_t e) { return expert_matrix(w.gate_up, w.experts_dtype, e, H, 2 * I, 0, I); };
  const auto up = [&](int64_t e) { return expert_matrix(w.gate_up, w.experts_dtype, e, H, 2 * I, I, I); };
  const auto down = [&](int64_t e) { return expert_matrix(w.down, w.experts_dtype, e, I, H, 0, H); };
  p.gate_up = at;
  for (int64_t e = 0; e < E; ++e) pack_glu(next(packed_glu_bytes(gate(e))), gate(e), up(e));
  p.down = at;
  for (int64_t e = 0; e < E; ++e) pack_weights(next(packed_bytes(down(e))), down(e));
  p.shared_gate = pack_glu(next(packed_glu_bytes(w.shared_gate)), w.shared_gate, w.shared_up);
  p.shared_up = MatrixRef{};
  p.shared_down = pack_weights(next(packed_bytes(w.shared_down)), w.shared_down);
  return p;
}

}  // namespace corral::kernels
