// Compiled once per ISA level, with CORRAL_ISA_NS naming the level and the matching -march flags.
#include "isa.h"
#include "simd/gemm.h"
#include "simd/softmax.h"

namespace corral::cpu::CORRAL_ISA_NS {

IsaKernels kernels() {
  return IsaKernels{
      CORRAL_ISA_NAME,
      {&gemm_outin<float>, &gemm_outin<bf16>, &gemm_outin<f16>, &gemm_outin<fp8_e4m3>},
      {&gemm_inout<float>, &gemm_inout<bf16>, &gemm_inout<f16>, &gemm_inout<fp8_e4m3>},
      {&gemm_inout_stream<float>, &gemm_inout_stream<bf16>, &gemm_inout_stream<f16>},
      &softmax_block,
  };
}

}  // namespace corral::cpu::CORRAL_ISA_NS
