#include "isa.h"

#include <cstdlib>
#include <string>

#include "corral/error.h"
#include "corral/kernels/cpu_isa.h"

namespace corral::cpu {

namespace generic {
IsaKernels kernels();
}
#if defined(CORRAL_X86_ISAS)
namespace avx2 {
IsaKernels kernels();
}
namespace avx512 {
IsaKernels kernels();
}
namespace avx512bf16 {
IsaKernels kernels();
}
#endif

namespace {

struct Level {
  const char* name;
  IsaKernels (*make)();
  bool (*supported)();
};

const std::vector<Level>& levels() {
  static const std::vector<Level> all = {
#if defined(CORRAL_X86_ISAS)
      {"avx512bf16", &avx512bf16::kernels,
       [] {
         return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512bf16") &&
                __builtin_cpu_supports("avx512vnni");
       }},
      {"avx512", &avx512::kernels, [] { return bool(__builtin_cpu_supports("x86-64-v4")); }},
      {"avx2", &avx2::kernels, [] { return bool(__builtin_cpu_supports("x86-64-v3")); }},
#endif
      {"generic", &generic::kernels, [] { return true; }},
  };
  return all;
}

IsaKernels pick(const std::string& name) {
  for (const Level& l : levels())
    if ((name.empty() || name == l.name) && l.supported()) return l.make();
  std::string have;
  for (const std::string& s : supported_isas()) have += (have.empty() ? "" : ", ") + s;
  throw InvalidInputError("CPU ISA level '" + name + "' is not available here (available: " + have + ")");
}

IsaKernels& current() {
  static IsaKernels k = [] {
    const char* env = std::getenv("CORRAL_CPU_ISA");
    return pick(env ? env : "");
  }();
  return k;
}

}  // namespace

int float_index(DType dtype, const char* what) {
  switch (dtype) {
    case DType::F32: return 0;
    case DType::BF16: return 1;
    case DType::F16: return 2;
    default:
      throw DTypeError(std::string(what) + ": dtype " + dtype_name(dtype) +
                       " is not supported on CPU (float32, bfloat16 and float16 are)");
  }
}

int kv_index(DType dtype, const char* what) {
  switch (dtype) {
    case DType::F32: return 0;
    case DType::BF16: return 1;
    case DType::F16: return 2;
    case DType::F8_E4M3: return 3;
    default:
      throw DTypeError(std::string(what) + ": dtype " + dtype_name(dtype) +
                       " is not supported on CPU (float32, bfloat16, float16 and float8_e4m3 are)");
  }
}

const IsaKernels& isa() { return current(); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Level& l : levels())
    if (l.supported()) out.emplace_back(l.name);
  return out;
}

void select_isa(const std::string& name) { current() = pick(name); }

}  // namespace corral::cpu

namespace corral::kernels {

std::vector<std::string> cpu_isas() { return cpu::supported_isas(); }
std::string cpu_isa() { return cpu::isa().name; }
void set_cpu_isa(const std::string& name) { cpu::select_isa(name); }

}  // namespace corral::kernels
