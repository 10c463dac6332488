// BlockManager: page allocation, reference counts and copy-on-write, prefix-cache hits and
// least-recently-used eviction, local groups releasing old chunks, and running out of pages.
#include <map>
#include <numeric>
#include <set>
#include <vector>

#include "check.h"
#include "corral/block_manager.h"
#include "corral/error.h"

using corral::AttentionKind;
using corral::BlockManager;
using corral::PageCopy;

namespace {

constexpr int32_t kBlock = 4;

BlockManager make(int64_t pages, std::vector<AttentionKind> groups = {AttentionKind::Global}, int64_t chunk = 0) {
  BlockManager::Options o;
  o.num_pages = pages;
  o.block_size = kBlock;
  o.groups = std::move(groups);
  o.chunk_size = chunk;
  return BlockManager(o);
}

std::vector<int32_t> tokens(int32_t first, int32_t n) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

// Starts `id` for `prompt` and computes all of it (append, then commit); returns the prefix hit.
int64_t run_prompt(BlockManager& bm, BlockManager::SeqId id, const std::vector<int32_t>& prompt) {
  const int64_t hit = bm.add(id, prompt);
  std::vector<PageCopy> copies;
  CHECK(bm.append(id, int64_t(prompt.size()) - hit, &copies));
  CHECK(copies.empty());
  bm.commit(id, prompt.data() + hit, int64_t(prompt.size()) - hit);
  return hit;
}

void allocation() {
  BlockManager bm = make(8);
  CHECK(bm.add(1, tokens(0, 10)) == 0);
  CHECK(bm.pages_needed(1, 10) == 3);
  std::vector<PageCopy> copies;
  CHECK(bm.append(1, 10, &copies));
  CHECK(copies.empty());
  const std::vector<int32_t>& t = bm.table(1, 0);
  CHECK(t.size() == 3);
  CHECK(std::set<int32_t>(t.begin(), t.end()).size() == 3);
  for (int32_t page : t) CHECK(page >= 0 && page < 8 && bm.refcount(page) == 1);
  CHECK(bm.num_tokens(1) == 10);
  CHECK(bm.num_computed(1) == 0);
  CHECK(bm.available_pages() == 5);
  CHECK(bm.stats().pages_used_global == 3);
  // Two more tokens fit the last block's free slots.
  CHECK(bm.pages_needed(1, 2) == 0);
  CHECK(bm.append(1, 2, &copies));
  CHECK(bm.available_pages() == 5);
  bm.free(1);
  CHECK(!bm.contains(1));
  CHECK(bm.available_pages() == 8);
  CHECK(bm.stats().pages_used_global == 0);
}

void fork_and_copy_on_write() {
  BlockManager bm = make(8);
  run_prompt(bm, 1, tokens(0, 10));  // blocks: full, full, half
  bm.fork(1, 2);
  const std::vector<int32_t> parent = bm.table(1, 0);
  CHECK(bm.table(2, 0) == parent);
  for (int32_t page : parent) CHECK(bm.refcount(page) == 2);
  CHECK(bm.pages_needed(2, 1) == 1);  // the shared half block is copied before the write
  std::vector<PageCopy> copies;
  CHECK(bm.append(2, 1, &copies));
  CHECK(copies.size() == 1);
  CHECK(copies[0].src == parent[2]);
  CHECK(copies[0].dst == bm.table(2, 0)[2] && copies[0].dst != parent[2]);
  CHECK(bm.refcount(parent[2]) == 1 && bm.refcount(copies[0].dst) == 1);
  CHECK(bm.refcount(parent[0]) == 2 && bm.refcount(parent[1]) == 2);
  bm.free(2);
  for (int32_t page : parent) CHECK(bm.refcount(page) == 1);
  CHECK(bm.refcount(copies[0].dst) == 0);
  CHECK_THROWS(corral::InvalidInputError, bm.fork(1, 1), "already exists");
  CHECK_THROWS(corral::InvalidInputError, bm.fork(7, 3), "no KV-cache sequence 7");
}

void prefix_cache_hits() {
  BlockManager bm = make(8);
  const std::vector<int32_t> prompt = tokens(100, 9);  // two full blocks and one token
  CHECK(run_prompt(bm, 1, prompt) == 0);
  const std::vector<int32_t> pages = bm.table(1, 0);
  CHECK(bm.is_cached(pages[0]) && bm.is_cached(pages[1]) && !bm.is_cached(pages[2]));
  bm.free(1);
  CHECK(bm.stats().pages_cached == 2);
  CHECK(bm.available_pages() == 8);  // cached pages nobody uses stay takeable

  CHECK(bm.add(2, prompt) == 8);  // both full blocks, leaving a token to compute
  CHECK(bm.table(2, 0) == std::vector<int32_t>(pages.begin(), pages.begin() + 2));
  CHECK(bm.refcount(pages[0]) == 1 && bm.num_computed(2) == 8);
  CHECK(bm.stats().prefix_hit_tokens == 8);
  CHECK(bm.add(3, tokens(100, 8)) == 4);  // a whole-block prompt keeps its last block to compute
  std::vector<int32_t> second_differs = prompt;
  second_differs[5] = -1;
  CHECK(bm.add(4, second_differs) == 4);
  std::vector<int32_t> first_differs = prompt;
  first_differs[0] = -1;
  CHECK(bm.add(5, first_differs) == 0);
  CHECK(bm.add(6, prompt, /*reuse=*/false) == 0);
  CHECK(bm.refcount(pages[0]) == 3);  // sequences 2, 3 and 4
  CHECK(bm.stats().prefix_hit_tokens == 16);
  CHECK_THROWS(corral::InvalidInputError, bm.add(2, prompt), "already exists");

  BlockManager::Options o;
  o.num_pages = 8;
  o.block_size = kBlock;
  o.groups = {AttentionKind::Global};
  o.prefix_caching = false;
  BlockManager off(o);
  run_prompt(off, 1, prompt);
  CHECK(off.stats().pages_cached == 0);
  off.free(1);
  CHECK(off.add(2, prompt) == 0);
}

void eviction_least_recently_used() {
  BlockManager bm = make(3);
  const std::vector<int32_t> a = tokens(0, 4), b = tokens(50, 4);
  run_prompt(bm, 1, a);
  bm.free(1);
  run_prompt(bm, 2, b);
  bm.free(2);
  CHECK(bm.stats().pages_cached == 2);
  // Two pages: the never-used one, then the least recently released cached one (a's).
  run_prompt(bm, 3, tokens(200, 8));
  CHECK(bm.available_pages() == 1);
  CHECK(bm.stats().pages_cached == 3);  // b's block and sequence 3's two
  bm.free(3);
  std::vector<int32_t> a_more = a, b_more = b;
  a_more.push_back(9);
  b_more.push_back(9);
  CHECK(bm.add(4, a_more) == 0);
  CHECK(bm.add(5, b_more) == 4);
}

void local_groups_release_old_chunks() {
  BlockManager bm = make(16, {AttentionKind::Global, AttentionKind::Local}, /*chunk=*/8);
  run_prompt(bm, 1, tokens(0, 10));  // the next token (10) is in the chunk [8, 16)
  const std::vector<int32_t>& local = bm.table(1, 1);
  CHECK(local.size() == 3);
  CHECK(local[0] == -1 && local[1] == -1 && local[2] >= 0);
  for (int32_t page : bm.table(1, 0)) CHECK(page >= 0);
  const BlockManager::Stats st = bm.stats();
  CHECK(st.pages_used_global == 3 && st.pages_used_local == 1);
  CHECK(bm.available_pages() == 12);
}

void out_of_blocks() {
  BlockManager bm = make(2);
  CHECK(bm.add(1, tokens(0, 9)) == 0);
  CHECK(bm.pages_needed(1, 9) == 3);
  CHECK(!bm.can_append(1, 9));
  std::vector<PageCopy> copies;
  CHECK(!bm.append(1, 9, &copies));  // fails whole: no page taken
  CHECK(bm.available_pages() == 2 && bm.num_tokens(1) == 0 && bm.table(1, 0).empty());
  CHECK(bm.append(1, 8, &copies));
  CHECK(!bm.can_append(1, 1));
  CHECK(bm.can_append(1, 0));
  CHECK(bm.available_pages() == 0);
  const int32_t t[] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
  CHECK_THROWS(corral::InvalidInputError, bm.commit(1, t, 9), "exceeds the room appended");
  CHECK_THROWS(corral::InvalidInputError, bm.append(42, 1, &copies), "no KV-cache sequence 42");
  CHECK_THROWS(corral::InvalidInputError, make(0), "1 to 2^31 - 1 pages");
  CHECK_THROWS(corral::InvalidInputError, make(4, {AttentionKind::Local}, 0), "chunk size");
}

// Replays take_table_changes() into per-row maps and checks they give every live table.
struct ReplayedRows {
  std::map<std::pair<int32_t, int32_t>, std::map<int32_t, int32_t>> rows;  // (group, row) -> block -> page
  void check_against(BlockManager& bm) {
    for (const corral::TableEntry& e : bm.take_table_changes()) rows[{e.group, e.row}][e.block] = e.page;
    for (BlockManager::SeqId id : bm.sequences())
      for (int64_t g = 0; g < bm.num_groups(); ++g) {
        const std::vector<int32_t>& t = bm.table(id, g);
        auto& row = rows[{int32_t(g), bm.row(id)}];
        for (size_t b = 0; b < t.size(); ++b) CHECK(row.count(int32_t(b)) && row[int32_t(b)] == t[b]);
      }
  }
};

void table_rows_and_changes() {
  BlockManager bm = make(16, {AttentionKind::Global, AttentionKind::Local}, 8);
  ReplayedRows replay;
  run_prompt(bm, 1, tokens(0, 10));
  bm.fork(1, 2);
  CHECK(bm.row(1) == 0 && bm.row(2) == 1 && bm.num_rows() == 2);
  replay.check_against(bm);
  std::vector<PageCopy> copies;
  CHECK(bm.append(2, 1, &copies) && copies.size() == 2);  // copy-on-write in both groups
  const int32_t t = 10;
  bm.commit(2, &t, 1);
  CHECK(bm.append(1, 7, &copies));  // a new block; the local group releases chunk 0's blocks
  bm.commit(1, tokens(10, 7).data(), 7);
  CHECK(bm.table(1, 1)[0] == -1);
  replay.check_against(bm);
  bm.free(1);
  CHECK(bm.add(3, tokens(0, 9)) == 8);  // takes row 0 back, and the cached prefix
  CHECK(bm.row(3) == 0 && bm.num_rows() == 2);
  replay.check_against(bm);
  CHECK(bm.take_table_changes().empty());
  // A table longer than Options::max_blocks is refused (nothing taken).
  BlockManager::Options o;
  o.num_pages = 16;
  o.block_size = kBlock;
  o.groups = {AttentionKind::Global};
  o.max_blocks = 2;
  BlockManager small(o);
  small.add(1, tokens(0, 1));
  CHECK(small.append(1, 8, &copies));
  CHECK_THROWS(corral::InvalidInputError, small.append(1, 1, &copies), "longer than the block tables");
  CHECK(small.available_pages() == 14);
}

}  // namespace

int main() {
  allocation();
  fork_and_copy_on_write();
  prefix_cache_hits();
  eviction_least_recently_used();
  local_groups_release_old_chunks();
  out_of_blocks();
  table_rows_and_changes();
  return check::result();
}
