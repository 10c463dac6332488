// Compiled once per ISA level, with CORRAL_ISA_NS naming the level and the matching -march flags.
#include "isa.h"
#include "simd/attention.h"
#include "simd/gemm.h"
#include "simd/softmax.h"

namespace corral::cpu::CORRAL_ISA_NS {

IsaKernels kernels() {
  return IsaKernels{
      CORRAL_ISA_NAME,
      {&gemm_outin<float>, &gemm_outin<bf16>, &gemm_outin<f16>, &gemm_outin<fp8_e4m3>},
      {&gemm_inout<float>, &gemm_inout<bf16>, &gemm_inout<f16>, &gemm_inout<fp8_e4m3>},
      {&gemm_inout_stream<float>, &gemm_inout_stream<bf16>, &gemm_inout_stream<f16>},
      {&attn_scores<float>, &attn_scores<bf16>, &attn_scores<f16>, &attn_scores<fp8_e4m3>},
      {&attn_pv<float>, &attn_pv<bf16>, &attn_pv<f16>, &attn_pv<fp8_e4m3>},
      &softmax_block,
  };
}

}  // namespace corral::cpu::CORRAL_ISA_NS
