#include "cublaslt_matmul.h"

#include <cuda_runtime_api.h>
#include <library_types.h>

#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <string>

#include "check.h"
#include "corral/error.h"
#include "cublaslt.h"

namespace corral::cuda {

namespace {

// The most workspace an algorithm may ask for (split-K reductions): NVIDIA's recommended cuBLAS
// workspace for Hopper. It comes from the call's stream-ordered scratch, sized to what the chosen
// algorithm needs (often nothing): a workspace shared between calls would race between streams.
constexpr uint64_t kMaxWorkspace = uint64_t(32) << 20;
// Plans kept before the cache starts over (each distinct prefill length makes one per matrix).
constexpr size_t kMaxPlans = 4096;

void check(const CublasLt& api, lt::cublasStatus_t status, const char* call) {
  if (status != lt::CUBLAS_STATUS_SUCCESS)
    throw DeviceError(std::string("cuBLASLt: ") + call + " failed: " + api.status_name(status));
}

// The largest power of two (up to 256, cuBLASLt's default assumption) that divides the address.
uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return a == 0 ? 256u : uint32_t(std::min<uintptr_t>(a & (~a + 1), 256));
}

// What a plan depends on: device, dtype, layout, rows, in, out, ldw, ldx, ldy, alignment of w and y.
using Key = std::array<int64_t, 11>;

// A matmul descriptor, destroyed with it.
struct Desc {
  const CublasLt* api = nullptr;
  lt::cublasLtMatmulDesc_t desc = nullptr;
  explicit Desc(const CublasLt* api) : api(api) {}
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  ~Desc() {
    if (desc) api->matmul_desc_destroy(desc);
  }
};

}  // namespace

struct MatmulPlan {
  const CublasLt* api = nullptr;
  lt::cublasLtHandle_t handle = nullptr;
  Desc desc;
  lt::cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  lt::cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;

  MatmulPlan(const CublasLt* api, lt::cublasLtHandle_t handle) : api(api), handle(handle), desc(api) {}
  MatmulPlan(const MatmulPlan&) = delete;
  MatmulPlan& operator=(const MatmulPlan&) = delete;
  ~MatmulPlan() {
    for (lt::cublasLtMatrixLayout_t l : {a, b, c})
      if (l) api->layout_destroy(l);
  }
};

