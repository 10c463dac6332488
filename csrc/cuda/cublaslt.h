// cuBLASLt, loaded at run time with dlopen. Why not linked: libcublasLt.so.13 is 551 MB (the
// nvidia-cublas wheel 444 MB compressed); linked statically it would make every Corral wheel
// hundreds of MB, past PyPI's default size limit, and linked dynamically `import corral` would fail
// on every machine without it. So the first product that wants it looks, in order, for:
//   1. the file named by the environment variable CORRAL_CUBLASLT_LIBRARY (`import corral` sets it
//      to the nvidia-cublas pip package's nvidia/cu13/lib/libcublasLt.so.13 when that is
//      installed and the variable is not set: python/corral/cuda_libs.py);
//   2. libcublasLt.so.13, then libcublasLt.so.12, on the loader's search path.
// Without it (or with CORRAL_CUBLASLT_LIBRARY=none) the products run on Corral's own kernels
// (csrc/cuda/linear.cu).
#pragma once

#include <string>

#include "cublaslt_api.h"

namespace corral::cuda {

// The entry points Corral calls (cublaslt_api.h declares their types).
struct CublasLt {
  lt::cublasLtCreate_fn create;
  lt::cublasLtGetVersion_fn get_version;
  lt::cublasLtGetStatusName_fn status_name;
  lt::cublasLtMatmulDescCreate_fn matmul_desc_create;
  lt::cublasLtMatmulDescDestroy_fn matmul_desc_destroy;
  lt::cublasLtMatmulDescSetAttribute_fn matmul_desc_set;
  lt::cublasLtMatrixLayoutCreate_fn layout_create;
  lt::cublasLtMatrixLayoutDestroy_fn layout_destroy;
  lt::cublasLtMatmulPreferenceCreate_fn preference_create;
  lt::cublasLtMatmulPreferenceDestroy_fn preference_destroy;
  lt::cublasLtMatmulPreferenceSetAttribute_fn preference_set;
  lt::cublasLtMatmulAlgoGetHeuristic_fn heuristic;
  lt::cublasLtMatmul_fn matmul;
};

// The library, loaded on the first call from any thread (never unloaded); null when none of the
// candidates loads, or one that loads lacks an entry point or is not cuBLAS 12 or 13.
const CublasLt* cublaslt();

// "cuBLASLt 131000 from /path/libcublasLt.so.13", or why it is not loaded (each candidate's
// error). Loads it if that was not tried yet.
const std::string& cublaslt_status();

}  // namespace corral::cuda
