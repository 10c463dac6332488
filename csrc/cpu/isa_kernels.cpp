// Compiled once per ISA level, with CORRAL_ISA_NS naming the level and the matching -march flags.
#include "isa.h"
#include "simd/attention.h"
#include "simd/gemm.h"
#include "simd/qgemm.h"
#include "simd/softmax.h"

namespace corral::cpu::CORRAL_ISA_NS {

IsaKernels kernels() {
  return IsaKernels{
      CORRAL_ISA_NAME,
      {&prepare_x<kGemmF32>, &prepare_x<kGemmBf16>, &prepare_x<kGemmF16>, &prepare_x<kGemmBf16Exact>,
       &prepare_quant_x<kGemmI8>, &prepare_quant_x<kGemmI4>, &prepare_x<kGemmF32>},
      {&gemm_panel<kGemmF32, false>, &gemm_panel<kGemmBf16, false>, &gemm_panel<kGemmF16, false>,
       &gemm_panel<kGemmBf16Exact, false>, &quant_gemm_panel<kGemmI8, false>, &quant_gemm_panel<kGemmI4, false>,
       &fp8_gemm_panel<false>},
      {&gemm_panel<kGemmF32, true>, &gemm_panel<kGemmBf16, true>, &gemm_panel<kGemmF16, true>,
       &gemm_panel<kGemmBf16Exact, true>, &quant_gemm_panel<kGemmI8, true>, &quant_gemm_panel<kGemmI4, true>,
       &fp8_gemm_panel<true>},
      {&attn_scores<float>, &attn_scores<bf16>, &attn_scores<f16>, &attn_scores<fp8_e4m3>},
      {&attn_pv<float>, &attn_pv<bf16>, &attn_pv<f16>, &attn_pv<fp8_e4m3>},
      &softmax_block,
  };
}

}  // namespace corral::cpu::CORRAL_ISA_NS
