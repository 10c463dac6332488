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

int64_t float_panel_bytes(DType t, int64_t in) {
  const int64_t p = step_of(t);
  return (in + p - 1) / p * p * kPanelCols * int64_t(dtype_size(t));
}

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
  const int64_t i = w.layout == WeightLayout::OutIn ? col * w.row_stride() + k : k * w.row_stride() + col;
  E e;  // copied: a checkpoint's data section need not be aligned to E
  std::memcpy(&e, static_cast<const char*>(w.data) + i * int64_t(sizeof(E)), sizeof(E));
  return e;
}

// Writes panels [0, panels): lane c of panel p holds column col_of(p, c) of source_of(c), or
// zeros where col_of says -1 (columns past the end).
template <class E, class Source, class Col>
void pack_panels(void* dst, DType dtype, int64_t in, int64_t panels, Source source_of, Col col_of) {
  const int64_t p = step_of(dtype), pb = float_panel_bytes(dtype, in);
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

int64_t group_count(int64_t in, int64_t group) { return (in + group - 1) / group; }

void check_quantized(const QuantizedRows& w, DType scale_dtype, const char* what) {
  const std::string name = what;
  if (w.dtype != DType::I8 && w.dtype != DType::I4 && w.dtype != DType::F8_E4M3)
    throw DTypeError(name + ": quantized codes must be int8, int4 or float8_e4m3, not " + dtype_name(w.dtype));
  if (w.in < 1 || w.out < 1 || w.group < 1)
    throw ShapeError(name + ": a quantized matrix needs in, out, group >= 1");
  if (w.dtype != DType::F8_E4M3 && w.group % kQuantBlock != 0)
    throw ShapeError(name + ": integer groups must be multiples of " + std::to_string(kQuantBlock) + " (got " +
                     std::to_string(w.group) + ")");
  if (w.dtype == DType::F8_E4M3 && w.zero_points)
    throw InvalidInputError(name + ": fp8 weights have no zero points");
  if (scale_dtype != DType::F32 && scale_dtype != DType::BF16)
    throw DTypeError(name + ": scales are stored as float32 or bfloat16");
}

// The offset stored for row `row` in group g (see QuantInfo).
int offset_of(const QuantizedRows& w, int64_t row, int64_t g) {
  const int z = w.zero_points ? w.zero_points[row * group_count(w.in, w.group) + g] : 0;
  return w.dtype == DType::I4 ? z + 8 : z;
}

QuantInfo quant_info(const QuantizedRows& w, DType scale_dtype) {
  QuantInfo q;
  q.group = w.group;
  q.scale_dtype = scale_dtype;
  q.offsets = w.zero_points != nullptr;
  return q;
}

// Writes panels [0, panels) of quantized rows: lane c of panel p holds row row_of(p, c) of
// source_of(c), or zeros where row_of says -1.
template <class Source, class Row>
void pack_quantized_panels(void* dst, DType dtype, const QuantInfo& q, int64_t in, int64_t panels, Source source_of,
                           Row row_of) {
  const int64_t groups = group_count(in, q.group), gb = quant_group_bytes(dtype, q), header = quant_header_bytes(q);
  const int64_t ss = q.scale_dtype == DType::BF16 ? 2 : 4;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t p = 0; p < panels; ++p) {
    char* panel = static_cast<char*>(dst) + p * groups * gb;
    std::memset(panel, 0, size_t(groups * gb));
    for (int64_t c = 0; c < kPanelCols; ++c) {
      const int64_t row = row_of(p, c);
      if (row < 0) continue;
      const QuantizedRows& w = source_of(c);
      const int8_t* codes = w.codes + row * w.in;
      for (int64_t g = 0; g < groups; ++g) {
        char* grp = panel + g * gb;
        const float s = w.scales[row * groups + g];
        if (ss == 2) {
          const bf16 b = to_bf16(s);
          std::memcpy(grp + c * 2, &b, 2);
        } else {
          std::memcpy(grp + c * 4, &s, 4);
        }
        if (q.offsets) grp[header - kPanelCols + c] = int8_t(offset_of(w, row, g));
        char* out = grp + header;
        const int64_t k0 = g * q.group, kn = std::min(q.group, in - k0);
        for (int64_t i = 0; i < kn; ++i) {
          char& byte = out[quant_code_byte(dtype, i, c)];
          if (dtype == DType::I4) byte = char(uint8_t(byte) | uint8_t((codes[k0 + i] + 8) & 15) << (quant_high_nibble(i) ? 4 : 0));
          else byte = codes[k0 + i];
        }
      }
    }
  }
}

}  // namespace

