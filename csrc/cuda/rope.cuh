// RoPE on CUDA, shared by the text model's rope_interleaved (elementwise.cu) and the vision
// encoder's rope_2d (vision.cu): pairs (2i, 2i+1) of every head of a token rotate by angle(i), an
// fp32 angle whose cos / sin come from the accurate sincosf (not __sinf), and the rotation
// (a cos - b sin, a sin + b cos) rounds each product and sum (_rn intrinsics: no FMA contraction),
// as the CPU code (csrc/cpu/rope.cpp) does.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "check.h"
#include "launch.cuh"

namespace corral::cuda::rope {

constexpr int kThreads = 128;
constexpr int kPairs = 256;  // pairs whose cos / sin are held at once

// Rotates the pair at p by the angle whose cos / sin are c / s.
__device__ __forceinline__ void rotate_pair(float* p, float c, float s) {
  const float a = p[0], b = p[1];
  p[0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
  p[1] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
}

// Angles of the text model's RoPE: pair i of token t by float(positions[t]) * inv_freq[i].
struct Angles1d {
  const int32_t* positions;
  const float* inv_freq;
  struct Token {
    float p;
    const float* inv_freq;
    __device__ float operator()(int64_t i) const { return __fmul_rn(p, inv_freq[i]); }
  };
  __device__ Token token(int64_t t) const { return Token{float(positions[t]), inv_freq}; }
};

// Angles of the vision encoder's 2-D RoPE: pair i < quarter by float(pos_x[t]) * inv_freq[i], pair
// quarter + i by float(pos_y[t]) * inv_freq[i].
struct Angles2d {
  const int32_t* pos_x;
  const int32_t* pos_y;
  const float* inv_freq;
  int64_t quarter;
  struct Token {
    float px, py;
    const float* inv_freq;
    int64_t quarter;
    __device__ float operator()(int64_t i) const {
      return i < quarter ? __fmul_rn(px, inv_freq[i]) : __fmul_rn(py, inv_freq[i - quarter]);
    }
  };
  __device__ Token token(int64_t t) const { return Token{float(pos_x[t]), float(pos_y[t]), inv_freq, quarter}; }
};

// A block per token (grid-stride): cos / sin of kPairs pairs' angles, then those pairs of every
// head rotated; head_dim / 2 pairs per head (an odd head_dim's last element is left as it is).
template <class Angles>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim, Angles angles) {
  __shared__ float cs[kPairs], sn[kPairs];
  const int64_t half = head_dim / 2;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const typename Angles::Token angle = angles.token(t);
    float* xt = x + t * ld;
    for (int64_t j0 = 0; j0 < half; j0 += kPairs) {
      const int m = int(std::min<int64_t>(kPairs, half - j0));
      __syncthreads();  // the previous chunk's readers are done
      for (int j = threadIdx.x; j < m; j += blockDim.x) sincosf(angle(j0 + j), &sn[j], &cs[j]);
      __syncthreads();
      for (int64_t k = threadIdx.x; k < heads * m; k += blockDim.x) {
        const int64_t h = k / m;
        const int j = int(k - h * m);
        rotate_pair(xt + h * head_dim + 2 * (j0 + j), cs[j], sn[j]);
      }
    }
  }
}

// Launches rope_kernel on `stream` (no work for an empty input).
template <class Angles>
void launch(cudaStream_t stream, float* x, int64_t ld, int64_t tokens, int64_t heads, int64_t head_dim,
            const Angles& angles) {
  if (tokens <= 0 || heads <= 0 || head_dim < 2) return;
  rope_kernel<Angles><<<blocks_for(tokens), kThreads, 0, stream>>>(x, ld, tokens, heads, head_dim, angles);
  CORRAL_CUDA_CHECK_LAUNCH();
}

}  // namespace corral::cuda::rope