namespace {

// The heuristic's preferences for one query, destroyed with it.
struct Preference {
  const CublasLt& api;
  lt::cublasLtMatmulPreference_t pref = nullptr;
  explicit Preference(const CublasLt& api) : api(api) {
    check(api, api.preference_create(&pref), "cublasLtMatmulPreferenceCreate");
  }
  Preference(const Preference&) = delete;
  Preference& operator=(const Preference&) = delete;
  ~Preference() { api.preference_destroy(pref); }
  template <class T>
  void set(lt::cublasLtMatmulPreferenceAttributes_t attr, T value) {
    check(api, api.preference_set(pref, attr, &value, sizeof(T)), "cublasLtMatmulPreferenceSetAttribute");
  }
};

template <class T>
lt::cublasStatus_t set(const CublasLt& api, const Desc& d, lt::cublasLtMatmulDescAttributes_t attr, T value) {
  return api.matmul_desc_set(d.desc, attr, &value, sizeof(T));
}

// Fills d for m: float32 compute, W transposed when OutIn, and for fp8 the scale vectors (their
// pointers are part of the descriptor, so each fp8 call makes its own). False when cuBLASLt
// refuses the fp8 scale mode (cuBLAS before 12.9).
bool describe(const CublasLt& api, const Matmul& m, Desc& d) {
  check(api, api.matmul_desc_create(&d.desc, lt::CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const int32_t transa = m.layout == WeightLayout::OutIn ? lt::CUBLAS_OP_T : lt::CUBLAS_OP_N;  // transb: N
  check(api, set(api, d, lt::CUBLASLT_MATMUL_DESC_TRANSA, transa), "cublasLtMatmulDescSetAttribute");
  if (m.dtype != DType::F8_E4M3) return true;
  const int32_t mode = lt::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
  if (set(api, d, lt::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, mode) != lt::CUBLAS_STATUS_SUCCESS ||
      set(api, d, lt::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, mode) != lt::CUBLAS_STATUS_SUCCESS)
    return false;
  check(api, set(api, d, lt::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(m.w_scale)),
        "cublasLtMatmulDescSetAttribute");
  check(api, set(api, d, lt::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(m.x_scale)),
        "cublasLtMatmulDescSetAttribute");
  return true;
}

// A new plan for m, or null when cuBLASLt has no algorithm for it.
std::shared_ptr<const MatmulPlan> make_plan(const CublasLt& api, lt::cublasLtHandle_t handle, const Matmul& m) {
  auto p = std::make_shared<MatmulPlan>(&api, handle);
  const cudaDataType_t t = m.dtype == DType::BF16 ? CUDA_R_16BF : m.dtype == DType::F16 ? CUDA_R_16F : CUDA_R_8F_E4M3;
  const bool out_in = m.layout == WeightLayout::OutIn;
  if (!describe(api, m, p->desc)) return nullptr;
  // Layouts describe the matrices as stored (before op()), column-major (the default order).
  check(api, api.layout_create(&p->a, t, out_in ? m.in : m.out, out_in ? m.out : m.in, m.ldw),
        "cublasLtMatrixLayoutCreate");
  check(api, api.layout_create(&p->b, t, m.in, m.rows, m.ldx), "cublasLtMatrixLayoutCreate");
  check(api, api.layout_create(&p->c, CUDA_R_32F, m.out, m.rows, m.ldy), "cublasLtMatrixLayoutCreate");

  Preference pref(api);
  pref.set(lt::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kMaxWorkspace);
  pref.set(lt::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(m.w));
  pref.set(lt::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, uint32_t(16));
  pref.set(lt::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(m.y));
  pref.set(lt::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(m.y));
  lt::cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const lt::cublasStatus_t status =
      api.heuristic(handle, p->desc.desc, p->a, p->b, p->c, p->c, pref.pref, 1, &result, &found);
  // fp8 shapes and scale modes cuBLASLt lacks may come back as other errors than NOT_SUPPORTED.
  if (status == lt::CUBLAS_STATUS_NOT_SUPPORTED || (m.dtype == DType::F8_E4M3 && status != lt::CUBLAS_STATUS_SUCCESS))
    return nullptr;
  check(api, status, "cublasLtMatmulAlgoGetHeuristic");
  if (found < 1 || result.state != lt::CUBLAS_STATUS_SUCCESS) return nullptr;
  p->algo = result.algo;
  p->workspace = result.workspaceSize;
  return p;
}

struct Cache {
  std::mutex mutex;
  std::map<int, lt::cublasLtHandle_t> handles;  // per device, created on first use, never destroyed
  std::map<Key, std::shared_ptr<const MatmulPlan>> plans;
};

Cache& cache() {
  static Cache c;
  return c;
}

}  // namespace

std::shared_ptr<const MatmulPlan> plan_matmul(const Matmul& m) {
  const CublasLt* api = cublaslt();
  if (!api) return nullptr;
  int device = 0;
  CORRAL_CUDA_CHECK(cudaGetDevice(&device));
  const Key key{device,  int64_t(m.dtype), int64_t(m.layout), m.rows,
                m.in,    m.out,            m.ldw,             m.ldx,
                m.ldy,   alignment(m.w),   alignment(m.y)};
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  const auto found = c.plans.find(key);
  if (found != c.plans.end()) return found->second;
  lt::cublasLtHandle_t& handle = c.handles[device];
  if (!handle) check(*api, api->create(&handle), "cublasLtCreate");
  // Plans in use elsewhere live on through their shared_ptr.
  if (c.plans.size() >= kMaxPlans) c.plans.clear();
  return c.plans[key] = make_plan(*api, handle, m);
}

size_t workspace_bytes(const MatmulPlan& plan) { return plan.workspace; }

void run_matmul(const MatmulPlan& p, const Matmul& m, void* workspace, cudaStream_t stream) {
  const float alpha = 1.0f, beta = m.accumulate ? 1.0f : 0.0f;  // host scalars of the scale type (float32)
  Desc own(p.api);  // fp8: this call's scale pointers (the plan's descriptor has the first call's)
  if (m.dtype == DType::F8_E4M3 && !describe(*p.api, m, own))
    throw DeviceError("cuBLASLt: the fp8 scale mode was accepted when planning, refused now");
  const Desc& d = m.dtype == DType::F8_E4M3 ? own : p.desc;
  check(*p.api,
        p.api->matmul(p.handle, d.desc, &alpha, m.w, p.a, m.x, p.b, &beta, m.y, p.c, m.y, p.c, &p.algo, workspace,
                      p.workspace, stream),
        "cublasLtMatmul");
}

}  // namespace corral::cuda
