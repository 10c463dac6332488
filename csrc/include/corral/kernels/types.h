// Plain types shared by every kernel: element dtypes, devices, streams, and scalar half-precision
// conversions. Nothing here allocates or knows about models.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

// Helpers defined in headers are always inlined: the CPU kernels compile some headers once per
// ISA level, and an out-of-line copy built for AVX-512 must never be shared with baseline code.
#define CORRAL_INLINE inline __attribute__((always_inline))

namespace corral {

// I8 and I4 are the codes of quantized weights (I4: two per byte, see kernels::QuantInfo); I32
// and I64 appear only in checkpoints (packed codes, shapes, indices).
enum class DType : uint8_t { F32, F16, BF16, F8_E4M3, I32, I64, I8, I4 };

CORRAL_INLINE size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::F8_E4M3: return 1;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::I8: return 1;
    case DType::I4: return 1;  // two codes per byte: callers size I4 data themselves
  }
  return 0;
}

CORRAL_INLINE const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F8_E4M3: return "float8_e4m3";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::I8: return "int8";
    case DType::I4: return "int4";
  }
  return "?";
}

enum class DeviceType : uint8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
};

// Where a kernel runs. On CUDA `handle` is the cudaStream_t (nullptr: the default stream).
struct Stream {
  Device device;
  void* handle = nullptr;
};

// Storage types of 16- and 8-bit floats; arithmetic is always done in float.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};
// fp8 e4m3 in the "fn" variant (OCP FP8 E4M3): sign, 4 exponent bits (bias 7), 3 mantissa bits;
// subnormals, no infinities; 0x7f and 0xff are NaN; the largest finite magnitude is 448.
struct fp8_e4m3 {
  uint8_t bits;
};

CORRAL_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

CORRAL_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

CORRAL_INLINE float to_float(float x) { return x; }
CORRAL_INLINE float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }

CORRAL_INLINE float to_float(f16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1f;
  uint32_t mant = x.bits & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  // subnormal half: value = mant * 2^-24
  float v = float(mant) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

// Exact. Normal codes rebias the exponent (7 -> 127) and widen the mantissa. The same bits for a
// subnormal code (exponent 0, value m * 2^-9) give 2^-7 + m * 2^-10, so its value is twice that
// minus 2^-6 (exact, and no float denormal is involved, whatever MXCSR's DAZ says). 0x7f is NaN.
// Bit masks rather than selects: the baseline gemm loops run about 1.3x faster so.
CORRAL_INLINE float to_float(fp8_e4m3 x) {
  const uint32_t x7 = x.bits & 0x7fu;
  const uint32_t sub = uint32_t(0) - uint32_t(x7 < 8u);     // all ones for subnormal codes
  const uint32_t nan = uint32_t(0) - uint32_t(x7 == 0x7fu);  // all ones for NaN codes
  const float f = bits_to_float((x7 << 20) + (120u << 23));
  const float twice = bits_to_float((sub & 0x00800000u) + 0x3f800000u);  // 2 for subnormals, else 1
  const float minus = bits_to_float(sub & 0x3c800000u);                   // 2^-6 for subnormals, else 0
  const float mag = f * twice - minus;
  return bits_to_float(float_to_bits(mag) | (nan & 0x7fc00000u) | (uint32_t(x.bits & 0x80u) << 24));
}

// *p as float, where p may be misaligned for T: tensors read in place from a checkpoint's mapping
// (safetensors offsets are byte offsets).
template <class T>
CORRAL_INLINE float to_float_unaligned(const T* p) {
  T x;
  std::memcpy(&x, p, sizeof(T));
  return to_float(x);
}

// Round to nearest even, as torch does when casting float32 to bfloat16.
CORRAL_INLINE bf16 to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

CORRAL_INLINE f16 to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{uint16_t(sign | 0x7e00)};   // nan
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00)};  // overflows to inf after rounding
  if (a < 0x38800000u) {                                      // subnormal or zero in half
    const float v = bits_to_float(a) * 16777216.0f;            // scale by 2^24, round to int
    return f16{uint16_t(sign | uint16_t(__builtin_nearbyintf(v)))};
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15 (still shifted by 13)
  r += 0xfffu + ((r >> 13) & 1u);
  return f16{uint16_t(sign | (r >> 13))};
}

// Round to nearest even, saturating: every finite input, and +-inf, maps to a finite code (at
// most +-448; |f| >= 448 gives +-448, where plain rounding would reach 480 = NaN above 464).
// NaN stays NaN (0x7f with the input's sign).
CORRAL_INLINE fp8_e4m3 to_fp8_e4m3(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t a = u & 0x7fffffffu;
  // Normal range [2^-6, 448): rebias the exponent 127 -> 7 and round the mantissa to 3 bits.
  const uint32_t r = a - (120u << 23);
  const uint32_t normal = (r + 0x7ffffu + ((r >> 20) & 1u)) >> 20;
  // Below 2^-6, the subnormal range (multiples of 2^-9): adding 2^14, whose ulp is 2^-9, rounds to
  // nearest even in hardware, and the low bits of the sum are the code (0..8).
  const uint32_t subnormal = float_to_bits(bits_to_float(a) + 16384.0f) - 0x46800000u;
  // >= 448 (inf too) saturates.
  uint32_t code = a < 0x3c800000u ? subnormal : normal;
  code = a >= 0x43e00000u ? 0x7eu : code;
  code = a > 0x7f800000u ? 0x7fu : code;  // nan
  return fp8_e4m3{uint8_t(((u >> 24) & 0x80u) | (code & 0x7fu))};
}

template <class T>
CORRAL_INLINE T from_float(float x);
template <>
CORRAL_INLINE float from_float<float>(float x) {
  return x;
}
template <>
CORRAL_INLINE bf16 from_float<bf16>(float x) {
  return to_bf16(x);
}
template <>
CORRAL_INLINE f16 from_float<f16>(float x) {
  return to_f16(x);
}
template <>
CORRAL_INLINE fp8_e4m3 from_float<fp8_e4m3>(float x) {
  return to_fp8_e4m3(x);
}

}  // namespace corral
