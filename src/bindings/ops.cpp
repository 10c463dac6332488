// corral._core.ops: each kernel on numpy arrays, so that tests can check it against a numpy
// reference. 16-bit float arrays travel as uint16 bit patterns with a dtype name beside them; fp8
// (float8_e4m3) KV caches as uint8 codes with float32 scale arrays.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "corral/device.h"
#include "corral/error.h"
#include "corral/kernels/activation.h"
#include "corral/kernels/attention.h"
#include "corral/kernels/cpu_isa.h"
#include "corral/kernels/embedding.h"
#include "corral/kernels/image.h"
#include "corral/kernels/kv_cache.h"
#include "corral/kernels/linear.h"
#include "corral/kernels/mlp.h"
#include "corral/kernels/moe.h"
#include "corral/kernels/norm.h"
#include "corral/kernels/quantize.h"
#include "corral/quantized_checkpoint.h"
#include "corral/kernels/rope.h"
#include "corral/kernels/sampling.h"

namespace py = pybind11;

namespace corral::bindings {

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::F32;
  if (name == "bfloat16") return DType::BF16;
  if (name == "float16") return DType::F16;
  throw DTypeError("dtype '" + name + "' is not one of float32, bfloat16, float16");
}

// KV caches also take float8_e4m3 (weights never do).
DType parse_cache_dtype(const std::string& name) {
  if (name == "float8_e4m3") return DType::F8_E4M3;
  if (name == "float32" || name == "bfloat16" || name == "float16") return parse_dtype(name);
  throw DTypeError("KV cache dtype '" + name + "' is not one of float32, bfloat16, float16, float8_e4m3");
}

// An array holding elements of `dtype`: float32 data, or uint16 bit patterns for 16-bit floats.
struct Typed {
  py::array array;
  DType dtype;
  const void* data() const { return array.data(); }
  int64_t dim(int i) const { return int64_t(array.shape(i)); }
};

Typed typed(const py::array& a, const std::string& dtype_name, const char* what) {
  const DType t = parse_dtype(dtype_name);
  const char kind = a.dtype().kind();
  if (t == DType::F32) {
    if (kind != 'f')
      throw DTypeError(std::string(what) + ": float32 data must be a float array, got numpy dtype " +
                       std::string(py::str(a.dtype())));
    return Typed{F32::ensure(a), t};
  }
  if (kind != 'u' || a.dtype().itemsize() != 2)
    throw DTypeError(std::string(what) + ": " + dtype_name + " data must be passed as uint16 bit patterns, got numpy dtype " +
                     std::string(py::str(a.dtype())));
  return Typed{py::array_t<uint16_t, py::array::c_style>::ensure(a), t};
}

// Token ids as int32, each checked to fit (numpy would wrap 2**32 + 3 around to 3).
I32 token_ids(const py::array& a, const char* what) {
  const I64 ids = I64::ensure(a);
  if (!ids || ids.ndim() != 1) throw ShapeError(std::string(what) + " must be a 1-D array of integers");
  I32 out({ids.shape(0)});
  for (py::ssize_t i = 0; i < ids.shape(0); ++i) {
    const int64_t v = ids.data()[i];
    if (v < INT32_MIN || v > INT32_MAX)
      throw InvalidInputError(std::string(what) + ": token id " + std::to_string(v) + " at index " + std::to_string(i) +
                              " is outside the vocabulary");
    out.mutable_data()[i] = int32_t(v);
  }
  return out;
}

void expect(bool ok, const std::string& msg) {
  if (!ok) throw ShapeError(msg);
}

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device{DeviceType::CPU, 0};
  if (name.rfind("cuda", 0) == 0) {
    const int index = name.size() > 5 && name[4] == ':' ? std::stoi(name.substr(5)) : 0;
    return Device{DeviceType::CUDA, index};
  }
  throw InvalidInputError("device '" + name + "' is not cpu or cuda[:N]");
}

MatrixRef matrix(const Typed& w, const std::string& layout, const char* what) {
  expect(w.array.ndim() == 2, std::string(what) + " must be 2-D, got shape " + shape_of(w.array));
  if (layout == "out_in") return MatrixRef{w.data(), w.dtype, WeightLayout::OutIn, w.dim(1), w.dim(0)};
  if (layout == "in_out") return MatrixRef{w.data(), w.dtype, WeightLayout::InOut, w.dim(0), w.dim(1)};
  throw InvalidInputError("layout must be 'out_in' or 'in_out', got '" + layout + "'");
}

// matrix() of the first `width` elements of each stored row of w (0: all of them): a slice of a
// wider matrix, its rows w's row length apart (OutIn: width inputs, InOut: width outputs).
MatrixRef matrix_slice(const Typed& w, const std::string& layout, int64_t width, const char* what) {
  MatrixRef m = matrix(w, layout, what);
  if (width == 0) return m;
  expect(width >= 1 && width <= w.dim(1), std::string(what) + ": width " + std::to_string(width) +
                                              " must be in [1, " + std::to_string(w.dim(1)) + "]");
  m.ld = w.dim(1);
  (m.layout == WeightLayout::OutIn ? m.in : m.out) = width;
  return m;
}

const Stream kCpu{};

// A paged cache given as numpy arrays, used in place: k_cache [num_blocks, kv_heads, head_dim,
// block_size] and v_cache [num_blocks, kv_heads, block_size, head_dim] (float32, uint16 bits of
// 16-bit floats, or uint8 fp8 codes), and for float8_e4m3 k_scale and v_scale [num_blocks,
// kv_heads] float32.
struct PagedArrays {
  PagedKv kv;
  py::array k_cache, v_cache, k_scale, v_scale;
};

PagedArrays paged(py::array k_cache, py::array v_cache, const std::string& dtype, const py::object& k_scale,
                  const py::object& v_scale) {
  const DType t = parse_cache_dtype(dtype);
  const bool fp8 = t == DType::F8_E4M3;
  for (const py::array* a : {&k_cache, &v_cache}) {
    expect(a->ndim() == 4, "caches must be 4-D: k_cache (num_blocks, kv_heads, head_dim, block_size), v_cache "
                           "(num_blocks, kv_heads, block_size, head_dim); got " + shape_of(*a));
    const bool right_type = t == DType::F32 ? a->dtype().is(py::dtype::of<float>())
                            : fp8           ? a->dtype().is(py::dtype::of<uint8_t>())
                                            : a->dtype().is(py::dtype::of<uint16_t>());
    if (!right_type)
      throw DTypeError("caches of " + dtype + " must be numpy " +
                       (t == DType::F32 ? "float32" : fp8 ? "uint8 (fp8 codes)" : "uint16 (bit patterns)") +
                       " arrays, got " + std::string(py::str(a->dtype())));
    expect(a->flags() & py::array::c_style, "caches must be C-contiguous (they are written in place)");
  }
  // K is stored transposed per block and head: [head_dim, block_size].
  expect(k_cache.shape(0) == v_cache.shape(0) && k_cache.shape(1) == v_cache.shape(1) &&
             k_cache.shape(2) == v_cache.shape(3) && k_cache.shape(3) == v_cache.shape(2),
         "k_cache must be (num_blocks, kv_heads, head_dim, block_size) for v_cache (num_blocks, kv_heads, "
         "block_size, head_dim); got " + shape_of(k_cache) + " and " + shape_of(v_cache));
  PagedArrays p;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  PagedKv& c = p.kv;
  c.dtype = t;
  c.num_blocks = v_cache.shape(0);
  c.kv_heads = int32_t(v_cache.shape(1));
  c.block_size = int32_t(v_cache.shape(2));
  c.head_dim = int32_t(v_cache.shape(3));
  if (!fp8) {
    if (!k_scale.is_none() || !v_scale.is_none())
      throw InvalidInputError("k_scale and v_scale are only for float8_e4m3 caches, not " + dtype);
    c.k = k_cache.mutable_data();
    c.v = v_cache.mutable_data();
    c.block_stride = k_cache.strides(0);
    return p;
  }
  if (k_scale.is_none() || v_scale.is_none())
    throw InvalidInputError("float8_e4m3 caches need k_scale and v_scale: float32 arrays (num_blocks, kv_heads)");
  const std::string want = "(" + std::to_string(c.num_blocks) + ", " + std::to_string(c.kv_heads) + ")";
  for (const auto& [obj, name, dst] :
       {std::tuple{&k_scale, "k_scale", &p.k_scale}, std::tuple{&v_scale, "v_scale", &p.v_scale}}) {
    if (!py::isinstance<py::array>(*obj) || !obj->cast<py::array>().dtype().is(py::dtype::of<float>()))
      throw DTypeError(std::string(name) + " must be a numpy float32 array, got " +
                       (py::isinstance<py::array>(*obj) ? std::string(py::str(obj->cast<py::array>().dtype()))
                                                        : std::string(py::str(py::type::of(*obj)))));
    const py::array a = obj->cast<py::array>();
    expect(a.ndim() == 2 && a.shape(0) == c.num_blocks && a.shape(1) == c.kv_heads,
           std::string(name) + " must be " + want + ", got " + shape_of(a));
    expect(a.flags() & py::array::c_style, std::string(name) + " must be C-contiguous (it is written in place)");
    *dst = a;
  }
  c.k = k_cache.mutable_data();
  c.v = v_cache.mutable_data();
  c.block_stride = k_cache.strides(0);
  c.k_scale = static_cast<float*>(p.k_scale.mutable_data());
  c.v_scale = static_cast<float*>(p.v_scale.mutable_data());
  c.scale_stride = p.k_scale.strides(0);
  return p;
}

// A paged cache copied to a device (the page layout kept: K, V and the fp8 scales each in a device
// buffer shaped like its numpy array), for the ops' device= argument.
struct DeviceCache {
  DeviceBuffer k, v, k_scale, v_scale;
  PagedKv kv;
};

DeviceCache upload_cache(const Device& dev, const PagedArrays& p, const Stream& stream) {
  DeviceCache d;
  d.kv = p.kv;
  auto up = [&](DeviceBuffer& buf, const py::array& a) {
    buf = DeviceBuffer(dev, size_t(a.nbytes()));
    copy_to_device(buf, a.data(), size_t(a.nbytes()), stream);
  };
  up(d.k, p.k_cache);
  up(d.v, p.v_cache);
  d.kv.k = d.k.data();
  d.kv.v = d.v.data();
  if (p.kv.dtype == DType::F8_E4M3) {
    up(d.k_scale, p.k_scale);
    up(d.v_scale, p.v_scale);
    d.kv.k_scale = static_cast<float*>(d.k_scale.data());
    d.kv.v_scale = static_cast<float*>(d.v_scale.data());
  }
  return d;
}

