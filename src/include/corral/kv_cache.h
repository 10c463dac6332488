// The paged KV cache: per layer, K and V blocks of block_size tokens in one pool, handed out to
// sequences by a free-list allocator. A sequence's block table maps its logical block i (tokens
// i * block_size ...) to a block id; the same id addresses that block in every layer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "corral/config.h"
#include "corral/kernels/attention.h"

namespace corral {

struct KvCacheOptions {
  int32_t block_size = 16;
  DType dtype = DType::F32;
  size_t bytes = 0;  // 0: half of the memory available now (pages are committed when first written)
};

class KvCache {
 public:
  // Throws InvalidInputError when the budget cannot hold a single block.
  KvCache(const ModelConfig& config, const KvCacheOptions& options);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  int32_t block_size() const { return block_size_; }
  DType dtype() const { return dtype_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return int64_t(free_.size()); }
  // Bytes of K and V for one token over all layers.
  size_t bytes_per_token() const { return bytes_per_token_; }
  PagedKv layer(int64_t index) const;

  // Appends n free blocks to `blocks`; returns false (and takes none) when fewer are free.
  bool allocate(int64_t n, std::vector<int32_t>& blocks);
  // Returns every block of `blocks` to the pool and clears it.
  void release(std::vector<int32_t>& blocks);

 private:
  int32_t block_size_;
  DType dtype_;
  int64_t num_layers_, kv_heads_, head_dim_;
  int64_t num_blocks_ = 0;
  size_t bytes_per_token_ = 0;
  size_t layer_bytes_ = 0;  // K (or V) of one layer: num_blocks blocks
  char* base_ = nullptr;
  size_t mapped_ = 0;
  std::vector<int32_t> free_;
};

}  // namespace corral
