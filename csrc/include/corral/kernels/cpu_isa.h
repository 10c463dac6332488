// Which CPU instruction set the CPU kernels use. The best level the CPU supports is picked at
// load ($CORRAL_CPU_ISA overrides it); tests switch levels to check every code path.
#pragma once

#include <string>
#include <vector>

namespace corral::kernels {

// Levels this build and this CPU support, best first (e.g. "avx512", "avx2", "generic").
std::vector<std::string> cpu_isas();
std::string cpu_isa();
// Throws InvalidInputError for a level this CPU or build lacks.
void set_cpu_isa(const std::string& name);

}  // namespace corral::kernels