// Copies a device cache back into its numpy arrays (in place).
void download_cache(const DeviceCache& d, PagedArrays& p, const Stream& stream) {
  copy_to_host(p.k_cache.mutable_data(), d.k, size_t(p.k_cache.nbytes()), stream);
  copy_to_host(p.v_cache.mutable_data(), d.v, size_t(p.v_cache.nbytes()), stream);
  if (p.kv.dtype == DType::F8_E4M3) {
    copy_to_host(p.k_scale.mutable_data(), d.k_scale, size_t(p.k_scale.nbytes()), stream);
    copy_to_host(p.v_scale.mutable_data(), d.v_scale, size_t(p.v_scale.nbytes()), stream);
  }
}

// A host array copied to a new device buffer.
DeviceBuffer upload(const Device& dev, const void* data, size_t bytes, const Stream& stream) {
  DeviceBuffer b(dev, bytes);
  if (bytes) copy_to_device(b, data, bytes, stream);
  return b;
}

// Buffers on a device (host memory for the CPU) on one stream, for the ops' device= argument:
// host data copied in with put(), results copied back with get().
class OnDevice {
 public:
  explicit OnDevice(const std::string& device) : dev_(parse_device(device)), stream_(dev_) {}
  const Stream& stream() const { return stream_.get(); }
  // A new buffer of `bytes`, holding a copy of `data` unless that is null.
  template <class T = void>
  T* put(const void* data, size_t bytes) {
    DeviceBuffer& b = bufs_.emplace_back(dev_, bytes);
    if (data && bytes) copy_to_device(b, data, bytes, stream_.get());
    return static_cast<T*>(b.data());
  }
  // Copies `bytes` of the buffer put() returned as `ptr` to host `dst`, then waits for the stream.
  void get(void* dst, const void* ptr, size_t bytes) {
    for (const DeviceBuffer& b : bufs_)
      if (b.data() == ptr) {
        if (bytes) copy_to_host(dst, b, bytes, stream_.get());
        stream_.synchronize();
        return;
      }
    throw std::logic_error("OnDevice::get: not a buffer of this call");
  }

 private:
  Device dev_;
  StreamOwner stream_;
  std::deque<DeviceBuffer> bufs_;
};

size_t nbytes(const py::array& a) { return size_t(a.nbytes()); }

// A packed matrix with its bytes copied, as they are, into d.
MatrixRef put_packed(OnDevice& d, MatrixRef w) {
  w.data = d.put(w.data, size_t(kernels::packed_size(w)));
  return w;
}

// "native" (bf16 weights: bf16-rounded activations) or "float32" (exact products).
kernels::Activations parse_activations(const std::string& act) {
  if (act == "native") return kernels::Activations::Native;
  if (act == "float32") return kernels::Activations::Float32;
  throw InvalidInputError("activations must be 'native' or 'float32', got '" + act + "'");
}

// The MoeWeights of checkpoint-layout arrays, checked against hidden size H.
MoeWeights moe_weights(const Typed& r, const Typed& gu, const Typed& dn, const Typed& sg, const Typed& su,
                       const Typed& sd, int64_t H) {
  expect(gu.array.ndim() == 3 && gu.dim(1) == H && gu.dim(2) % 2 == 0,
         "gate_up must be (experts, hidden, 2 * inter), got " + shape_of(gu.array));
  const int64_t E = gu.dim(0), I = gu.dim(2) / 2;
  expect(dn.array.ndim() == 3 && dn.dim(0) == E && dn.dim(1) == I && dn.dim(2) == H,
         "down must be (experts, inter, hidden), got " + shape_of(dn.array));
  MoeWeights w;
  w.router = matrix(r, "out_in", "router");
  expect(w.router.in == H && w.router.out == E, "router must be (experts, hidden), got " + shape_of(r.array));
  w.gate_up = gu.data();
  w.down = dn.data();
  w.experts_dtype = gu.dtype;
  w.shared_gate = matrix(sg, "out_in", "shared_gate");
  w.shared_up = matrix(su, "out_in", "shared_up");
  w.shared_down = matrix(sd, "out_in", "shared_down");
  expect(w.shared_gate.in == H && w.shared_up.in == H && w.shared_down.out == H &&
             w.shared_down.in == w.shared_gate.out && w.shared_up.out == w.shared_gate.out,
         "shared expert must be gate and up (I, H), down (H, I)");
  w.num_experts = E;
  w.hidden = H;
  w.inter = I;
  return w;
}

// Quantized rows given as numpy arrays (kept alive with the view): codes int8 [out, in] (int4:
// values in [-8, 7]; float8_e4m3: the codes' bits), scales float32 [out, groups], zero points
// int8 [out, groups] or None.
using I8 = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;
struct QuantArrays {
  I8 codes, zero_points;
  F32 scales;
  QuantizedRows rows;
};

DType parse_code_dtype(const std::string& name) {
  if (name == "int8") return DType::I8;
  if (name == "int4") return DType::I4;
  if (name == "float8_e4m3") return DType::F8_E4M3;
  throw DTypeError("quantized dtype '" + name + "' is not one of int8, int4, float8_e4m3");
}

QuantArrays quant_arrays(const py::array& codes, const py::array& scales, const py::object& zero_points,
                         const std::string& dtype, int64_t group) {
  QuantArrays a{I8::ensure(codes), zero_points.is_none() ? I8() : I8::ensure(zero_points), F32::ensure(scales), {}};
  expect(a.codes && a.codes.ndim() == 2, "codes must be a 2-D integer array");
  expect(group >= 1, "group must be >= 1");
  const int64_t out = a.codes.shape(0), in = a.codes.shape(1), groups = (in + group - 1) / group;
  expect(a.scales && a.scales.ndim() == 2 && a.scales.shape(0) == out && a.scales.shape(1) == groups,
         "scales must be (" + std::to_string(out) + ", " + std::to_string(groups) + ")");
  if (!zero_points.is_none())
    expect(a.zero_points.ndim() == 2 && a.zero_points.shape(0) == out && a.zero_points.shape(1) == groups,
           "zero_points must be (" + std::to_string(out) + ", " + std::to_string(groups) + ")");
  a.rows = QuantizedRows{parse_code_dtype(dtype), out, in, group, a.codes.data(), a.scales.data(),
                         zero_points.is_none() ? nullptr : a.zero_points.data()};
  return a;
}

// The SwiGLU MLP of every row of x on packed weights (the GIL released while it runs).
F32 swiglu_rows(const F32& x, const MatrixRef& gate_up, const MatrixRef& down, kernels::Activations act) {
  F32 out({x.shape(0), x.shape(1)});
  float* op = out.mutable_data();
  std::fill(op, op + out.size(), 0.f);
  const float* xp = x.data();
  const int64_t rows = x.shape(0);
  py::gil_scoped_release release;
  kernels::swiglu_mlp(kCpu, op, xp, rows, gate_up, down, act);
  return out;
}

// Weights packed once and kept between calls, as a model keeps them (for benchmarks).
struct PackedMatrix {
  kernels::PackedStorage storage;
  MatrixRef w;
};
struct PackedMoe {
  kernels::PackedStorage storage;
  MoeWeights w;
  // pack_moe_quantized only, for GPUs: the router unpacked [experts, hidden] and the bytes of the
  // experts' gate_up and down matrices.
  std::vector<float> router;
  int64_t gate_up_bytes = 0, down_bytes = 0;
};

// moe on a GPU: p's weights, x and out copied there, out and counts back.
void moe_on_device(const std::string& device, const PackedMoe& p, float* op, int64_t* cp, const float* xp, int64_t T,
                   int top_k, kernels::Activations a) {
  const int64_t H = p.w.hidden, E = p.w.num_experts;
  OnDevice d(device);
  MoeWeights w = p.w;
  w.router = MatrixRef{d.put(p.router.data(), p.router.size() * 4), DType::F32, WeightLayout::OutIn, H, E};
  w.gate_up = d.put(p.w.gate_up, size_t(p.gate_up_bytes));
  w.down = d.put(p.w.down, size_t(p.down_bytes));
  w.shared_gate = put_packed(d, p.w.shared_gate);
  w.shared_down = put_packed(d, p.w.shared_down);
  const size_t ob = size_t(T * H) * 4, cb = size_t(E) * 8;
  float* dout = d.put<float>(op, ob);
  int64_t* dcounts = d.put<int64_t>(cp, cb);
  kernels::moe(d.stream(), dout, d.put<const float>(xp, ob), T, w, top_k, dcounts, a);
  d.get(cp, dcounts, cb);
  d.get(op, dout, ob);
}

}  // namespace

