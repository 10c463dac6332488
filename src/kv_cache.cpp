#include "corral/kv_cache.h"

#include <sys/mman.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "corral/error.h"

namespace corral {

namespace {

// Bytes of memory available now (MemAvailable, which counts reclaimable page cache).
size_t available_memory() {
  std::ifstream meminfo("/proc/meminfo");
  std::string line;
  while (std::getline(meminfo, line))
    if (line.rfind("MemAvailable:", 0) == 0) return size_t(std::stoull(line.substr(13))) * 1024;  // in kB
  return size_t(sysconf(_SC_AVPHYS_PAGES)) * size_t(sysconf(_SC_PAGESIZE));
}

}  // namespace

KvCache::KvCache(const ModelConfig& c, const KvCacheOptions& o)
    : block_size_(o.block_size), dtype_(o.dtype), num_layers_(c.num_layers), kv_heads_(c.num_kv_heads),
      head_dim_(c.head_dim) {
  if (block_size_ <= 0) throw InvalidInputError("block_size must be positive, got " + std::to_string(block_size_));
  if (dtype_ != DType::F32 && dtype_ != DType::BF16 && dtype_ != DType::F16)
    throw DTypeError(std::string("kv_cache_dtype ") + dtype_name(dtype_) + " is not supported (float32, bfloat16, float16)");
  bytes_per_token_ = size_t(2 * num_layers_ * kv_heads_ * head_dim_) * dtype_size(dtype_);
  size_t budget = o.bytes;
  if (budget == 0) budget = available_memory() / 2;
  const size_t block_bytes = bytes_per_token_ * size_t(block_size_);
  num_blocks_ = int64_t(budget / block_bytes);
  if (num_blocks_ < 1)
    throw InvalidInputError("kv_cache_bytes=" + std::to_string(budget) + " cannot hold one KV block of " +
                            std::to_string(block_bytes) + " bytes (block_size " + std::to_string(block_size_) + ")");
  if (num_blocks_ > 0x7fffffff) num_blocks_ = 0x7fffffff;
  layer_bytes_ = size_t(num_blocks_) * size_t(block_size_) * size_t(kv_heads_ * head_dim_) * dtype_size(dtype_);
  mapped_ = layer_bytes_ * size_t(2 * num_layers_);
  // Anonymous, uncommitted memory: a large budget costs nothing until blocks are written.
  void* m = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED)
    throw OutOfKVCacheError("cannot reserve " + std::to_string(mapped_) + " bytes of address space for the KV cache");
  base_ = static_cast<char*>(m);
  free_.reserve(size_t(num_blocks_));
  for (int64_t b = num_blocks_ - 1; b >= 0; --b) free_.push_back(int32_t(b));  // hand out low ids first
}

KvCache::~KvCache() {
  if (base_) munmap(base_, mapped_);
}

PagedKv KvCache::layer(int64_t index) const {
  PagedKv p;
  p.k = base_ + size_t(2 * index) * layer_bytes_;
  p.v = base_ + size_t(2 * index + 1) * layer_bytes_;
  p.block_stride = int64_t(block_size_) * kv_heads_ * head_dim_ * int64_t(dtype_size(dtype_));
  p.dtype = dtype_;
  p.num_blocks = num_blocks_;
  p.block_size = block_size_;
  p.kv_heads = int32_t(kv_heads_);
  p.head_dim = int32_t(head_dim_);
  return p;
}

bool KvCache::allocate(int64_t n, std::vector<int32_t>& blocks) {
  if (n > int64_t(free_.size())) return false;
  for (int64_t i = 0; i < n; ++i) {
    blocks.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void KvCache::release(std::vector<int32_t>& blocks) {
  free_.insert(free_.end(), blocks.rbegin(), blocks.rend());
  blocks.clear();
}

}  // namespace corral
