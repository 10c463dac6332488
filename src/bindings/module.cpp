#include <omp.h>

#include "bindings.h"
#include "corral/device.h"
#include "corral/kernels/linear.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "Corral's C++ core: the engine, the model and the kernels";
  corral::bindings::register_errors(m);
  corral::bindings::register_engine(m);
  corral::bindings::register_kv_cache(m);
  py::module_ ops = m.def_submodule("ops", "Kernels on numpy arrays (for tests and benchmarks)");
  corral::bindings::register_ops(ops);

  m.def("cuda_backend_built", &corral::cuda_backend_built, "Whether this build has the CUDA backend");
  m.def("cuda_device_count", &corral::cuda_device_count, "Usable CUDA devices (0 without a driver or GPU)");
  m.def("cuda_status", &corral::cuda_status, "One line on CUDA's state here");
  m.def("cuda_blas_status", &corral::kernels::cuda_blas_status,
        "The library behind CUDA's products of 16-bit weights and fp8 prefill: 'cuBLASLt <version> from <path>', why "
        "it is not loaded (Corral's own kernels run instead), or 'not built'. Loads it.");
  m.def("cuda_fp8_tensor_products", &corral::kernels::cuda_fp8_tensor_products, py::arg("rows"), py::arg("in"),
        py::arg("out"),
        "Whether CUDA's fp8 products of rows x [in -> out] with per-output scales and per-token activations run on "
        "fp8 tensor cores (cuBLASLt) on the current device; False without CUDA");
  m.def("num_threads", [] { return omp_get_max_threads(); }, "Threads the CPU kernels use");
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); }, py::arg("n"));
}
