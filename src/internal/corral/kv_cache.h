// The paged KV cache: one pool of pages in memory, shared by every layer group, and the block
// manager that hands the pages to sequences.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "corral/block_manager.h"
#include "corral/block_tables.h"
#include "corral/config.h"
#include "corral/device.h"
#include "corral/kernels/kv_cache.h"

namespace corral {

// How a model's layers map onto pages. Global (full attention) and local (chunked attention)
// layers form groups of `layers_per_group` layers (the smaller kind's count, so Llama 4's 12 NoPE
// and 36 chunked layers make 1 global and 3 local groups); a page holds one block of every layer
// of one group: per layer K and V [kv_heads, block_size, head_dim], then fp8 scales if any.
struct KvLayout {
  int32_t block_size = 16;
  DType dtype = DType::F32;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t chunk_size = 0;  // attention chunk of the local layers (0: none)
  int64_t layers_per_group = 0;
  std::vector<AttentionKind> group_kind;  // per group
  std::vector<int32_t> group_of_layer;    // per layer
  std::vector<int32_t> slot_of_layer;     // the layer's place within its group's page
  int64_t data_bytes = 0;  // K and V values of one layer's block
  int64_t page_bytes = 0;

  int64_t num_layers() const { return int64_t(group_of_layer.size()); }
  int64_t num_groups(AttentionKind kind) const;
  // KV bytes per token of every layer, scales included.
  double bytes_per_token() const;
  // Bytes of the pages a sequence of `tokens` tokens holds; `chunk_savings` false counts what it
  // would hold if local layers kept every block.
  int64_t sequence_bytes(int64_t tokens, bool chunk_savings) const;
};

KvLayout make_kv_layout(const ModelConfig& config, int32_t block_size, DType dtype);

class KvCache {
 public:
  // `bytes` of memory on the stream's device. On the CPU, 0 means half of what this process may
  // still use now (MemAvailable within its cgroup's memory limit; pages are committed as first
  // written); on a GPU, kGpuDefaultShare of its free memory now (after the weights), the rest
  // left to activations and workspaces. Page copies (copy-on-write) run on `stream`. The block
  // tables hold sequences of up to max_len tokens, rows for max_seqs sequences at first (see
  // BlockTables).
  KvCache(const KvLayout& layout, size_t bytes, bool prefix_caching, int64_t max_len, int64_t max_seqs,
          const Stream& stream = {});
  static constexpr double kGpuDefaultShare = 0.85;
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const KvLayout& layout() const { return layout_; }
  BlockManager& blocks() { return blocks_; }
  const BlockManager& blocks() const { return blocks_; }
  int64_t num_pages() const { return num_pages_; }
  // Layer `layer`'s view of the pool (its group's pages, its slot in them).
  PagedKv layer(int64_t layer) const;

  // The block tables the attention reads, rows as blocks().row(id) says; sync_tables() first
  // writes the block manager's changes since the last call (ordered on the cache's stream).
  const BlockTables& tables() const { return tables_; }
  const BlockTables& sync_tables();

  // Makes room for n more tokens of a sequence, carrying out any copy-on-write; false when the
  // pool has too few pages (nothing taken).
  bool append(BlockManager::SeqId id, int64_t n);

 private:
  static int64_t pages_for(const KvLayout& layout, size_t bytes, Device device);
  static int64_t table_width(const KvLayout& layout, int64_t num_pages, int64_t max_len);
  KvLayout layout_;
  Stream stream_;
  int64_t num_pages_;
  BlockManager blocks_;
  BlockTables tables_;
  char* pool_ = nullptr;
  size_t mapped_ = 0;      // CPU: the anonymous mapping's size
  DeviceBuffer on_gpu_;    // GPU: the pool
  DeviceArray<int32_t> copies_;  // GPU: an append's copy-on-write page lists
};

}  // namespace corral
