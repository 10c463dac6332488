#include "corral/block_tables.h"

#include <algorithm>
#include <string>

#include "corral/error.h"
#include "corral/kernels/kv_cache.h"

namespace corral {

BlockTables::BlockTables(int64_t groups, int64_t max_blocks, int64_t rows, Device device)
    : groups_(groups), max_blocks_(max_blocks), rows_(std::max<int64_t>(rows, 1)), pool_(device), staged_(device) {
  if (max_blocks < 1 || max_blocks > 0x7fffffff)
    throw InvalidInputError("block tables need 1 to 2^31 - 1 blocks per row, got " + std::to_string(max_blocks));
  pool_.reserve(size_t(std::max<int64_t>(groups_, 1) * rows_ * max_blocks_));
}

void BlockTables::sync(BlockManager& blocks, const Stream& stream) {
  std::vector<TableEntry> changes = blocks.take_table_changes();
  if (blocks.num_rows() > rows_) {  // grown: every live row written anew into the larger pool
    rows_ = std::max<int64_t>(blocks.num_rows(), 2 * rows_);
    pool_.reserve(size_t(groups_ * rows_ * max_blocks_));
    changes.clear();
    for (BlockManager::SeqId id : blocks.sequences())
      for (int64_t g = 0; g < groups_; ++g) {
        const std::vector<int32_t>& t = blocks.table(id, g);
        for (size_t b = 0; b < t.size(); ++b) changes.push_back({int32_t(g), blocks.row(id), int32_t(b), t[b]});
      }
  }
  if (changes.empty()) return;
  // The latest change of each entry only (the kernel writes them in any order).
  entries_.clear();
  seen_.clear();
  for (auto e = changes.rbegin(); e != changes.rend(); ++e) {
    const int64_t index = (e->group * rows_ + e->row) * max_blocks_ + e->block;
    if (!seen_.insert(index).second) continue;
    entries_.push_back(index);
    entries_.push_back(e->page);
  }
  use_device(stream.device);
  kernels::block_table_set(stream, pool_.data(), on_device(staged_, entries_, stream), int64_t(entries_.size() / 2));
}

}  // namespace corral