int64_t step_of(DType t) { return t == DType::BF16 ? 2 : 1; }

int64_t quant_header_bytes(const QuantInfo& q) {
  return kPanelCols * (q.scale_dtype == DType::BF16 ? 2 : 4) + (q.offsets ? kPanelCols : 0);
}

int64_t quant_group_bytes(DType dtype, const QuantInfo& q) {
  return quant_header_bytes(q) + q.group * kPanelCols / (dtype == DType::I4 ? 2 : 1);
}

int64_t panel_bytes(const MatrixRef& w) {
  if (w.quantized()) return group_count(w.in, w.quant.group) * quant_group_bytes(w.dtype, w.quant);
  return float_panel_bytes(w.dtype, w.in);
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
  return (w.out + kPanelCols - 1) / kPanelCols * cpu::panel_bytes(w);
}

MatrixRef pack_weights(void* dst, const MatrixRef& w) {
  const int64_t panels = packed_bytes(w) / cpu::panel_bytes(w);
  cpu::pack_any(
      dst, w.dtype, w.in, panels, [&](int64_t) -> const MatrixRef& { return w; },
      [&](int64_t q, int64_t c) { return q * kPanelCols + c < w.out ? q * kPanelCols + c : -1; });
  return MatrixRef{dst, w.dtype, WeightLayout::Packed, w.in, w.out, 0};
}

int64_t packed_glu_bytes(const MatrixRef& gate) {
  cpu::check_source(gate, "pack_glu");
  return (gate.out + kGluHalf - 1) / kGluHalf * cpu::panel_bytes(gate);
}

