// KV-cache writes on CUDA (contract: corral/kernels/kv_cache.h), the same bits as the CPU's
// (csrc/cpu/kv_cache.cpp):
//   float32 / bfloat16 / float16: a thread per (token, KV head, dim) stores K (transposed per block:
//   the token is a column of [head_dim, block_size]) and V (a row of [block_size, head_dim]);
//   float8_e4m3: tokens are sorted by slot on the device (cub radix sort, stable: the contract's
//   order within a block, and the CPU's for repeated slots), then a block per (run of one cache
//   block, KV head, K or V) walks its tokens in slot order: the first token of a cache block sets
//   the scale (amax / 448), a later token needing more range doubles it as often as needed and
//   re-quantizes the block's earlier tokens, then the token is quantized (x / scale, round to
//   nearest even, saturating at 448).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cfloat>
#include <cub/device/device_radix_sort.cuh>
#include <string>

#include "attention_common.cuh"
#include "check.h"
#include "corral/error.h"
#include "ops.h"
#include "scratch.h"

namespace corral::cuda {

namespace {

using namespace attn;

template <class T>
__global__ void kv_write_kernel(unsigned char* kc, unsigned char* vc, int64_t block_stride, int bs, int d, int kvh,
                                const float* k, const float* v, int64_t ld, int64_t tokens, const int64_t* slots) {
  using S = typename T::Storage;
  const int64_t width = int64_t(kvh) * d, total = tokens * width;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / width, c = e - t * width;
    const int g = int(c / d), i = int(c - int64_t(g) * d);
    const int64_t slot = slots[t], blk = slot / bs, off = slot - blk * bs;
    const int64_t head = blk * block_stride + int64_t(g) * bs * d * int64_t(sizeof(S));
    reinterpret_cast<S*>(kc + head)[int64_t(i) * bs + off] = store_elem<T>(k[t * ld + c]);
    reinterpret_cast<S*>(vc + head)[off * d + i] = store_elem<T>(v[t * ld + c]);
  }
}

__global__ void iota_kernel(int32_t* x, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = int32_t(i);
}

constexpr int kFp8Threads = 128;

// Block (blockIdx.x = index into the slot-sorted tokens, blockIdx.y = 2 * KV head + (0: K, 1: V));
// only the first sorted token of each cache block does the work.
__global__ void __launch_bounds__(kFp8Threads)
    kv_write_fp8_kernel(unsigned char* kc, unsigned char* vc, unsigned char* ksc, unsigned char* vsc,
                        int64_t block_stride, int64_t scale_step, int bs, int d, const float* k, const float* v,
                        int64_t ld, int64_t tokens, const unsigned long long* sorted, const int32_t* order) {
  __shared__ float red[kFp8Threads / 32];
  const int64_t i0 = blockIdx.x;
  const unsigned long long ubs = (unsigned long long)bs;
  const int64_t blk = int64_t(sorted[i0] / ubs);
  if (i0 > 0 && int64_t(sorted[i0 - 1] / ubs) == blk) return;
  const int g = int(blockIdx.y >> 1);
  const bool is_v = (blockIdx.y & 1) != 0;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  uint8_t* dst = (is_v ? vc : kc) + blk * block_stride + int64_t(g) * bs * d;
  float* scale_at = reinterpret_cast<float*>((is_v ? vsc : ksc) + blk * scale_step) + g;
  const float* src = is_v ? v : k;
  const int64_t tok_step = is_v ? d : 1, dim_step = is_v ? 1 : bs;  // K: a token is a column
  float scale = *scale_at;
  for (int64_t j = i0; j < tokens && int64_t(sorted[j] / ubs) == blk; ++j) {
    const int64_t t = order[j];
    const int64_t off = int64_t(sorted[j]) - blk * bs;
    const float* x = src + t * ld + int64_t(g) * d;
    float amax = 0.f;  // fmaxf skips NaN, as std::max(amax, nan) does
    for (int i = tid; i < d; i += kFp8Threads) amax = fmaxf(amax, fabsf(x[i]));
    amax = warp_max(amax);
    if (lane == 0) red[warp] = amax;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kFp8Threads / 32; ++w) amax = fmaxf(amax, red[w]);
    const float need = fmaxf(__fdiv_rn(fminf(amax, FLT_MAX), 448.0f), FLT_MIN);
    if (off == 0) {
      scale = need;  // the block's first token sets the scale
    } else if (need > scale) {
      // More range: the smallest scale * 2^k >= need; the earlier tokens re-quantized exactly.
      float grown = scale;
      while (grown < need) grown = __fmul_rn(grown, 2.f);
      const float ratio = __fdiv_rn(scale, grown);
      for (int64_t e = tid; e < off * d; e += kFp8Threads) {
        const int64_t jj = e / d, ii = e - jj * d;
        uint8_t& c = dst[jj * tok_step + ii * dim_step];
        c = uint8_t(f32_to_fp8(__fmul_rn(fp8_to_f32(c), ratio)));
      }
      scale = grown;
    }
    for (int i = tid; i < d; i += kFp8Threads)
      dst[off * tok_step + int64_t(i) * dim_step] = uint8_t(f32_to_fp8(__fdiv_rn(x[i], scale)));
    __syncthreads();  // the next token may re-quantize these, and red is rewritten
  }
  if (tid == 0) *scale_at = scale;
}

unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return unsigned(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65536));
}

template <class T>
void launch_rows(cudaStream_t s, const PagedKv& c, const float* k, const float* v, int64_t ld, int64_t tokens,
                 const int64_t* slots) {
  const int64_t work = tokens * c.kv_heads * c.head_dim;
  kv_write_kernel<T><<<grid_for(work, 256), 256, 0, s>>>(static_cast<unsigned char*>(c.k),
                                                         static_cast<unsigned char*>(c.v), c.block_stride,
                                                         c.block_size, c.head_dim, c.kv_heads, k, v, ld, tokens, slots);
  CORRAL_CUDA_CHECK_LAUNCH();
}

void write_fp8(cudaStream_t s, const PagedKv& c, const float* k, const float* v, int64_t ld, int64_t tokens,
               const int64_t* slots) {
  if (c.k_scale == nullptr || c.v_scale == nullptr)
    throw InvalidInputError("kv_cache_write: a float8_e4m3 KV cache needs k_scale and v_scale");
  if (tokens > 0x7fffffff) throw ShapeError("kv_cache_write: too many tokens for one CUDA call");
  if (int64_t(c.kv_heads) * 2 > 65535) throw ShapeError("kv_cache_write: too many KV heads for one CUDA launch");
  const int n = int(tokens);
  // Only the bits of slots below num_blocks * block_size are sorted on.
  const unsigned long long max_slot = (unsigned long long)(std::max<int64_t>(c.num_blocks * c.block_size, 2) - 1);
  const int end_bit = 64 - __builtin_clzll(max_slot);
  const unsigned long long* keys_in = reinterpret_cast<const unsigned long long*>(slots);
  size_t temp_bytes = 0;
  CORRAL_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, (unsigned long long*)nullptr,
                                                    (const int32_t*)nullptr, (int32_t*)nullptr, n, 0, end_bit, s));
  Scratch sc(s);
  const size_t o_keys = sc.reserve(size_t(n) * 8), o_iota = sc.reserve(size_t(n) * 4),
               o_order = sc.reserve(size_t(n) * 4), o_temp = sc.reserve(temp_bytes);
  sc.allocate();
  unsigned long long* sorted = sc.at<unsigned long long>(o_keys);
  int32_t* iota = sc.at<int32_t>(o_iota);
  int32_t* order = sc.at<int32_t>(o_order);
  iota_kernel<<<grid_for(n, 256), 256, 0, s>>>(iota, n);
  CORRAL_CUDA_CHECK_LAUNCH();
  CORRAL_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sc.at<void>(o_temp), temp_bytes, keys_in, sorted, iota, order, n,
                                                    0, end_bit, s));
  const dim3 grid(unsigned(n), unsigned(2 * c.kv_heads));
  kv_write_fp8_kernel<<<grid, kFp8Threads, 0, s>>>(
      static_cast<unsigned char*>(c.k), static_cast<unsigned char*>(c.v), reinterpret_cast<unsigned char*>(c.k_scale),
      reinterpret_cast<unsigned char*>(c.v_scale), c.block_stride, c.scale_step(), c.block_size, c.head_dim, k, v, ld,
      tokens, sorted, order);
  CORRAL_CUDA_CHECK_LAUNCH();
}

}  // namespace

void kv_cache_write(void* stream, const PagedKv& c, const float* k, const float* v, int64_t ld, int64_t tokens,
                    const int64_t* slots) {
  if (tokens <= 0) return;
  if (c.kv_heads < 1 || c.head_dim < 1 || c.block_size < 1)
    throw ShapeError("kv_cache_write: kv_heads, head_dim and block_size must be positive");
  if (!c.k || !c.v || !k || !v || !slots) throw InvalidInputError("kv_cache_write: a pointer is null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (c.dtype) {
    case DType::F32: return launch_rows<attn::F32>(s, c, k, v, ld, tokens, slots);
    case DType::BF16: return launch_rows<attn::BF16>(s, c, k, v, ld, tokens, slots);
    case DType::F16: return launch_rows<attn::F16>(s, c, k, v, ld, tokens, slots);
    case DType::F8_E4M3: return write_fp8(s, c, k, v, ld, tokens, slots);
    default:
      throw DTypeError(std::string("kv_cache_write: KV cache dtype ") + dtype_name(c.dtype) + " is not supported");
  }
}

}  // namespace corral::cuda
