#include "cublaslt.h"

#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace corral::cuda {

namespace {

struct Library {
  CublasLt api{};
  bool loaded = false;
  std::string status;
};

template <class Fn>
bool find(void* lib, const char* name, Fn& fn, std::string& why) {
  void* p = dlsym(lib, name);
  if (!p) why = std::string("no symbol ") + name;
  fn = reinterpret_cast<Fn>(p);
  return p != nullptr;
}

// Fills `api` from the library `lib`; false, with the reason in `why`, when it cannot serve.
bool bind(void* lib, CublasLt& api, std::string& why) {
  const bool all = find(lib, "cublasLtCreate", api.create, why) &&
                   find(lib, "cublasLtGetVersion", api.get_version, why) &&
                   find(lib, "cublasLtGetStatusName", api.status_name, why) &&
                   find(lib, "cublasLtMatmulDescCreate", api.matmul_desc_create, why) &&
                   find(lib, "cublasLtMatmulDescDestroy", api.matmul_desc_destroy, why) &&
                   find(lib, "cublasLtMatmulDescSetAttribute", api.matmul_desc_set, why) &&
                   find(lib, "cublasLtMatrixLayoutCreate", api.layout_create, why) &&
                   find(lib, "cublasLtMatrixLayoutDestroy", api.layout_destroy, why) &&
                   find(lib, "cublasLtMatmulPreferenceCreate", api.preference_create, why) &&
                   find(lib, "cublasLtMatmulPreferenceDestroy", api.preference_destroy, why) &&
                   find(lib, "cublasLtMatmulPreferenceSetAttribute", api.preference_set, why) &&
                   find(lib, "cublasLtMatmulAlgoGetHeuristic", api.heuristic, why) &&
                   find(lib, "cublasLtMatmul", api.matmul, why);
  if (!all) return false;
  // cublaslt_api.h holds the API of these two major versions (CUBLAS_VERSION: major * 10000 + ...).
  const size_t major = api.get_version() / 10000;
  if (major == 12 || major == 13) return true;
  why = "version " + std::to_string(api.get_version()) + ", where Corral knows cuBLAS 12 and 13";
  return false;
}

// The file the loader picked for `lib` (a soname resolves to a path on the search path).
std::string path_of(void* lib, const std::string& name) {
  link_map* map = nullptr;
  if (dlinfo(lib, RTLD_DI_LINKMAP, &map) == 0 && map && map->l_name && *map->l_name) return map->l_name;
  return name;
}

Library load() {
  Library l;
  const char* env = std::getenv("CORRAL_CUBLASLT_LIBRARY");
  if (env && std::string(env) == "none") {
    l.status = "cuBLASLt not loaded (CORRAL_CUBLASLT_LIBRARY=none)";
    return l;
  }
  std::vector<std::string> candidates;
  if (env && *env) candidates.emplace_back(env);
  candidates.emplace_back("libcublasLt.so.13");
  candidates.emplace_back("libcublasLt.so.12");
  std::string errors;
  for (const std::string& name : candidates) {
    std::string why;
    void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* e = dlerror();  // names the file
      why = e ? e : name + ": dlopen failed";
    } else if (bind(lib, l.api, why)) {
      l.loaded = true;
      l.status = "cuBLASLt " + std::to_string(l.api.get_version()) + " from " + path_of(lib, name);
      return l;
    } else {
      why = path_of(lib, name) + ": " + why;
      dlclose(lib);
    }
    errors += (errors.empty() ? "" : "; ") + why;
  }
  l.api = CublasLt{};
  l.status = "cuBLASLt not loaded (" + errors + ")";
  return l;
}

// Loaded once, by whichever thread asks first (a function-local static: C++11 makes its
// initialization thread-safe; the others wait for it).
const Library& library() {
  static const Library l = load();
  return l;
}

}  // namespace

const CublasLt* cublaslt() { return library().loaded ? &library().api : nullptr; }

const std::string& cublaslt_status() { return library().status; }

}  // namespace corral::cuda