void register_ops(py::module_& m) {
  py::class_<PackedMatrix, std::shared_ptr<PackedMatrix>>(m, "PackedMatrix")
      .def_property_readonly("shape", [](const PackedMatrix& p) { return py::make_tuple(p.w.out, p.w.in); })
      .def_property_readonly("nbytes", [](const PackedMatrix& p) { return kernels::packed_size(p.w); });
  m.def(
      "pack_quantized",
      [](const py::array& codes, const py::array& scales, const py::object& zero_points, const std::string& dtype,
         int64_t group, const std::string& scale_dtype, int64_t act_group, const py::object& up) {
        const QuantArrays g = quant_arrays(codes, scales, zero_points, dtype, group);
        const DType st = parse_dtype(scale_dtype);
        auto p = std::make_shared<PackedMatrix>();
        if (up.is_none()) {
          p->storage = kernels::allocate_packed(kernels::packed_quantized_bytes(g.rows, st));
          p->w = kernels::pack_quantized(p->storage.get(), g.rows, st);
        } else {
          const py::tuple t = up.cast<py::tuple>();
          expect(t.size() == 3, "up must be (codes, scales, zero_points)");
          const QuantArrays u = quant_arrays(t[0].cast<py::array>(), t[1].cast<py::array>(), t[2], dtype, group);
          p->storage = kernels::allocate_packed(kernels::packed_quantized_glu_bytes(g.rows, st));
          p->w = kernels::pack_quantized_glu(p->storage.get(), g.rows, u.rows, st);
        }
        p->w.quant.act_group = act_group;
        return p;
      },
      "pack_quantized(codes, scales, zero_points, dtype, group, scale_dtype, act_group, up) -> PackedMatrix: "
      "quantized rows packed (with up=(codes, scales, zero_points): a GLU gate/up pair)",
      py::arg("codes"), py::arg("scales"), py::arg("zero_points") = py::none(), py::arg("dtype") = "int8",
      py::arg("group") = 32, py::arg("scale_dtype") = "float32", py::arg("act_group") = 0,
      py::arg("up") = py::none());
  m.def(
      "quantize_weights",
      [](F32 w, const std::string& dtype, int64_t group, const std::string& scale_dtype) {
        expect(w.ndim() == 2, "w must be 2-D (out, in)");
        const MatrixRef mw{w.data(), DType::F32, WeightLayout::OutIn, int64_t(w.shape(1)), int64_t(w.shape(0))};
        const kernels::QuantizedBuffer b = kernels::quantize_weights(mw, parse_code_dtype(dtype), group, parse_dtype(scale_dtype));
        I8 codes({b.out, b.in});
        F32 scales({b.out, int64_t(b.scales.size()) / b.out});
        std::copy(b.codes.begin(), b.codes.end(), codes.mutable_data());
        std::copy(b.scales.begin(), b.scales.end(), scales.mutable_data());
        return py::make_tuple(codes, scales, b.group);
      },
      "quantize_weights(w, dtype, group, scale_dtype) -> (codes, scales, group): load-time quantization of an "
      "(out, in) float32 matrix",
      py::arg("w"), py::arg("dtype"), py::arg("group") = 32, py::arg("scale_dtype") = "float32");
  m.def(
      "unpack_packed",
      [](const PackedMatrix& p) {
        const int64_t rows = p.w.layout == WeightLayout::PackedGlu ? p.w.out : p.w.out;
        F32 out({rows, p.w.in});
        kernels::unpack_weights(out.mutable_data(), p.w);
        return out;
      },
      "unpack_packed(packed) -> float32 (out, in): the weights the products use (GLU: gate rows, then up rows)",
      py::arg("packed"));
  m.def(
      "load_quantized_linear",
      [](const std::string& dir, const std::string& module, int64_t out, int64_t in, int64_t expert, int64_t col0,
         int64_t width) {
        const Checkpoint ckpt(dir);
        const CheckpointQuantization cq = load_quantization(ckpt.config_path());
        const std::string owner = expert >= 0 ? module.substr(0, module.rfind('.')) : module;
        const QuantScheme* scheme = cq.scheme_for(owner);
        if (!scheme) throw InvalidInputError("'" + owner + "' is not quantized in " + dir);
        const QuantizedSource src{module, scheme, out, in, expert, col0, width};
        const QuantPlan plan = plan_quantized(ckpt, src);
        const DecodedWeights d = decode_quantized(ckpt, src, plan);
        PackedMatrix p;
        if (plan.dense) {
          const MatrixRef f{d.dense.data(), DType::F32, WeightLayout::OutIn, in, out};
          p.storage = kernels::allocate_packed(kernels::packed_bytes(f));
          p.w = kernels::pack_weights(p.storage.get(), f);
        } else {
          p.storage = kernels::allocate_packed(kernels::packed_quantized_bytes(d.codes.rows(), plan.scale_dtype));
          p.w = kernels::pack_quantized(p.storage.get(), d.codes.rows(), plan.scale_dtype);
        }
        F32 w({out, in});
        kernels::unpack_weights(w.mutable_data(), p.w);
        py::dict info;
        info["dtype"] = plan.dense ? "float32" : dtype_name(plan.dtype);
        info["group"] = plan.group;
        info["scale_dtype"] = dtype_name(plan.scale_dtype);
        info["offsets"] = plan.offsets;
        info["act_group"] = plan.act_group;
        return py::make_tuple(w, info);
      },
      "load_quantized_linear(dir, module, out, in, expert=-1, col0=0, width=0) -> (weights, info): a quantized "
      "Linear of a checkpoint as Corral loads and packs it, unpacked to float32 (out, in)",
      py::arg("dir"), py::arg("module"), py::arg("out"), py::arg("in"), py::arg("expert") = -1, py::arg("col0") = 0,
      py::arg("width") = 0);
  m.def(
      "swiglu_packed",
      [](F32 x, const PackedMatrix& gate_up, const PackedMatrix& down, const std::string& device) {
        expect(x.ndim() == 2 && x.shape(1) == gate_up.w.in, "x must be (rows, " + std::to_string(gate_up.w.in) + ")");
        if (parse_device(device).type == DeviceType::CPU)
          return swiglu_rows(x, gate_up.w, down.w, kernels::Activations::Native);
        // A GPU gets the packed bytes as they are.
        F32 out({x.shape(0), x.shape(1)});
        const size_t bytes = nbytes(out);
        const float* xp = x.data();
        float* op = out.mutable_data();
        const int64_t rows = x.shape(0);
        py::gil_scoped_release release;
        OnDevice d(device);
        const MatrixRef gu = put_packed(d, gate_up.w), dn = put_packed(d, down.w);
        float* dout = d.put<float>(nullptr, bytes);
        fill_zero(dout, bytes, d.stream());
        kernels::swiglu_mlp(d.stream(), dout, d.put<const float>(xp, nbytes(x)), rows, gu, dn);
        d.get(op, dout, bytes);
        return out;
      },
      py::arg("x"), py::arg("gate_up"), py::arg("down"), py::kw_only(), py::arg("device") = "cpu");
  m.def(
      "pack_linear",
      [](const py::array& w, const std::string& dtype, const std::string& layout) {
        const MatrixRef mw = matrix(typed(w, dtype, "w"), layout, "w");
        auto p = std::make_shared<PackedMatrix>();
        p->storage = kernels::allocate_packed(kernels::packed_bytes(mw));
        p->w = kernels::pack_weights(p->storage.get(), mw);
        return p;
      },
      "pack_linear(w, dtype, layout) -> PackedMatrix: w packed once, for linear_packed", py::arg("w"),
      py::arg("dtype") = "float32", py::arg("layout") = "out_in");
  m.def(
      "linear_packed",
      [](F32 x, const PackedMatrix& p, const std::string& act, const std::string& device) {
        const kernels::Activations a = parse_activations(act);
        expect(x.ndim() == 2 && x.shape(1) == p.w.in, "x must be (rows, " + std::to_string(p.w.in) + "), got " + shape_of(x));
        F32 y({x.shape(0), py::ssize_t(p.w.out)});
        float* yp = y.mutable_data();
        const float* xp = x.data();
        const int64_t rows = x.shape(0);
        const size_t xbytes = nbytes(x), ybytes = nbytes(y);
        const bool cpu = parse_device(device).type == DeviceType::CPU;
        py::gil_scoped_release release;
        if (cpu) {
          kernels::linear(kCpu, yp, p.w.out, xp, p.w.in, rows, p.w, false, a);
          return y;
        }
        // A GPU gets the packed bytes as they are (its products read unpacked weights: NotSupportedError).
        OnDevice d(device);
        const MatrixRef w = put_packed(d, p.w);
        float* dy = d.put<float>(nullptr, ybytes);
        kernels::linear(d.stream(), dy, p.w.out, d.put<const float>(xp, xbytes), p.w.in, rows, w, false, a);
        d.get(yp, dy, ybytes);
        return y;
      },
      py::arg("x"), py::arg("w"), py::arg("activations") = "native", py::kw_only(), py::arg("device") = "cpu");
  py::class_<PackedMoe, std::shared_ptr<PackedMoe>>(m, "PackedMoe");
  m.def(
      "pack_moe",
      [](const py::array& router, const py::array& gate_up, const py::array& down, const py::array& shared_gate,
         const py::array& shared_up, const py::array& shared_down, const std::string& dtype) {
        const Typed r = typed(router, dtype, "router"), gu = typed(gate_up, dtype, "gate_up"),
                    dn = typed(down, dtype, "down"), sg = typed(shared_gate, dtype, "shared_gate"),
                    su = typed(shared_up, dtype, "shared_up"), sd = typed(shared_down, dtype, "shared_down");
        expect(gu.array.ndim() == 3, "gate_up must be (experts, hidden, 2 * inter), got " + shape_of(gu.array));
        const MoeWeights w = moe_weights(r, gu, dn, sg, su, sd, gu.dim(1));
        auto p = std::make_shared<PackedMoe>();
        p->storage = kernels::allocate_packed(kernels::packed_moe_bytes(w));
        p->w = kernels::pack_moe(p->storage.get(), w);
        return p;
      },
      "pack_moe(router, gate_up, down, shared_gate, shared_up, shared_down, dtype) -> PackedMoe: for moe_packed",
      py::arg("router"), py::arg("gate_up"), py::arg("down"), py::arg("shared_gate"), py::arg("shared_up"),
      py::arg("shared_down"), py::arg("dtype") = "float32");
  m.def(
      "pack_moe_quantized",
      [](F32 router, const std::vector<std::shared_ptr<PackedMatrix>>& gate_up,
         const std::vector<std::shared_ptr<PackedMatrix>>& down, const PackedMatrix& shared_gate_up,
         const PackedMatrix& shared_down) {
        expect(router.ndim() == 2, "router must be (experts, hidden)");
        const int64_t E = router.shape(0), H = router.shape(1);
        expect(E >= 1 && int64_t(gate_up.size()) == E && int64_t(down.size()) == E,
               "gate_up and down must hold one packed matrix per expert (" + std::to_string(E) + ")");
        const MatrixRef &g0 = gate_up[0]->w, &d0 = down[0]->w;
        const int64_t I = g0.out / 2;
        expect(g0.quantized() && g0.layout == WeightLayout::PackedGlu && g0.in == H,
               "gate_up must be quantized GLU pairs (pack_quantized with up=...) of in " + std::to_string(H));
        expect(d0.quantized() && d0.layout == WeightLayout::Packed && d0.in == I && d0.out == H && d0.dtype == g0.dtype,
               "down must be quantized matrices (" + std::to_string(H) + ", " + std::to_string(I) + ") of gate_up's dtype");
        const auto same = [](const MatrixRef& a, const MatrixRef& b) {
          return a.layout == b.layout && a.dtype == b.dtype && a.in == b.in && a.out == b.out && a.quant == b.quant;
        };
        for (int64_t e = 0; e < E; ++e)
          expect(same(gate_up[e]->w, g0) && same(down[e]->w, d0), "every expert must have one shape and format");
        const MatrixRef rw{router.data(), DType::F32, WeightLayout::OutIn, H, E};
        const int64_t rb = kernels::packed_bytes(rw), gb = kernels::packed_size(g0), db = kernels::packed_size(d0),
                      sgb = kernels::packed_size(shared_gate_up.w), sdb = kernels::packed_size(shared_down.w);
        auto p = std::make_shared<PackedMoe>();
        p->storage = kernels::allocate_packed(rb + E * (gb + db) + sgb + sdb);
        char* at = p->storage.get();
        MoeWeights& w = p->w;
        w.router = kernels::pack_weights(at, rw);
        at += rb;
        w.gate_up = at;
        for (int64_t e = 0; e < E; ++e, at += gb) std::memcpy(at, gate_up[e]->w.data, size_t(gb));
        w.down = at;
        for (int64_t e = 0; e < E; ++e, at += db) std::memcpy(at, down[e]->w.data, size_t(db));
        w.shared_gate = shared_gate_up.w;
        w.shared_gate.data = at;
        std::memcpy(at, shared_gate_up.w.data, size_t(sgb));
        w.shared_down = shared_down.w;
        w.shared_down.data = at + sgb;
        std::memcpy(at + sgb, shared_down.w.data, size_t(sdb));
        w.experts_dtype = g0.dtype;
        w.gate_up_quant = g0.quant;
        w.down_quant = d0.quant;
        w.experts_layout = WeightLayout::Packed;
        w.num_experts = E;
        w.hidden = H;
        w.inter = I;
        p->router.assign(router.data(), router.data() + E * H);
        p->gate_up_bytes = E * gb;
        p->down_bytes = E * db;
        return p;
      },
      "pack_moe_quantized(router, gate_up, down, shared_gate_up, shared_down) -> PackedMoe: quantized experts as "
      "the loader holds them (each gate_up a GLU pair from pack_quantized(up=...), each down a pack_quantized "
      "matrix), the router float32 (experts, hidden), for moe_packed",
      py::arg("router"), py::arg("gate_up"), py::arg("down"), py::arg("shared_gate_up"), py::arg("shared_down"));
  m.def(
      "moe_packed",
      [](F32 x, const PackedMoe& p, int top_k, const std::string& act, const std::string& device) {
        const kernels::Activations a = parse_activations(act);
        const int64_t H = p.w.hidden, E = p.w.num_experts;
        expect(x.ndim() == 2 && x.shape(1) == H, "x must be (tokens, " + std::to_string(H) + "), got " + shape_of(x));
        const int64_t T = x.shape(0);
        F32 out({T, H});
        I64 counts({E});
        float* op = out.mutable_data();
        int64_t* cp = counts.mutable_data();
        std::fill(op, op + T * H, 0.f);
        std::fill(cp, cp + E, 0);
        const float* xp = x.data();
        if (parse_device(device).type == DeviceType::CPU) {
          py::gil_scoped_release release;
          kernels::moe(kCpu, op, xp, T, p.w, top_k, cp, a);
        } else {
          expect(!p.router.empty(), "moe_packed on a GPU reads weights from pack_moe_quantized");
          py::gil_scoped_release release;
          moe_on_device(device, p, op, cp, xp, T, top_k, a);
        }
        return py::make_tuple(out, counts);
      },
      "moe_packed(x, packed, top_k, activations, *, device) -> (out, counts): moe on weights from pack_moe (CPU) or "
      "pack_moe_quantized (CPU, CUDA)",
      py::arg("x"), py::arg("packed"), py::arg("top_k"), py::arg("activations") = "native", py::kw_only(),
      py::arg("device") = "cpu");

  m.def("cpu_isas", &kernels::cpu_isas, "CPU ISA levels available here, best first");
  m.def("cpu_isa", &kernels::cpu_isa, "The CPU ISA level in use");
  m.def("set_cpu_isa", &kernels::set_cpu_isa, py::arg("name"));

  m.def(
      "linear",
      [](F32 x, const py::array& w, const std::string& dtype, const std::string& layout, const std::string& act,
         const std::string& device, const py::object& y_in, bool accumulate, int64_t width) {
        const kernels::Activations a = parse_activations(act);
        const Typed tw = typed(w, dtype, "w");
        const MatrixRef mw = matrix_slice(tw, layout, width, "w");
        expect(x.ndim() == 2 && x.shape(1) >= mw.in,
               "x must be (rows, " + std::to_string(mw.in) + ") or wider, got " + shape_of(x));
        const int64_t rows = x.shape(0), ldx = x.shape(1);
        // y starts as zeros, or as a copy of the caller's y (which is left as it was).
        F32 y({rows, mw.out});
        if (y_in.is_none()) {
          std::fill(y.mutable_data(), y.mutable_data() + y.size(), 0.f);
        } else {
          const F32 given = F32::ensure(y_in);
          expect(given && given.ndim() == 2 && given.shape(0) == rows && given.shape(1) >= mw.out,
                 "y must be (" + std::to_string(rows) + ", " + std::to_string(mw.out) + ") or wider");
          y = F32({given.shape(0), given.shape(1)});
          std::copy(given.data(), given.data() + given.size(), y.mutable_data());
        }
        const int64_t ldy = y.shape(1);
        float* yp = y.mutable_data();
        const float* xp = x.data();
        const bool cpu = parse_device(device).type == DeviceType::CPU;
        const size_t ybytes = nbytes(y), xbytes = nbytes(x), wbytes = nbytes(tw.array);
        py::gil_scoped_release release;
        OnDevice d(device);
        float* dy = d.put<float>(yp, ybytes);
        const float* dx = d.put<const float>(xp, xbytes);
        // The CPU's products read weights packed as a model packs them at load, CUDA's read them as stored.
        MatrixRef dw = mw;
        kernels::PackedStorage packed;
        if (cpu) {
          packed = kernels::allocate_packed(kernels::packed_bytes(mw));
          dw = kernels::pack_weights(packed.get(), mw);
        } else {
          dw.data = d.put(tw.data(), wbytes);
        }
        kernels::linear(d.stream(), dy, ldy, dx, ldx, rows, dw, accumulate, a);
        d.get(yp, dy, ybytes);
        return y;
      },
      "linear(x, w, dtype='float32', layout='out_in', activations='native', *, device='cpu', y=None,\n"
      "accumulate=False, width=0) -> y: x . W for W = w (out_in: (out, in), in_out: (in, out)) of dtype (16-bit\n"
      "floats as uint16 bits). width > 0: W is the first `width` columns of w, a slice whose rows are w's row\n"
      "length apart. x may be wider than in (its first in columns are read, rows x.shape[1] apart), y (a copy\n"
      "of it is returned) wider than out; accumulate adds the product to y's columns [0, out).",
      py::arg("x"), py::arg("w"), py::arg("dtype") = "float32", py::arg("layout") = "out_in",
      py::arg("activations") = "native", py::kw_only(), py::arg("device") = "cpu", py::arg("y") = py::none(),
      py::arg("accumulate") = false, py::arg("width") = 0);

  m.def(
      "rms_norm",
      [](const py::array& x, py::object w, float eps, const std::string& dtype, const std::string& w_dtype,
         const std::string& device) {
        const Typed tx = typed(x, dtype, "x");
        expect(tx.array.ndim() == 2, "x must be 2-D, got shape " + shape_of(tx.array));
        const int64_t rows = tx.dim(0), dim = tx.dim(1);
        Typed tw{py::array(), DType::F32};
        if (!w.is_none()) {
          tw = typed(w.cast<py::array>(), w_dtype, "w");
          expect(tw.array.ndim() == 1 && tw.dim(0) == dim, "w must be (" + std::to_string(dim) + ",), got " + shape_of(tw.array));
        }
        const size_t xbytes = size_t(rows * dim) * dtype_size(tx.dtype);
        const size_t wbytes = w.is_none() ? 0 : size_t(dim) * dtype_size(tw.dtype);
        py::array y(tx.array.dtype(), {rows, dim});
        const Device dev = parse_device(device);
        {
          StreamOwner stream(dev);
          DeviceBuffer dx(dev, xbytes), dy(dev, xbytes), dw(dev, wbytes);
          copy_to_device(dx, tx.data(), xbytes, stream.get());
          if (wbytes) copy_to_device(dw, tw.data(), wbytes, stream.get());
          kernels::rms_norm(stream.get(), dy.data(), dx.data(), tx.dtype, wbytes ? dw.data() : nullptr, tw.dtype, rows,
                            dim, eps);
          copy_to_host(y.mutable_data(), dy, xbytes, stream.get());
          stream.synchronize();
        }
        return y;
      },
      py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("dtype") = "float32", py::arg("w_dtype") = "float32",
      py::arg("device") = "cpu");

  // The vision encoder's ops. Each returns new arrays (its inputs are copied to the device first).
  m.def(
      "layer_norm",
      [](F32 x, const py::array& w, const py::object& b, float eps, const std::string& w_dtype, bool in_place,
         const std::string& device) {
        expect(x.ndim() == 2, "x must be 2-D, got shape " + shape_of(x));
        const int64_t rows = x.shape(0), dim = x.shape(1);
        const Typed tw = typed(w, w_dtype, "w");
        expect(tw.array.ndim() == 1 && tw.dim(0) == dim, "w must be (" + std::to_string(dim) + ",), got " + shape_of(tw.array));
        Typed tb{py::array(), tw.dtype};
        if (!b.is_none()) {
          tb = typed(b.cast<py::array>(), w_dtype, "b");
          expect(tb.array.ndim() == 1 && tb.dim(0) == dim, "b must be (" + std::to_string(dim) + ",), got " + shape_of(tb.array));
        }
        F32 y({rows, dim});
        OnDevice d(device);
        float* dx = d.put<float>(x.data(), nbytes(x));
        float* dy = in_place ? dx : d.put<float>(nullptr, nbytes(x));
        const void* dw = d.put(tw.data(), nbytes(tw.array));
        const void* db = b.is_none() ? nullptr : d.put(tb.data(), nbytes(tb.array));
        kernels::layer_norm(d.stream(), dy, dx, dw, db, tw.dtype, rows, dim, eps);
        d.get(y.mutable_data(), dy, nbytes(y));
        return y;
      },
      "layer_norm(x, w, b, eps, *, w_dtype='float32', in_place=False, device='cpu') -> y: LayerNorm of the rows of x\n"
      "(b may be None); in_place: y written over x's buffer.",
      py::arg("x"), py::arg("w"), py::arg("b"), py::arg("eps"), py::kw_only(), py::arg("w_dtype") = "float32",
      py::arg("in_place") = false, py::arg("device") = "cpu");

  m.def(
      "gelu",
      [](F32 x, int64_t n, const std::string& device) {
        expect(x.ndim() == 2, "x must be 2-D, got shape " + shape_of(x));
        const int64_t rows = x.shape(0), ld = x.shape(1);
        if (n < 0) n = ld;
        expect(n <= ld, "n must be at most the row width " + std::to_string(ld));
        F32 y({rows, ld});
        OnDevice d(device);
        float* dx = d.put<float>(x.data(), nbytes(x));
        kernels::gelu(d.stream(), dx, ld, rows, n);
        d.get(y.mutable_data(), dx, nbytes(y));
        return y;
      },
      "gelu(x, n=-1, *, device='cpu') -> y: exact GELU of the first n columns (-1: all) of each row of x, the\n"
      "rest copied.",
      py::arg("x"), py::arg("n") = -1, py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "add_rows",
      [](F32 y, const py::array& src, const std::string& dtype, const std::string& device) {
        const Typed ts = typed(src, dtype, "src");
        expect(y.ndim() == 2 && ts.array.ndim() == 2 && ts.dim(1) <= int64_t(y.shape(1)) && ts.dim(0) > 0,
               "y must be (rows, ldy) and src (src_rows > 0, n <= ldy), got " + shape_of(y) + " and " + shape_of(ts.array));
        const int64_t rows = y.shape(0), ldy = y.shape(1);
        F32 out({rows, ldy});
        OnDevice d(device);
        float* dy = d.put<float>(y.data(), nbytes(y));
        const void* ds = d.put(ts.data(), nbytes(ts.array));
        kernels::add_rows(d.stream(), dy, ldy, rows, ds, ts.dtype, ts.dim(1), ts.dim(0));
        d.get(out.mutable_data(), dy, nbytes(out));
        return out;
      },
      "add_rows(y, src, dtype='float32', *, device='cpu') -> y with y[r, :n] += src[r % src_rows] (src: (src_rows, n)).",
      py::arg("y"), py::arg("src"), py::arg("dtype") = "float32", py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "rope_2d",
      [](F32 x, I32 pos_x, I32 pos_y, F32 inv_freq, int64_t heads, const std::string& device) {
        expect(x.ndim() == 2 && inv_freq.ndim() == 1, "x must be (tokens, ld) and inv_freq 1-D");
        const int64_t tokens = x.shape(0), ld = x.shape(1), head_dim = 4 * int64_t(inv_freq.shape(0));
        expect(heads >= 0 && heads * head_dim <= ld,
               "heads * head_dim (" + std::to_string(heads) + " * " + std::to_string(head_dim) + ") exceeds the row width " +
                   std::to_string(ld));
        expect(pos_x.ndim() == 1 && pos_y.ndim() == 1 && pos_x.shape(0) == tokens && pos_y.shape(0) == tokens,
               "pos_x and pos_y must be (" + std::to_string(tokens) + ",)");
        F32 y({tokens, ld});
        OnDevice d(device);
        float* dx = d.put<float>(x.data(), nbytes(x));
        const int32_t* dpx = d.put<const int32_t>(pos_x.data(), nbytes(pos_x));
        const int32_t* dpy = d.put<const int32_t>(pos_y.data(), nbytes(pos_y));
        const float* df = d.put<const float>(inv_freq.data(), nbytes(inv_freq));
        kernels::rope_2d(d.stream(), dx, ld, tokens, heads, head_dim, dpx, dpy, df);
        d.get(y.mutable_data(), dx, nbytes(y));
        return y;
      },
      "rope_2d(x, pos_x, pos_y, inv_freq, heads, *, device='cpu') -> y: the vision encoder's 2-D RoPE of the first\n"
      "heads * head_dim columns of x (tokens, ld), head_dim = 4 * len(inv_freq); the rest copied.",
      py::arg("x"), py::arg("pos_x"), py::arg("pos_y"), py::arg("inv_freq"), py::arg("heads"), py::kw_only(),
      py::arg("device") = "cpu");

  m.def(
      "attention_dense",
      [](F32 q, F32 k, F32 v, int64_t seqs, int64_t heads, int64_t head_dim, float scale, const std::string& device) {
        expect(q.ndim() == 2 && k.ndim() == 2 && v.ndim() == 2 && k.shape(0) == q.shape(0) &&
                   v.shape(0) == q.shape(0) && k.shape(1) == q.shape(1) && v.shape(1) == q.shape(1),
               "q, k and v must be 2-D of one shape (rows, ld), got " + shape_of(q) + ", " + shape_of(k) + ", " + shape_of(v));
        const int64_t rows = q.shape(0), ld = q.shape(1);
        expect(seqs > 0 && rows % seqs == 0, "rows (" + std::to_string(rows) + ") must be seqs x len");
        expect(heads >= 0 && head_dim >= 0 && heads * head_dim <= ld,
               "heads * head_dim exceeds the row width " + std::to_string(ld));
        F32 out({rows, heads * head_dim});
        OnDevice d(device);
        const float* dq = d.put<const float>(q.data(), nbytes(q));
        const float* dk = d.put<const float>(k.data(), nbytes(k));
        const float* dv = d.put<const float>(v.data(), nbytes(v));
        float* dout = d.put<float>(nullptr, nbytes(out));
        kernels::attention_dense(d.stream(), dout, dq, dk, dv, ld, seqs, rows / seqs, heads, head_dim, scale);
        d.get(out.mutable_data(), dout, nbytes(out));
        return out;
      },
      "attention_dense(q, k, v, seqs, heads, head_dim, scale, *, device='cpu') -> out (rows, heads * head_dim):\n"
      "unmasked attention within each of seqs equal sequences of the rows of q, k, v (rows, ld).",
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("seqs"), py::arg("heads"), py::arg("head_dim"),
      py::arg("scale"), py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "unfold_patches",
      [](F32 pixels, int64_t patch, const std::string& device) {
        expect(pixels.ndim() == 4 && pixels.shape(2) == pixels.shape(3),
               "pixels must be (tiles, channels, size, size), got " + shape_of(pixels));
        const int64_t tiles = pixels.shape(0), channels = pixels.shape(1), size = pixels.shape(2);
        expect(patch > 0 && size % patch == 0, "size " + std::to_string(size) + " is not a multiple of patch");
        const int64_t grid = size / patch;
        F32 out({tiles * grid * grid, channels * patch * patch});
        OnDevice d(device);
        const float* dp = d.put<const float>(pixels.data(), nbytes(pixels));
        float* dout = d.put<float>(nullptr, nbytes(out));
        kernels::unfold_patches(d.stream(), dout, dp, tiles, channels, size, patch);
        d.get(out.mutable_data(), dout, nbytes(out));
        return out;
      },
      "unfold_patches(pixels, patch, *, device='cpu') -> rows (tiles * grid^2, channels * patch^2).",
      py::arg("pixels"), py::arg("patch"), py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "pixel_shuffle",
      [](F32 x, int64_t tiles, int64_t grid, int64_t factor, const std::string& device) {
        expect(x.ndim() == 2 && tiles > 0 && x.shape(0) % tiles == 0,
               "x must be (tiles * tile_rows, dim), got " + shape_of(x));
        const int64_t tile_rows = x.shape(0) / tiles, dim = x.shape(1);
        expect(factor > 0 && grid % factor == 0 && tile_rows >= grid * grid,
               "a grid of " + std::to_string(grid) + " cannot fold by " + std::to_string(factor) + " in " +
                   std::to_string(tile_rows) + " rows per tile");
        const int64_t g = grid / factor;
        F32 out({tiles * g * g, factor * factor * dim});
        OnDevice d(device);
        const float* dx = d.put<const float>(x.data(), nbytes(x));
        float* dout = d.put<float>(nullptr, nbytes(out));
        kernels::pixel_shuffle(d.stream(), dout, dx, tiles, tile_rows, grid, dim, factor);
        d.get(out.mutable_data(), dout, nbytes(out));
        return out;
      },
      "pixel_shuffle(x, tiles, grid, factor, *, device='cpu') -> (tiles * (grid / factor)^2, factor^2 * dim).",
      py::arg("x"), py::arg("tiles"), py::arg("grid"), py::arg("factor"), py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "silu_mul",
      [](F32 gate, F32 up, const std::string& device) {
        expect(gate.ndim() == 2 && up.ndim() == 2 && gate.shape(0) == up.shape(0) && gate.shape(1) == up.shape(1),
               "gate and up must be 2-D of one shape, got " + shape_of(gate) + " and " + shape_of(up));
        const int64_t rows = gate.shape(0), n = gate.shape(1);
        F32 out({rows, n});
        OnDevice d(device);
        const float* dg = d.put<const float>(gate.data(), nbytes(gate));
        const float* du = d.put<const float>(up.data(), nbytes(up));
        float* dout = d.put<float>(nullptr, nbytes(out));
        kernels::silu_mul(d.stream(), dout, n, dg, du, n, rows, n);
        d.get(out.mutable_data(), dout, nbytes(out));
        return out;
      },
      "silu_mul(gate, up, *, device='cpu') -> silu(gate) * up element-wise (gate, up: (rows, n)).", py::arg("gate"),
      py::arg("up"), py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "rope_inv_freq",
      [](int64_t head_dim, double theta, const std::string& type, double factor, double low, double high,
         double original_max) {
        RopeParams p;
        p.theta = theta;
        if (type == "llama3")
          p.type = RopeParams::Type::Llama3;
        else if (type != "default")
          throw InvalidInputError("rope type must be default or llama3");
        p.factor = factor;
        p.low_freq_factor = low;
        p.high_freq_factor = high;
        p.original_max_position_embeddings = original_max;
        F32 out({py::ssize_t(head_dim / 2)});
        kernels::rope_inv_freq(out.mutable_data(), head_dim, p);
        return out;
      },
      py::arg("head_dim"), py::arg("theta"), py::arg("type") = "default", py::arg("factor") = 1.0,
      py::arg("low_freq_factor") = 1.0, py::arg("high_freq_factor") = 1.0,
      py::arg("original_max_position_embeddings") = 8192.0);

  m.def(
      "rope_interleaved",
      [](F32 x, I32 positions, F32 inv_freq, const std::string& device) {
        expect(x.ndim() == 3, "x must be (tokens, heads, head_dim), got " + shape_of(x));
        const int64_t T = x.shape(0), heads = x.shape(1), d = x.shape(2);
        expect(positions.ndim() == 1 && positions.shape(0) == T, "positions must be (" + std::to_string(T) + ",)");
        expect(inv_freq.ndim() == 1 && inv_freq.shape(0) == d / 2 && d % 2 == 0,
               "inv_freq must be (" + std::to_string(d / 2) + ",) for an even head_dim");
        F32 out({T, heads, d});
        OnDevice dev(device);
        float* dx = dev.put<float>(x.data(), nbytes(x));
        const int32_t* dp = dev.put<const int32_t>(positions.data(), nbytes(positions));
        const float* df = dev.put<const float>(inv_freq.data(), nbytes(inv_freq));
        kernels::rope_interleaved(dev.stream(), dx, heads * d, T, heads, d, dp, df);
        dev.get(out.mutable_data(), dx, nbytes(out));
        return out;
      },
      "rope_interleaved(x, positions, inv_freq, *, device='cpu') -> y: x (tokens, heads, head_dim) with pairs\n"
      "(2i, 2i+1) rotated by float(positions[t]) * inv_freq[i].",
      py::arg("x"), py::arg("positions"), py::arg("inv_freq"), py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "embedding",
      [](const py::array& table, const py::array& id_array, const std::string& dtype, const std::string& device,
         bool check_ids) {
        const I32 ids = token_ids(id_array, "ids");
        const Typed t = typed(table, dtype, "table");
        expect(t.array.ndim() == 2, "table must be 2-D, got shape " + shape_of(t.array));
        const int64_t vocab = t.dim(0), dim = t.dim(1), tokens = ids.shape(0);
        F32 out({py::ssize_t(tokens), py::ssize_t(dim)});
        OnDevice d(device);
        // The CUDA kernel cannot throw for an id outside the vocabulary (it writes zeros): the
        // ids are checked here, on the host, with the CPU kernel's message.
        if (check_ids && parse_device(device).type != DeviceType::CPU)
          for (int64_t i = 0; i < tokens; ++i)
            if (ids.data()[i] < 0 || ids.data()[i] >= vocab)
              throw InvalidInputError("token id " + std::to_string(ids.data()[i]) + " at index " + std::to_string(i) +
                                      " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
        const void* dt = d.put(t.data(), nbytes(t.array));
        const int32_t* di = d.put<const int32_t>(ids.data(), nbytes(ids));
        float* dout = d.put<float>(nullptr, nbytes(out));
        kernels::embedding(d.stream(), dout, dt, t.dtype, vocab, dim, di, tokens);
        d.get(out.mutable_data(), dout, nbytes(out));
        return out;
      },
      "embedding(table, ids, dtype='float32', *, device='cpu', check_ids=True) -> float32 rows table[ids].\n"
      "An id outside [0, vocab) raises InvalidInputError; on CUDA with check_ids=False it gives a row of zeros.",
      py::arg("table"), py::arg("ids"), py::arg("dtype") = "float32", py::kw_only(), py::arg("device") = "cpu",
      py::arg("check_ids") = true);

  m.def(
      "to_fp8_e4m3",
      [](F32 x) {
        py::array_t<uint8_t> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
        for (py::ssize_t i = 0; i < x.size(); ++i) out.mutable_data()[i] = to_fp8_e4m3(x.data()[i]).bits;
        return out;
      },
      py::arg("x"), "float32 -> fp8 e4m3 codes (uint8): round to nearest even, saturating to +-448");

  m.def(
      "from_fp8_e4m3",
      [](const py::array& codes) {
        if (!codes.dtype().is(py::dtype::of<uint8_t>()))
          throw DTypeError("fp8 e4m3 codes must be a numpy uint8 array, got " + std::string(py::str(codes.dtype())));
        const auto b = py::array_t<uint8_t, py::array::c_style>::ensure(codes);
        F32 out(std::vector<py::ssize_t>(b.shape(), b.shape() + b.ndim()));
        for (py::ssize_t i = 0; i < b.size(); ++i) out.mutable_data()[i] = to_float(fp8_e4m3{b.data()[i]});
        return out;
      },
      py::arg("codes"), "fp8 e4m3 codes (uint8) -> their float32 values (exact; 0x7f and 0xff are NaN)");

  m.def(
      "argmax",
      [](F32 logits, const std::string& device) {
        expect(logits.ndim() == 2, "logits must be 2-D, got " + shape_of(logits));
        I32 out({logits.shape(0)});
        OnDevice d(device);
        const float* dl = d.put<const float>(logits.data(), nbytes(logits));
        int32_t* dout = d.put<int32_t>(nullptr, nbytes(out));
        kernels::argmax(d.stream(), dout, dl, logits.shape(0), logits.shape(1));
        d.get(out.mutable_data(), dout, nbytes(out));
        return out;
      },
      "argmax(logits, *, device='cpu') -> int32 index of each row's largest logit (the lowest among ties).",
      py::arg("logits"), py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "kv_cache_copy_pages",
      [](const py::array& pool, int64_t page_bytes, I32 src, I32 dst, const std::string& device) {
        expect(pool.flags() & py::array::c_style, "pool must be C-contiguous");
        expect(page_bytes > 0, "page_bytes must be positive, got " + std::to_string(page_bytes));
        const int64_t bytes = int64_t(pool.nbytes()), pages = bytes / page_bytes;
        expect(src.ndim() == 1 && dst.ndim() == 1 && src.shape(0) == dst.shape(0),
               "src and dst must be 1-D of one length, got " + shape_of(src) + " and " + shape_of(dst));
        const int64_t count = src.shape(0);
        for (int64_t i = 0; i < count; ++i)
          if (src.data()[i] < 0 || src.data()[i] >= pages || dst.data()[i] < 0 || dst.data()[i] >= pages)
            throw InvalidInputError("page pair " + std::to_string(i) + " is outside the pool's " + std::to_string(pages) +
                                    " pages");
        py::array out(pool.dtype(), std::vector<py::ssize_t>(pool.shape(), pool.shape() + pool.ndim()));
        OnDevice d(device);
        void* dp = d.put(pool.data(), size_t(bytes));
        const int32_t* ds = d.put<const int32_t>(src.data(), nbytes(src));
        const int32_t* dd = d.put<const int32_t>(dst.data(), nbytes(dst));
        kernels::kv_cache_copy_pages(d.stream(), dp, page_bytes, ds, dd, count);
        d.get(out.mutable_data(), dp, size_t(bytes));
        return out;
      },
      "kv_cache_copy_pages(pool, page_bytes, src, dst, *, device='cpu') -> a copy of pool (any C-contiguous array,\n"
      "taken as bytes) with page src[i] copied to page dst[i].",
      py::arg("pool"), py::arg("page_bytes"), py::arg("src"), py::arg("dst"), py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "sample",
      [](F32 logits, F32 uniform, F32 temperature, I32 top_k, F32 top_p, F32 min_p, const std::string& device) {
        expect(logits.ndim() == 2, "logits must be 2-D, got " + shape_of(logits));
        const int64_t rows = logits.shape(0);
        expect(uniform.size() == rows, "uniform needs one value per row");
        // Each setting is one value for every row or one per row.
        const auto at = [rows](const auto& a, const char* name, int64_t r) {
          expect(a.size() == 1 || a.size() == rows, std::string(name) + " needs 1 or " + std::to_string(rows) + " values");
          return a.data()[a.size() == 1 ? 0 : r];
        };
        std::vector<SamplerRow> settings(static_cast<size_t>(rows));
        for (int64_t r = 0; r < rows; ++r)
          settings[r] = {at(temperature, "temperature", r), at(top_k, "top_k", r), at(top_p, "top_p", r),
                         at(min_p, "min_p", r)};
        I32 out({rows});
        OnDevice d(device);
        const float* dl = d.put<const float>(logits.data(), nbytes(logits));
        const SamplerRow* ds = d.put<const SamplerRow>(settings.data(), settings.size() * sizeof(SamplerRow));
        const float* du = d.put<const float>(uniform.data(), nbytes(uniform));
        int32_t* dout = d.put<int32_t>(nullptr, nbytes(out));
        kernels::sample(d.stream(), dout, dl, rows, logits.shape(1), ds, du);
        d.get(out.mutable_data(), dout, nbytes(out));
        return out;
      },
      py::arg("logits"), py::arg("uniform"), py::kw_only(), py::arg("temperature"), py::arg("top_k") = 0,
      py::arg("top_p") = 1.f, py::arg("min_p") = 0.f, py::arg("device") = "cpu");

  m.def(
      "apply_penalties",
      [](F32 logits, I64 offsets, const py::array& ids, I32 output_counts, F32 repetition, F32 presence,
         F32 frequency, const std::string& device) {
        expect(logits.ndim() == 2, "logits must be 2-D, got " + shape_of(logits));
        const int64_t rows = logits.shape(0), vocab = logits.shape(1);
        const I32 tokens = token_ids(ids, "token_ids");
        expect(offsets.ndim() == 1 && offsets.shape(0) == rows + 1, "offsets must be (" + std::to_string(rows + 1) + ",)");
        expect(output_counts.size() == tokens.size(), "output_counts needs one value per token id");
        for (int64_t r = 0; r < rows; ++r)
          expect(offsets.data()[r] >= 0 && offsets.data()[r] <= offsets.data()[r + 1] &&
                     offsets.data()[r + 1] <= tokens.size(),
                 "offsets must rise from 0 to len(token_ids)");
        for (py::ssize_t e = 0; e < tokens.size(); ++e)
          expect(tokens.data()[e] >= 0 && tokens.data()[e] < vocab, "token id outside the vocabulary");
        expect(repetition.size() == rows && presence.size() == rows && frequency.size() == rows,
               "repetition, presence and frequency need one value per row");
        std::vector<PenaltyRow> penalties(static_cast<size_t>(rows));
        for (int64_t r = 0; r < rows; ++r)
          penalties[r] = {repetition.data()[r], presence.data()[r], frequency.data()[r]};
        F32 out({rows, vocab});
        OnDevice d(device);
        float* dl = d.put<float>(logits.data(), nbytes(logits));
        const int64_t* doff = d.put<const int64_t>(offsets.data(), nbytes(offsets));
        const int32_t* dids = d.put<const int32_t>(tokens.data(), nbytes(tokens));
        const int32_t* dcounts = d.put<const int32_t>(output_counts.data(), nbytes(output_counts));
        const PenaltyRow* dpen = d.put<const PenaltyRow>(penalties.data(), penalties.size() * sizeof(PenaltyRow));
        kernels::apply_penalties(d.stream(), dl, rows, vocab, doff, dids, dcounts, dpen);
        d.get(out.mutable_data(), dl, nbytes(out));
        return out;
      },
      "apply_penalties(logits, offsets, token_ids, output_counts, repetition, presence, frequency, *, device='cpu')\n"
      "-> logits with row r's entries [offsets[r], offsets[r + 1]) penalized (corral/kernels/sampling.h).",
      py::arg("logits"), py::arg("offsets"), py::arg("token_ids"), py::arg("output_counts"), py::arg("repetition"),
      py::arg("presence"), py::arg("frequency"), py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "apply_token_mask",
      [](F32 logits, const py::array& row_ids, const py::array_t<uint32_t, py::array::c_style>& mask,
         const std::string& device) {
        expect(logits.ndim() == 2, "logits must be 2-D, got " + shape_of(logits));
        const int64_t rows = logits.shape(0), vocab = logits.shape(1), words = (vocab + 31) / 32;
        const I32 ids = token_ids(row_ids, "rows");
        const int64_t count = ids.size();
        expect(mask.ndim() == 2 && mask.shape(0) == count && mask.shape(1) == words,
               "mask must be (" + std::to_string(count) + ", " + std::to_string(words) + ") uint32, got " +
                   shape_of(mask));
        std::vector<bool> seen(size_t(rows), false);
        for (int64_t i = 0; i < count; ++i) {
          const int32_t r = ids.data()[i];
          expect(r >= 0 && r < rows && !seen[size_t(r)], "rows must be distinct rows of logits");
          seen[size_t(r)] = true;
        }
        F32 out({rows, vocab});
        OnDevice d(device);
        float* dl = d.put<float>(logits.data(), nbytes(logits));
        const int32_t* dr = d.put<const int32_t>(ids.data(), nbytes(ids));
        const uint32_t* dm = d.put<const uint32_t>(mask.data(), nbytes(mask));
        kernels::apply_token_mask(d.stream(), dl, vocab, count, dr, dm);
        d.get(out.mutable_data(), dl, nbytes(out));
        return out;
      },
      "apply_token_mask(logits, rows, mask, *, device='cpu') -> logits where row rows[i] keeps the tokens whose "
      "bit is set in mask[i] (uint32 words, bit t % 32 of word t / 32) and the others are -inf "
      "(corral/kernels/sampling.h).",
      py::arg("logits"), py::arg("rows"), py::arg("mask"), py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "logprobs",
      [](F32 logits, const py::array& chosen_ids, int64_t top_n, const std::string& device) {
        expect(logits.ndim() == 2, "logits must be 2-D, got " + shape_of(logits));
        const int64_t rows = logits.shape(0), vocab = logits.shape(1);
        const I32 chosen = token_ids(chosen_ids, "chosen");
        expect(chosen.size() == rows, "chosen needs one token id per row");
        for (int64_t r = 0; r < rows; ++r)
          if (chosen.data()[r] < 0 || chosen.data()[r] >= vocab)
            throw InvalidInputError("chosen: token id " + std::to_string(chosen.data()[r]) + " is outside the vocabulary");
        if (top_n < 0 || top_n > vocab)
          throw InvalidInputError("top_n " + std::to_string(top_n) + " is not in [0, " + std::to_string(vocab) + "]");
        F32 lp({rows});
        I32 ids({rows, top_n});
        F32 top({rows, top_n});
        OnDevice d(device);
        const float* dl = d.put<const float>(logits.data(), nbytes(logits));
        const int32_t* dc = d.put<const int32_t>(chosen.data(), nbytes(chosen));
        float* dlp = d.put<float>(nullptr, nbytes(lp));
        int32_t* dids = d.put<int32_t>(nullptr, nbytes(ids));
        float* dtop = d.put<float>(nullptr, nbytes(top));
        kernels::logprobs(d.stream(), dl, rows, vocab, dc, dlp, top_n, dids, dtop);
        d.get(lp.mutable_data(), dlp, nbytes(lp));
        d.get(ids.mutable_data(), dids, nbytes(ids));
        d.get(top.mutable_data(), dtop, nbytes(top));
        return py::make_tuple(lp, ids, top);
      },
      "logprobs(logits, chosen, top_n, *, device='cpu') -> (chosen_logprob (rows,), top_ids (rows, top_n),\n"
      "top_logprobs (rows, top_n)): log_softmax of each row at its chosen token and at its top_n largest\n"
      "logits, in descending order (ties: lower id first).",
      py::arg("logits"), py::arg("chosen"), py::arg("top_n"), py::kw_only(), py::arg("device") = "cpu");

  m.def(
      "kv_cache_write",
      [](py::array k_cache, py::array v_cache, const std::string& dtype, F32 k, F32 v, I64 slots, py::object k_scale,
         py::object v_scale, const std::string& device) {
        PagedArrays p = paged(k_cache, v_cache, dtype, k_scale, v_scale);
        const PagedKv& c = p.kv;
        const int64_t T = slots.shape(0), width = int64_t(c.kv_heads) * c.head_dim;
        expect(k.ndim() == 2 && k.shape(0) == T && k.shape(1) == width && v.ndim() == 2 && v.shape(0) == T &&
                   v.shape(1) == width,
               "k and v must be (" + std::to_string(T) + ", " + std::to_string(width) + ")");
        for (int64_t t = 0; t < T; ++t)
          if (slots.data()[t] < 0 || slots.data()[t] >= c.num_blocks * c.block_size)
            throw InvalidInputError("slot " + std::to_string(slots.data()[t]) + " is outside the cache");
        const Device dev = parse_device(device);
        if (dev.type == DeviceType::CPU) {
          kernels::kv_cache_write(kCpu, c, k.data(), v.data(), width, T, slots.data());
          return;
        }
        // On a GPU: upload the caches (unwritten slots keep their contents), run, copy them back.
        StreamOwner stream(dev);
        DeviceCache dc = upload_cache(dev, p, stream.get());
        const size_t xbytes = size_t(T * width) * sizeof(float);
        DeviceBuffer dk = upload(dev, k.data(), xbytes, stream.get()), dv = upload(dev, v.data(), xbytes, stream.get());
        DeviceBuffer ds = upload(dev, slots.data(), size_t(T) * sizeof(int64_t), stream.get());
        kernels::kv_cache_write(stream.get(), dc.kv, static_cast<const float*>(dk.data()),
                                static_cast<const float*>(dv.data()), width, T, static_cast<const int64_t*>(ds.data()));
        download_cache(dc, p, stream.get());
        stream.synchronize();
      },
      py::arg("k_cache"), py::arg("v_cache"), py::arg("dtype"), py::arg("k"), py::arg("v"), py::arg("slots"),
      py::kw_only(), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(), py::arg("device") = "cpu");

  m.def(
      "paged_attention",
      [](F32 q, py::array k_cache, py::array v_cache, const std::string& dtype, I32 seq_starts, I32 positions,
         I32 block_tables, float scale, int64_t chunk_size, py::object k_scale, py::object v_scale,
         py::object table_rows_arg, const std::string& device, int repeat) -> py::object {
        const PagedArrays p = paged(k_cache, v_cache, dtype, k_scale, v_scale);
        const PagedKv& c = p.kv;
        expect(q.ndim() == 3 && q.shape(2) == c.head_dim, "q must be (rows, heads, head_dim), got " + shape_of(q));
        const int64_t rows = q.shape(0), heads = q.shape(1);
        const int64_t S = seq_starts.shape(0) - 1;
        // Sequence s reads row table_rows[s] of block_tables (default: row s).
        std::vector<int32_t> table_rows(size_t(std::max<int64_t>(S, 0)));
        for (int64_t s = 0; s < S; ++s) table_rows[size_t(s)] = int32_t(s);
        if (!table_rows_arg.is_none()) {
          const I32 given = table_rows_arg.cast<I32>();
          expect(given.ndim() == 1 && given.shape(0) == S, "table_rows must have one entry per sequence");
          std::copy_n(given.data(), S, table_rows.begin());
        }
        expect(S >= 0 && block_tables.ndim() == 2 && (S == 0 || block_tables.shape(0) > 0),
               "block_tables must be (rows, max_blocks) with num_seqs = len(seq_starts) - 1");
        for (int64_t s = 0; s < S; ++s)
          expect(table_rows[size_t(s)] >= 0 && table_rows[size_t(s)] < block_tables.shape(0),
                 "table_rows[" + std::to_string(s) + "] = " + std::to_string(table_rows[size_t(s)]) +
                     " is not a row of block_tables");
        expect(heads > 0 && heads % c.kv_heads == 0,
               "q's heads (" + std::to_string(heads) + ") must be a multiple of the cache's KV heads (" +
                   std::to_string(c.kv_heads) + ")");
        expect(seq_starts.ndim() == 1 && positions.ndim() == 1 && positions.shape(0) == rows &&
                   seq_starts.data()[S] == rows && seq_starts.data()[0] == 0,
               "positions must have one entry per row, and seq_starts must run from 0 to rows");
        for (int64_t s = 0; s < S; ++s)
          expect(seq_starts.data()[s] <= seq_starts.data()[s + 1],
                 "seq_starts must not decrease: seq_starts[" + std::to_string(s) + "] = " +
                     std::to_string(seq_starts.data()[s]) + " > seq_starts[" + std::to_string(s + 1) + "]");
        if (repeat < 0) throw InvalidInputError("repeat must be >= 0");
        const int32_t mb = int32_t(block_tables.shape(1));
        for (int64_t s = 0; s < S; ++s)
          for (int64_t r = seq_starts.data()[s]; r < seq_starts.data()[s + 1]; ++r) {
            const int64_t blk = positions.data()[r] / c.block_size;
            expect(positions.data()[r] >= 0 && blk < mb, "position " + std::to_string(positions.data()[r]) +
                                                              " of row " + std::to_string(r) + " is beyond its block table");
            for (int64_t b = 0; b <= blk; ++b) {
              const int32_t id = block_tables.data()[int64_t(table_rows[size_t(s)]) * mb + b];
              if (id < 0 || id >= c.num_blocks) throw InvalidInputError("block id " + std::to_string(id) + " is outside the cache");
            }
          }
        const AttentionBatch batch{seq_starts.data(), int32_t(S), positions.data(), block_tables.data(),
                                   table_rows.data(), mb};
        F32 out({rows, heads, py::ssize_t(c.head_dim)});
        float* out_data = out.mutable_data();
        const Device dev = parse_device(device);
        double seconds = 0.0;
        {
          py::gil_scoped_release release;
          if (dev.type == DeviceType::CPU) {
            kernels::paged_attention(kCpu, out_data, q.data(), heads, c, batch, scale, chunk_size);
            if (repeat > 0) {
              std::vector<float> scratch(size_t(rows * heads * c.head_dim));
              const auto t0 = std::chrono::steady_clock::now();
              for (int i = 0; i < repeat; ++i)
                kernels::paged_attention(kCpu, scratch.data(), q.data(), heads, c, batch, scale, chunk_size);
              seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / repeat;
            }
          } else {
            // On a GPU: upload the caches, q and the batch arrays; run; copy out back.
            StreamOwner stream(dev);
            const DeviceCache dc = upload_cache(dev, p, stream.get());
            const size_t qbytes = size_t(rows * heads * c.head_dim) * sizeof(float);
            const DeviceBuffer dq = upload(dev, q.data(), qbytes, stream.get());
            const DeviceBuffer dstarts = upload(dev, seq_starts.data(), size_t(S + 1) * 4, stream.get());
            const DeviceBuffer dpos = upload(dev, positions.data(), size_t(rows) * 4, stream.get());
            const DeviceBuffer dtables = upload(dev, block_tables.data(), size_t(block_tables.size()) * 4, stream.get());
            const DeviceBuffer drows = upload(dev, table_rows.data(), size_t(S) * 4, stream.get());
            DeviceBuffer dout(dev, qbytes);
            const AttentionBatch db{static_cast<const int32_t*>(dstarts.data()), int32_t(S),
                                    static_cast<const int32_t*>(dpos.data()),
                                    static_cast<const int32_t*>(dtables.data()),
                                    static_cast<const int32_t*>(drows.data()), mb};
            const float* dqp = static_cast<const float*>(dq.data());
            kernels::paged_attention(stream.get(), static_cast<float*>(dout.data()), dqp, heads, dc.kv, db, scale,
                                     chunk_size);
            if (qbytes) copy_to_host(out_data, dout, qbytes, stream.get());
            stream.synchronize();
            if (repeat > 0) {  // more runs on the resident inputs, timed between two synchronisations
              DeviceBuffer scratch(dev, qbytes);
              const auto t0 = std::chrono::steady_clock::now();
              for (int i = 0; i < repeat; ++i)
                kernels::paged_attention(stream.get(), static_cast<float*>(scratch.data()), dqp, heads, dc.kv, db,
                                         scale, chunk_size);
              stream.synchronize();
              seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / repeat;
            }
          }
        }
        if (repeat > 0) return py::make_tuple(out, seconds);
        return std::move(out);
      },
      "paged_attention(q, k_cache, v_cache, dtype, seq_starts, positions, block_tables, scale, chunk_size=0, *,\n"
      "k_scale=None, v_scale=None, table_rows=None, device='cpu', repeat=0) -> out: attention of q (rows, heads,\n"
      "head_dim) over the paged cache; sequence s reads row table_rows[s] of block_tables (default: row s).\n"
      "device: cpu, cuda or cuda:N (the cache and inputs are uploaded). repeat=n > 0 also runs the op n more\n"
      "times on the resident inputs and returns (out, seconds per run).",
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("dtype"), py::arg("seq_starts"),
      py::arg("positions"), py::arg("block_tables"), py::arg("scale"), py::arg("chunk_size") = 0, py::kw_only(),
      py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(), py::arg("table_rows") = py::none(),
      py::arg("device") = "cpu", py::arg("repeat") = 0);

  m.def(
      "attn_temperature_scale",
      [](F32 q, I32 positions, float attn_scale, float floor_scale, const std::string& device) {
        expect(q.ndim() == 2 && positions.shape(0) == q.shape(0), "q must be (rows, width) with one position per row");
        const int64_t rows = q.shape(0), width = q.shape(1);
        F32 out({rows, width});
        const Device dev = parse_device(device);
        if (dev.type == DeviceType::CPU) {
          std::copy(q.data(), q.data() + q.size(), out.mutable_data());
          kernels::attn_temperature_scale(kCpu, out.mutable_data(), width, rows, width, positions.data(), attn_scale,
                                          floor_scale);
          return out;
        }
        StreamOwner stream(dev);
        const size_t qbytes = size_t(rows * width) * sizeof(float);
        DeviceBuffer dq = upload(dev, q.data(), qbytes, stream.get());
        const DeviceBuffer dpos = upload(dev, positions.data(), size_t(rows) * 4, stream.get());
        kernels::attn_temperature_scale(stream.get(), static_cast<float*>(dq.data()), width, rows, width,
                                        static_cast<const int32_t*>(dpos.data()), attn_scale, floor_scale);
        if (qbytes) copy_to_host(out.mutable_data(), dq, qbytes, stream.get());
        stream.synchronize();
        return out;
      },
      py::arg("q"), py::arg("positions"), py::arg("attn_scale"), py::arg("floor_scale"), py::kw_only(),
      py::arg("device") = "cpu");

  m.def(
      "swiglu_mlp",
      [](F32 x, const py::array& gate, const py::array& up, const py::array& down, const std::string& dtype,
         const std::string& act, const std::string& device, const std::string& layout) {
        const kernels::Activations a = parse_activations(act);
        const Typed g = typed(gate, dtype, "gate"), u = typed(up, dtype, "up"), d = typed(down, dtype, "down");
        const MatrixRef mg = matrix(g, layout, "gate"), mu = matrix(u, layout, "up"), md = matrix(d, layout, "down");
        expect(x.ndim() == 2 && x.shape(1) == mg.in && mu.in == mg.in && mu.out == mg.out && md.in == mg.out &&
                   md.out == mg.in,
               "expected x (rows, H), gate and up (I, H), down (H, I)");
        if (parse_device(device).type == DeviceType::CPU) {
          const kernels::PackedStorage gu = kernels::allocate_packed(kernels::packed_glu_bytes(mg));
          const kernels::PackedStorage dn = kernels::allocate_packed(kernels::packed_bytes(md));
          return swiglu_rows(x, kernels::pack_glu(gu.get(), mg, mu), kernels::pack_weights(dn.get(), md), a);
        }
        // CUDA reads gate and up as one matrix whose outputs are the gate's, then the up's: out_in
        // [2I, H] (gate rows, then up rows), in_out [H, 2I] (each row: the gate's, then the up's).
        const int64_t H = mg.in, I = mg.out, rows = x.shape(0);
        const size_t part = size_t(mg.layout == WeightLayout::OutIn ? I * H : I) * dtype_size(g.dtype);
        const int64_t parts = mg.layout == WeightLayout::OutIn ? 1 : H;
        std::vector<char> gate_up(2 * part * size_t(parts));
        for (int64_t i = 0; i < parts; ++i) {
          std::memcpy(gate_up.data() + 2 * i * part, static_cast<const char*>(g.data()) + i * part, part);
          std::memcpy(gate_up.data() + (2 * i + 1) * part, static_cast<const char*>(u.data()) + i * part, part);
        }
        F32 out({rows, H});
        std::fill(out.mutable_data(), out.mutable_data() + out.size(), 0.f);
        OnDevice on(device);
        const MatrixRef mgu{on.put(gate_up.data(), gate_up.size()), g.dtype, mg.layout, H, 2 * I};
        MatrixRef mdn = md;
        mdn.data = on.put(d.data(), nbytes(d.array));
        float* dout = on.put<float>(out.data(), nbytes(out));
        kernels::swiglu_mlp(on.stream(), dout, on.put<const float>(x.data(), nbytes(x)), rows, mgu, mdn, a);
        on.get(out.mutable_data(), dout, nbytes(out));
        return out;
      },
      "swiglu_mlp(x, gate, up, down, dtype='float32', activations='native', *, device='cpu', layout='out_in')\n"
      "-> (silu(x . gate) * (x . up)) . down; gate, up and down in `layout` (out_in: (I, H), (I, H), (H, I)).",
      py::arg("x"), py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("dtype") = "float32",
      py::arg("activations") = "native", py::kw_only(), py::arg("device") = "cpu", py::arg("layout") = "out_in");

  m.def(
      "moe",
      [](F32 x, const py::array& router, const py::array& gate_up, const py::array& down, const py::array& shared_gate,
         const py::array& shared_up, const py::array& shared_down, int top_k, const std::string& dtype,
         const std::string& device, int repeat, const std::string& act) -> py::tuple {
        const kernels::Activations a = parse_activations(act);
        const Device dev = parse_device(device);
        if (repeat < 0) throw InvalidInputError("repeat must be >= 0");
        const Typed r = typed(router, dtype, "router"), gu = typed(gate_up, dtype, "gate_up"),
                    dn = typed(down, dtype, "down"), sg = typed(shared_gate, dtype, "shared_gate"),
                    su = typed(shared_up, dtype, "shared_up"), sd = typed(shared_down, dtype, "shared_down");
        expect(x.ndim() == 2, "x must be (tokens, hidden), got " + shape_of(x));
        const int64_t T = x.shape(0), H = x.shape(1);
        const MoeWeights w = moe_weights(r, gu, dn, sg, su, sd, H);
        const int64_t E = w.num_experts;
        F32 out({T, H});
        std::fill(out.mutable_data(), out.mutable_data() + out.size(), 0.f);
        I64 counts({E});
        std::fill(counts.mutable_data(), counts.mutable_data() + E, 0);
        float* out_data = out.mutable_data();
        int64_t* counts_data = counts.mutable_data();
        const size_t xbytes = size_t(T * H) * sizeof(float), cbytes = size_t(E) * sizeof(int64_t);
        double seconds = 0.0;
        // repeat > 0: that many more runs on the same (resident) inputs into scratch outputs, timed.
        {
          py::gil_scoped_release release;
          if (dev.type == DeviceType::CPU) {
            // Packed as a model packs them at load (not timed).
            const kernels::PackedStorage packed = kernels::allocate_packed(kernels::packed_moe_bytes(w));
            const MoeWeights wp = kernels::pack_moe(packed.get(), w);
            kernels::moe(kCpu, out_data, x.data(), T, wp, top_k, counts_data, a);
            if (repeat > 0) {
              std::vector<float> scratch_out(static_cast<size_t>(T * H));
              std::vector<int64_t> scratch_counts(static_cast<size_t>(E));
              const auto t0 = std::chrono::steady_clock::now();
              for (int i = 0; i < repeat; ++i)
                kernels::moe(kCpu, scratch_out.data(), x.data(), T, wp, top_k, scratch_counts.data(), a);
              seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / repeat;
            }
          } else {
            // On a GPU: upload x, the weights, out (zeros) and counts (zeros); run; copy out and counts back.
            StreamOwner stream(dev);
            if (T > 0) {
              const Typed* weights[] = {&r, &gu, &dn, &sg, &su, &sd};
              std::vector<DeviceBuffer> dw;
              dw.reserve(6);
              for (const Typed* t : weights) {
                const size_t bytes = size_t(t->array.nbytes());
                dw.emplace_back(dev, bytes);
                copy_to_device(dw.back(), t->data(), bytes, stream.get());
              }
              DeviceBuffer dx(dev, xbytes), dout(dev, xbytes), dcounts(dev, cbytes);
              copy_to_device(dx, x.data(), xbytes, stream.get());
              copy_to_device(dout, out_data, xbytes, stream.get());
              copy_to_device(dcounts, counts_data, cbytes, stream.get());
              MoeWeights wd = w;
              wd.router.data = dw[0].data();
              wd.gate_up = dw[1].data();
              wd.down = dw[2].data();
              wd.shared_gate.data = dw[3].data();
              wd.shared_up.data = dw[4].data();
              wd.shared_down.data = dw[5].data();
              const float* dxp = static_cast<const float*>(dx.data());
              kernels::moe(stream.get(), static_cast<float*>(dout.data()), dxp, T, wd, top_k,
                           static_cast<int64_t*>(dcounts.data()));
              copy_to_host(out_data, dout, xbytes, stream.get());
              copy_to_host(counts_data, dcounts, cbytes, stream.get());
              stream.synchronize();
              if (repeat > 0) {
                DeviceBuffer scratch_out(dev, xbytes), scratch_counts(dev, cbytes);
                const auto t0 = std::chrono::steady_clock::now();
                for (int i = 0; i < repeat; ++i)
                  kernels::moe(stream.get(), static_cast<float*>(scratch_out.data()), dxp, T, wd, top_k,
                               static_cast<int64_t*>(scratch_counts.data()));
                stream.synchronize();
                seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / repeat;
              }
            }
          }
        }
        if (repeat > 0) return py::make_tuple(out, counts, seconds);
        return py::make_tuple(out, counts);
      },
      "moe(x, router, gate_up, down, shared_gate, shared_up, shared_down, top_k, dtype, device) -> (out, counts):\n"
      "out = the MoE of x (added to zeros), counts = tokens per expert. device: cpu, cuda or cuda:N (inputs\n"
      "are uploaded). repeat=n > 0 also runs the op n more times on the resident inputs and returns\n"
      "(out, counts, seconds per run).",
      py::arg("x"), py::arg("router"), py::arg("gate_up"), py::arg("down"), py::arg("shared_gate"),
      py::arg("shared_up"), py::arg("shared_down"), py::arg("top_k"), py::arg("dtype") = "float32",
      py::arg("device") = "cpu", py::arg("repeat") = 0, py::arg("activations") = "native");
}

}  // namespace corral::bindings
