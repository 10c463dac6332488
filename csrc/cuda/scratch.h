// Temporary device memory for one op: reserve() each piece, allocate() once, then at<T>(offset);
// freed on the stream when the op is done (or leaves by an exception).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "check.h"

namespace corral::cuda {

class Scratch {
 public:
  explicit Scratch(cudaStream_t s) : stream_(s) {}
  ~Scratch() {
    if (base_) cudaFreeAsync(base_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  // Reserves `bytes` (256-byte aligned) and returns its offset; allocate() then makes it real.
  size_t reserve(size_t bytes) {
    const size_t at = size_;
    size_ += (bytes + 255) / 256 * 256;
    return at;
  }
  size_t size() const { return size_; }
  void allocate() { CORRAL_CUDA_CHECK(cudaMallocAsync(&base_, size_ ? size_ : 256, stream_)); }
  template <class T>
  T* at(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(base_) + offset);
  }

 private:
  cudaStream_t stream_;
  void* base_ = nullptr;
  size_t size_ = 0;
};

}  // namespace corral::cuda
