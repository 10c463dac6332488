// Conversions between float and the element types of CUDA kernels (fp8: bit-exact ports of the
// CPU's, corral/kernels/types.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace corral::cuda {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

// Round to nearest even.
template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// fp8 e4m3fn code (low 8 bits) -> float, exact: the code's exponent and mantissa placed in a float
// with bias 127 are the value times 2^-120 (subnormal codes land on float denormals, which are exact
// without flush-to-zero, nvcc's default), so one multiplication by 2^120 rebiases. 0x7f / 0xff: NaN.
__device__ __forceinline__ float fp8_to_f32(uint32_t code) {
  const uint32_t x7 = code & 0x7fu;
  float f = __fmul_rn(__uint_as_float(x7 << 20), 1.329227995784916e36f);  // 2^120
  f = x7 == 0x7fu ? __uint_as_float(0x7fc00000u) : f;
  return __uint_as_float(__float_as_uint(f) | ((code & 0x80u) << 24));
}

// float -> fp8 e4m3fn, round to nearest even, saturating to +-448; NaN -> 0x7f with the sign.
// Line by line corral::to_fp8_e4m3.
__device__ __forceinline__ uint32_t f32_to_fp8(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t r = a - (120u << 23);
  const uint32_t normal = (r + 0x7ffffu + ((r >> 20) & 1u)) >> 20;
  const uint32_t subnormal = __float_as_uint(__fadd_rn(__uint_as_float(a), 16384.0f)) - 0x46800000u;
  uint32_t code = a < 0x3c800000u ? subnormal : normal;
  code = a >= 0x43e00000u ? 0x7eu : code;
  code = a > 0x7f800000u ? 0x7fu : code;
  return ((u >> 24) & 0x80u) | (code & 0x7fu);
}

}  // namespace corral::cuda