MatrixRef pack_glu(void* dst, const MatrixRef& gate, const MatrixRef& up) {
  cpu::check_source(up, "pack_glu");
  if (up.in != gate.in || up.out != gate.out || up.dtype != gate.dtype)
    throw ShapeError("pack_glu: gate and up must have one shape and dtype");
  const int64_t panels = packed_glu_bytes(gate) / cpu::panel_bytes(gate), I = gate.out;
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

int64_t packed_quantized_bytes(DType dtype, int64_t out, int64_t in, const QuantInfo& q) {
  return (out + kPanelCols - 1) / kPanelCols * cpu::group_count(in, q.group) * cpu::quant_group_bytes(dtype, q);
}

int64_t packed_quantized_glu_bytes(DType dtype, int64_t out, int64_t in, const QuantInfo& q) {
  return (out + kGluHalf - 1) / kGluHalf * cpu::group_count(in, q.group) * cpu::quant_group_bytes(dtype, q);
}

int64_t packed_quantized_bytes(const QuantizedRows& w, DType scale_dtype) {
  cpu::check_quantized(w, scale_dtype, "pack_quantized");
  return packed_quantized_bytes(w.dtype, w.out, w.in, cpu::quant_info(w, scale_dtype));
}

MatrixRef pack_quantized(void* dst, const QuantizedRows& w, DType scale_dtype) {
  const int64_t panels = (w.out + kPanelCols - 1) / kPanelCols;
  packed_quantized_bytes(w, scale_dtype);  // checks
  const QuantInfo q = cpu::quant_info(w, scale_dtype);
  cpu::pack_quantized_panels(
      dst, w.dtype, q, w.in, panels, [&](int64_t) -> const QuantizedRows& { return w; },
      [&](int64_t p, int64_t c) { return p * kPanelCols + c < w.out ? p * kPanelCols + c : -1; });
  MatrixRef m{dst, w.dtype, WeightLayout::Packed, w.in, w.out, 0};
  m.quant = q;
  return m;
}

int64_t packed_quantized_glu_bytes(const QuantizedRows& gate, DType scale_dtype) {
  cpu::check_quantized(gate, scale_dtype, "pack_quantized_glu");
  return packed_quantized_glu_bytes(gate.dtype, gate.out, gate.in, cpu::quant_info(gate, scale_dtype));
}

MatrixRef pack_quantized_glu(void* dst, const QuantizedRows& gate, const QuantizedRows& up, DType scale_dtype) {
  cpu::check_quantized(up, scale_dtype, "pack_quantized_glu");
  if (up.in != gate.in || up.out != gate.out || up.dtype != gate.dtype || up.group != gate.group ||
      (up.zero_points == nullptr) != (gate.zero_points == nullptr))
    throw ShapeError("pack_quantized_glu: gate and up must have one shape, dtype, group and symmetry");
  const int64_t I = gate.out, panels = (I + kGluHalf - 1) / kGluHalf;
  packed_quantized_glu_bytes(gate, scale_dtype);  // checks
  const QuantInfo q = cpu::quant_info(gate, scale_dtype);
  cpu::pack_quantized_panels(
      dst, gate.dtype, q, gate.in, panels,
      [&](int64_t c) -> const QuantizedRows& { return c < kGluHalf ? gate : up; },
      [&](int64_t p, int64_t c) { return p * kGluHalf + c % kGluHalf < I ? p * kGluHalf + c % kGluHalf : -1; });
  MatrixRef m{dst, gate.dtype, WeightLayout::PackedGlu, gate.in, 2 * I, 0};
  m.quant = q;
  return m;
}

int64_t packed_size(const MatrixRef& w) {
  if (!w.packed()) throw InvalidInputError("packed_size: the matrix is not packed");
  return cpu::num_panels(w) * cpu::panel_bytes(w);
}

void unpack_weights(float* dst, const MatrixRef& w) {
  if (!w.packed()) throw InvalidInputError("unpack_weights: the matrix is not packed");
  const bool glu = w.layout == WeightLayout::PackedGlu;
  const int64_t per = cpu::panel_outputs(w), width = cpu::output_width(w), K = w.in, pb = cpu::panel_bytes(w);
  const QuantInfo& q = w.quant;
  for (int64_t p = 0; p < cpu::num_panels(w); ++p) {
    const char* panel = static_cast<const char*>(w.data) + p * pb;
    for (int64_t c = 0; c < kPanelCols; ++c) {
      const int64_t col = p * per + c % per;
      if (col >= width) continue;
      float* out = dst + ((glu && c >= per ? width : 0) + col) * K;  // gate rows, then up rows
      for (int64_t k = 0; k < K; ++k) {
        if (!w.quantized()) {
          const int64_t s = cpu::step_of(w.dtype), at = (k / s) * kPanelCols * s + c * s + k % s;
          out[k] = w.dtype == DType::F32   ? reinterpret_cast<const float*>(panel)[at]
                   : w.dtype == DType::BF16 ? to_float(reinterpret_cast<const bf16*>(panel)[at])
                                            : to_float(reinterpret_cast<const f16*>(panel)[at]);
          continue;
        }
        const int64_t g = k / q.group, i = k % q.group;
        const char* grp = panel + g * cpu::quant_group_bytes(w.dtype, q);
        const char* codes = grp + cpu::quant_header_bytes(q);
        const float scale = q.scale_dtype == DType::BF16 ? to_float(reinterpret_cast<const bf16*>(grp)[c])
                                                         : reinterpret_cast<const float*>(grp)[c];
        int offset = w.dtype == DType::I4 ? 8 : 0;
        if (q.offsets) offset = reinterpret_cast<const int8_t*>(codes - kPanelCols)[c];
        const int code = cpu::quant_code(w.dtype, codes, i, c);
        out[k] = w.dtype == DType::F8_E4M3 ? to_float(fp8_e4m3{uint8_t(code)}) * scale : float(code - offset) * scale;
      }
    }
  }
}

}  // namespace corral::kernels
