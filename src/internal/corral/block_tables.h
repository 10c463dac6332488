// The persistent block tables the attention reads (vLLM v1's BlockTable): per layer group one
// pool of rows [rows, max_blocks] int32 in the KV cache's memory (host memory on the CPU), a
// row per sequence as the BlockManager hands them out. Before a pass, sync() writes the entries
// that changed since the last one: a few per step, not every table every step.
//
// max_blocks is the longest table the engine can see (max_model_len's blocks, at most the pages a
// global group can hold); rows start at twice max_num_seqs (running sequences, plus forks of
// n > 1 samples) and double when the BlockManager has handed out more (many forks, prompt_logits
// over many prompts), every live row rewritten then. A row's entries past its table's length are
// stale: the kernels read only the blocks of positions the sequence holds.
#pragma once

#include <cstdint>
#include <unordered_set>
#include <vector>

#include "corral/block_manager.h"
#include "corral/device.h"

namespace corral {

class BlockTables {
 public:
  BlockTables(int64_t groups, int64_t max_blocks, int64_t rows, Device device);

  // Applies the block manager's recorded changes, ordered on `stream` (on a GPU: one upload of
  // the changed entries and one kernel scattering them).
  void sync(BlockManager& blocks, const Stream& stream);

  // Group g's pool, [rows(), max_blocks()] (its address changes only when rows grow).
  const int32_t* group(int64_t g) const { return pool_.data() + g * rows_ * max_blocks_; }
  int32_t max_blocks() const { return int32_t(max_blocks_); }
  int64_t rows() const { return rows_; }

 private:
  int64_t groups_, max_blocks_, rows_;
  DeviceArray<int32_t> pool_;       // [groups, rows, max_blocks]
  std::vector<int64_t> entries_;    // (index into pool_, page) pairs of one sync
  std::unordered_set<int64_t> seen_;
  DeviceArray<int64_t> staged_;     // entries_ on a GPU
};

}  // namespace corral
