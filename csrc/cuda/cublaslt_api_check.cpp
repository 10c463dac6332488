// Built only where a real cublasLt.h is found (csrc/CMakeLists.txt): checks every value, layout
// and signature cublaslt_api.h declares by hand against cuBLAS's own header, so that a mistake
// there fails the build instead of corrupting a call at run time. No code.
#include <cublasLt.h>

#include <cstddef>
#include <type_traits>

#include "cublaslt_api.h"

namespace corral::cuda::lt {

namespace {

// The real header's type for each of ours; pointers, const and function types map their parts,
// so that whole signatures compare.
template <class T>
struct Real {
  using type = T;
};
template <class T>
using real_t = typename Real<T>::type;
template <class T>
struct Real<T*> {
  using type = real_t<T>*;
};
template <class T>
struct Real<const T> {
  using type = const real_t<T>;
};
template <class R, class... A>
struct Real<R(A...)> {
  using type = real_t<R>(real_t<A>...);
};
#define CORRAL_REAL(ours, theirs) \
  template <>                     \
  struct Real<ours> {             \
    using type = theirs;          \
  }
CORRAL_REAL(cublasStatus_t, ::cublasStatus_t);
CORRAL_REAL(cublasComputeType_t, ::cublasComputeType_t);
CORRAL_REAL(cublasOperation_t, ::cublasOperation_t);
CORRAL_REAL(cublasLtMatmulDescAttributes_t, ::cublasLtMatmulDescAttributes_t);
CORRAL_REAL(cublasLtMatmulPreferenceAttributes_t, ::cublasLtMatmulPreferenceAttributes_t);
CORRAL_REAL(cublasLtMatmulMatrixScale_t, ::cublasLtMatmulMatrixScale_t);
CORRAL_REAL(cublasLtContext, ::cublasLtContext);
CORRAL_REAL(cublasLtMatmulDescOpaque, ::cublasLtMatmulDescOpaque_t);
CORRAL_REAL(cublasLtMatrixLayoutOpaque, ::cublasLtMatrixLayoutOpaque_t);
CORRAL_REAL(cublasLtMatmulPreferenceOpaque, ::cublasLtMatmulPreferenceOpaque_t);
CORRAL_REAL(cublasLtMatmulAlgo_t, ::cublasLtMatmulAlgo_t);
CORRAL_REAL(cublasLtMatmulHeuristicResult_t, ::cublasLtMatmulHeuristicResult_t);
#undef CORRAL_REAL

#define CORRAL_SAME_SIGNATURE(name) \
  static_assert(std::is_same<real_t<name##_fn>, decltype(&::name)>::value, #name "'s signature")
CORRAL_SAME_SIGNATURE(cublasLtCreate);
CORRAL_SAME_SIGNATURE(cublasLtGetVersion);
CORRAL_SAME_SIGNATURE(cublasLtGetStatusName);
CORRAL_SAME_SIGNATURE(cublasLtMatmulDescCreate);
CORRAL_SAME_SIGNATURE(cublasLtMatmulDescDestroy);
CORRAL_SAME_SIGNATURE(cublasLtMatmulDescSetAttribute);
CORRAL_SAME_SIGNATURE(cublasLtMatrixLayoutCreate);
CORRAL_SAME_SIGNATURE(cublasLtMatrixLayoutDestroy);
CORRAL_SAME_SIGNATURE(cublasLtMatmulPreferenceCreate);
CORRAL_SAME_SIGNATURE(cublasLtMatmulPreferenceDestroy);
CORRAL_SAME_SIGNATURE(cublasLtMatmulPreferenceSetAttribute);
CORRAL_SAME_SIGNATURE(cublasLtMatmulAlgoGetHeuristic);
CORRAL_SAME_SIGNATURE(cublasLtMatmul);
#undef CORRAL_SAME_SIGNATURE

#define CORRAL_SAME_VALUE(name) static_assert(int(lt::name) == int(::name), #name)
CORRAL_SAME_VALUE(CUBLAS_STATUS_SUCCESS);
CORRAL_SAME_VALUE(CUBLAS_STATUS_NOT_SUPPORTED);
CORRAL_SAME_VALUE(CUBLAS_COMPUTE_32F);
CORRAL_SAME_VALUE(CUBLAS_OP_N);
CORRAL_SAME_VALUE(CUBLAS_OP_T);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_DESC_TRANSA);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_DESC_TRANSB);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_DESC_A_SCALE_MODE);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_DESC_B_SCALE_MODE);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES);
CORRAL_SAME_VALUE(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES);
#undef CORRAL_SAME_VALUE

template <class Ours>
constexpr bool same_size() {
  return sizeof(Ours) == sizeof(real_t<Ours>) && alignof(Ours) == alignof(real_t<Ours>);
}
static_assert(same_size<cublasStatus_t>() && same_size<cublasComputeType_t>() && same_size<cublasOperation_t>() &&
                  same_size<cublasLtMatmulDescAttributes_t>() && same_size<cublasLtMatmulPreferenceAttributes_t>() &&
                  same_size<cublasLtMatmulMatrixScale_t>(),
              "enum sizes");
static_assert(same_size<cublasLtMatmulAlgo_t>() && same_size<cublasLtMatmulHeuristicResult_t>(), "struct sizes");

using Ours = cublasLtMatmulHeuristicResult_t;
using Theirs = ::cublasLtMatmulHeuristicResult_t;
static_assert(offsetof(Ours, algo) == offsetof(Theirs, algo) &&
                  offsetof(Ours, workspaceSize) == offsetof(Theirs, workspaceSize) &&
                  offsetof(Ours, state) == offsetof(Theirs, state) &&
                  offsetof(Ours, wavesCount) == offsetof(Theirs, wavesCount) &&
                  offsetof(Ours, reserved) == offsetof(Theirs, reserved),
              "cublasLtMatmulHeuristicResult_t's layout");

}  // namespace

}  // namespace corral::cuda::lt
