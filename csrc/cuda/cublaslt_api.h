// The part of cuBLASLt's C API that Corral calls, declared here because cuBLAS's headers are not
// installed where Corral is built (the library is loaded at run time: csrc/cuda/cublaslt.h). The
// names, values and layouts are cublasLt.h's (cuBLAS 12 and 13 agree on all of them); where a real
// cublasLt.h is found at build time, cublaslt_api_check.cpp checks every one against it. Opaque
// types are pointers to incomplete structs; enums have the C enums' size (int).
#pragma once

#include <cuda_runtime_api.h>
#include <library_types.h>

#include <cstddef>
#include <cstdint>

namespace corral::cuda::lt {

enum cublasStatus_t : int {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};

enum cublasComputeType_t : int { CUBLAS_COMPUTE_32F = 68 };

enum cublasOperation_t : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };

// Attributes set on a matmul descriptor (cublasLtMatmulDescSetAttribute): TRANSA / TRANSB and the
// SCALE_MODEs take int32_t, the SCALE_POINTERs a device pointer (const void*).
enum cublasLtMatmulDescAttributes_t : int {
  CUBLASLT_MATMUL_DESC_TRANSA = 3,
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
  CUBLASLT_MATMUL_DESC_A_SCALE_POINTER = 17,
  CUBLASLT_MATMUL_DESC_B_SCALE_POINTER = 18,
  CUBLASLT_MATMUL_DESC_A_SCALE_MODE = 31,  // recent cuBLAS only: older ones refuse it
  CUBLASLT_MATMUL_DESC_B_SCALE_MODE = 32,
};

// How a SCALE_POINTER is read. OUTER_VEC_32F (cuBLAS 12.9 on): float32 vectors of M elements for A
// and N for B, D[i, j] = scale_a[i] * scale_b[j] * (op(A) . B)[i, j].
enum cublasLtMatmulMatrixScale_t : int { CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F = 3 };

// Heuristic preferences: MAX_WORKSPACE_BYTES takes uint64_t, the MIN_ALIGNMENT_* uint32_t (bytes;
// cuBLASLt assumes 256 unless told).
enum cublasLtMatmulPreferenceAttributes_t : int {
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};

struct cublasLtContext;
using cublasLtHandle_t = cublasLtContext*;
struct cublasLtMatmulDescOpaque;
using cublasLtMatmulDesc_t = cublasLtMatmulDescOpaque*;
struct cublasLtMatrixLayoutOpaque;
using cublasLtMatrixLayout_t = cublasLtMatrixLayoutOpaque*;
struct cublasLtMatmulPreferenceOpaque;
using cublasLtMatmulPreference_t = cublasLtMatmulPreferenceOpaque*;

// An algorithm chosen by the heuristic: plain data, kept and passed back to cublasLtMatmul.
struct cublasLtMatmulAlgo_t {
  uint64_t data[8];
};

struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;  // bytes the algorithm needs
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};

// The entry points, as pointers to what dlsym finds under the same names.
using cublasLtCreate_fn = cublasStatus_t (*)(cublasLtHandle_t* handle);
using cublasLtGetVersion_fn = size_t (*)();
using cublasLtGetStatusName_fn = const char* (*)(cublasStatus_t status);
using cublasLtMatmulDescCreate_fn = cublasStatus_t (*)(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute,
                                                       cudaDataType_t scale);
using cublasLtMatmulDescDestroy_fn = cublasStatus_t (*)(cublasLtMatmulDesc_t desc);
using cublasLtMatmulDescSetAttribute_fn = cublasStatus_t (*)(cublasLtMatmulDesc_t desc,
                                                             cublasLtMatmulDescAttributes_t attr, const void* buf,
                                                             size_t bytes);
using cublasLtMatrixLayoutCreate_fn = cublasStatus_t (*)(cublasLtMatrixLayout_t* layout, cudaDataType type,
                                                         uint64_t rows, uint64_t cols, int64_t ld);
using cublasLtMatrixLayoutDestroy_fn = cublasStatus_t (*)(cublasLtMatrixLayout_t layout);
using cublasLtMatmulPreferenceCreate_fn = cublasStatus_t (*)(cublasLtMatmulPreference_t* pref);
using cublasLtMatmulPreferenceDestroy_fn = cublasStatus_t (*)(cublasLtMatmulPreference_t pref);
using cublasLtMatmulPreferenceSetAttribute_fn = cublasStatus_t (*)(cublasLtMatmulPreference_t pref,
                                                                   cublasLtMatmulPreferenceAttributes_t attr,
                                                                   const void* buf, size_t bytes);
using cublasLtMatmulAlgoGetHeuristic_fn = cublasStatus_t (*)(
    cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
    cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t pref, int requested,
    cublasLtMatmulHeuristicResult_t* results, int* returned);
using cublasLtMatmul_fn = cublasStatus_t (*)(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                                             const void* a, cublasLtMatrixLayout_t a_layout, const void* b,
                                             cublasLtMatrixLayout_t b_layout, const void* beta, const void* c,
                                             cublasLtMatrixLayout_t c_layout, void* d, cublasLtMatrixLayout_t d_layout,
                                             const cublasLtMatmulAlgo_t* algo, void* workspace,
                                             size_t workspace_bytes, cudaStream_t stream);

}  // namespace corral::cuda::lt
