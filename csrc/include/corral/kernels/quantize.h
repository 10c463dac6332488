// Weight quantization at load: a float matrix to the integer codes and scales of QuantizedRows.
#pragma once

#include <vector>

#include "corral/kernels/linear.h"

namespace corral::kernels {

// Codes, scales and zero points of an [out, in] matrix, owned; rows() views them.
struct QuantizedBuffer {
  DType dtype = DType::I8;
  int64_t out = 0, in = 0, group = 0;
  std::vector<int8_t> codes;
  std::vector<float> scales;
  std::vector<int8_t> zero_points;  // empty: symmetric

  QuantizedRows rows() const {
    return QuantizedRows{dtype, out, in, group, codes.data(), scales.data(),
                         zero_points.empty() ? nullptr : zero_points.data()};
  }
};

// Symmetric quantization of w (OutIn or InOut; float32, bfloat16 or float16), on the CPU threads.
//   I8: one group per row (group = in rounded up to kQuantBlock), scale max|w| / 127, codes in
//       [-127, 127] (round half to even).
//   I4: groups of `group` k (a multiple of kQuantBlock, at most 256), codes in [-8, 7]; each
//       group's scale is the best by squared weight error of a small search (max|w| / d for d
//       from 6.0 to 9.0 in steps of 0.5, then the least-squares refit of the best one's codes),
//       rather than plain max|w| / 7.5 rounding (about 10% less error on Gaussian weights).
// Scales are rounded to scale_dtype (float32 or bfloat16) before the codes are chosen, so that the
// stored scale is the one the codes were fitted to.
QuantizedBuffer quantize_weights(const MatrixRef& w, DType dtype, int64_t group, DType scale_dtype);

}  // namespace corral::kernels
