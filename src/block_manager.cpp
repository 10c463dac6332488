#include "corral/block_manager.h"

#include <algorithm>
#include <functional>
#include <string>
#include <utility>

#include "corral/error.h"
#include "corral/hash.h"

namespace corral {

namespace {

// 64-bit hash of a block: its parent's hash and its tokens (never 0, which means "no hash").
uint64_t block_hash(uint64_t parent, const int32_t* tokens, int64_t n) {
  uint64_t h = mix64(parent + 0x9e3779b97f4a7c15ULL);
  for (int64_t i = 0; i < n; ++i) h = mix64(h ^ uint64_t(uint32_t(tokens[i])));
  return h ? h : 1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

BlockManager::BlockManager(const Options& o) : o_(o) {
  if (o_.num_pages < 1 || o_.num_pages > 0x7fffffff)
    throw InvalidInputError("the KV cache needs 1 to 2^31 - 1 pages, got " + std::to_string(o_.num_pages));
  if (o_.block_size < 1) throw InvalidInputError("block_size must be positive");
  for (AttentionKind k : o_.groups)
    if (k == AttentionKind::Local && o_.chunk_size < 1)
      throw InvalidInputError("local layer groups need a positive attention chunk size");
  refs_.assign(o_.num_pages, 0);
  page_hash_.assign(o_.num_pages, 0);
  page_group_.assign(o_.num_pages, -1);
  lru_pos_.resize(o_.num_pages);
  cache_.resize(o_.groups.size());
  free_.reserve(o_.num_pages);
  for (int64_t p = o_.num_pages - 1; p >= 0; --p) free_.push_back(int32_t(p));  // low ids first
}

BlockManager::Seq& BlockManager::seq(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw InvalidInputError("no KV-cache sequence " + std::to_string(id));
  return it->second;
}

const BlockManager::Seq& BlockManager::seq(SeqId id) const { return const_cast<BlockManager*>(this)->seq(id); }

int32_t BlockManager::refcount(int32_t page) const { return refs_[checked_page(page)]; }
bool BlockManager::is_cached(int32_t page) const { return page_hash_[checked_page(page)] != 0; }

int64_t BlockManager::checked_page(int32_t page) const {
  if (page < 0 || size_t(page) >= refs_.size())
    throw InvalidInputError("page " + std::to_string(page) + " is outside [0, " + std::to_string(refs_.size()) + ")");
  return page;
}

int64_t BlockManager::num_tokens(SeqId id) const { return seq(id).appended; }
int64_t BlockManager::num_computed(SeqId id) const { return int64_t(seq(id).tokens.size()); }
const std::vector<int32_t>& BlockManager::table(SeqId id, int64_t group) const { return seq(id).tables.at(group); }

std::vector<TableEntry> BlockManager::take_table_changes() { return std::exchange(changes_, {}); }

void BlockManager::set_entry(Seq& s, int64_t group, int64_t block, int32_t page) {
  std::vector<int32_t>& t = s.tables[group];
  if (block == int64_t(t.size()))
    t.push_back(page);
  else
    t[block] = page;
  changes_.push_back({int32_t(group), s.row, int32_t(block), page});
}

int32_t BlockManager::take_row() {
  if (free_rows_.empty()) return num_rows_++;
  std::pop_heap(free_rows_.begin(), free_rows_.end(), std::greater<>());
  const int32_t row = free_rows_.back();
  free_rows_.pop_back();
  return row;
}

void BlockManager::check_blocks(int64_t blocks) const {
  if (o_.max_blocks > 0 && blocks > o_.max_blocks)
    throw InvalidInputError("a sequence of " + std::to_string(blocks) + " blocks is longer than the block tables' " +
                            std::to_string(o_.max_blocks) + " blocks (max_model_len)");
}

std::vector<BlockManager::SeqId> BlockManager::sequences() const {
  std::vector<SeqId> out;
  for (const auto& [id, s] : seqs_) out.push_back(id);
  return out;
}

int64_t BlockManager::first_local_block(int64_t next_position) const {
  return (next_position - next_position % o_.chunk_size) / o_.block_size;
}

void BlockManager::acquire(int32_t page, int64_t group) {
  if (refs_[page] == 0) {
    if (page_hash_[page] != 0) evictable_.erase(lru_pos_[page]);
    page_group_[page] = int32_t(group);
    ++used_[int(o_.groups[group])];
  }
  ++refs_[page];
}

void BlockManager::release(int32_t page) {
  if (--refs_[page] > 0) return;
  --used_[int(o_.groups[page_group_[page]])];
  if (page_hash_[page] != 0) {
    lru_pos_[page] = evictable_.insert(evictable_.end(), page);
  } else {
    free_.push_back(page);
  }
}

int32_t BlockManager::take_page(int64_t group) {
  int32_t page = -1;
  if (!free_.empty()) {
    page = free_.back();
    free_.pop_back();
  } else if (!evictable_.empty()) {  // evict the least recently used cached block
    page = evictable_.front();
    evictable_.pop_front();
    cache_[page_group_[page]].erase(page_hash_[page]);
    page_hash_[page] = 0;
  } else {
    return -1;
  }
  acquire(page, group);
  return page;
}

int32_t BlockManager::cached_page(int64_t group, uint64_t hash, uint64_t parent, const int32_t* tokens) const {
  const auto& map = cache_[group];
  auto it = map.find(hash);
  if (it == map.end() || it->second.parent != parent ||
      !std::equal(it->second.tokens.begin(), it->second.tokens.end(), tokens))
    return -1;
  return it->second.page;
}

int64_t BlockManager::add(SeqId id, const std::vector<int32_t>& prompt, bool reuse) {
  if (seqs_.count(id)) throw InvalidInputError("KV-cache sequence " + std::to_string(id) + " already exists");
  const int64_t bs = o_.block_size, G = num_groups();
  Seq s;
  s.tables.resize(G);
  s.row = take_row();
  int64_t hit = 0;  // cached full blocks taken over
  std::vector<uint64_t> hashes;
  if (reuse && o_.prefix_caching && prompt.size() > 1) {
    int64_t max_blocks = (int64_t(prompt.size()) - 1) / bs;  // leave a token to compute
    if (o_.max_blocks > 0) max_blocks = std::min(max_blocks, o_.max_blocks);  // the tables' width
    for (int64_t b = 0; b < max_blocks; ++b)
      hashes.push_back(block_hash(b ? hashes[b - 1] : 0, prompt.data() + b * bs, bs));
    auto served = [&](int64_t group, int64_t b) {
      return cached_page(group, hashes[b], b ? hashes[b - 1] : 0, prompt.data() + b * bs) >= 0;
    };
    // The longest prefix the global groups hold, then the longest of it whose last chunk the
    // local groups still hold.
    int64_t global = 0;
    for (; global < max_blocks; ++global) {
      bool all = true;
      for (int64_t g = 0; g < G && all; ++g) all = o_.groups[g] != AttentionKind::Global || served(g, global);
      if (!all) break;
    }
    for (hit = global; hit > 0; --hit) {
      const int64_t lo = o_.chunk_size > 0 ? first_local_block(hit * bs) : hit;
      bool all = true;
      for (int64_t g = 0; g < G && all; ++g)
        if (o_.groups[g] == AttentionKind::Local)
          for (int64_t b = lo; b < hit && all; ++b) all = served(g, b);
      if (all) break;
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t lo = o_.groups[g] == AttentionKind::Local ? first_local_block(hit * bs) : 0;
      for (int64_t b = 0; b < hit; ++b) {
        const int32_t page = b < lo ? -1 : cached_page(g, hashes[b], b ? hashes[b - 1] : 0, prompt.data() + b * bs);
        if (page >= 0) acquire(page, g);
        set_entry(s, g, b, page);
      }
    }
  }
  s.tokens.assign(prompt.begin(), prompt.begin() + hit * bs);
  s.hashes.assign(hashes.begin(), hashes.begin() + hit);
  s.appended = hit * bs;
  prefix_hit_tokens_ += hit * bs;
  seqs_.emplace(id, std::move(s));
  return hit * bs;
}

int64_t BlockManager::pages_needed(SeqId id, int64_t n) const {
  const Seq& s = seq(id);
  const int64_t bs = o_.block_size, target = ceil_div(s.appended + n, bs);
  int64_t need = 0;
  for (const auto& t : s.tables) {
    need += std::max<int64_t>(0, target - int64_t(t.size()));
    if (s.appended % bs != 0) {
      const int32_t last = t[s.appended / bs];
      if (last >= 0 && refs_[last] > 1) ++need;  // copy-on-write
    }
  }
  return need;
}

bool BlockManager::append(SeqId id, int64_t n, std::vector<PageCopy>* copies) {
  Seq& s = seq(id);
  const int64_t bs = o_.block_size, G = num_groups();
  if (n <= 0) return true;
  release_local_before(s, s.appended);
  if (pages_needed(id, n) > available_pages()) return false;
  const int64_t target = ceil_div(s.appended + n, bs);
  check_blocks(target);
  for (int64_t g = 0; g < G; ++g) {
    const auto& t = s.tables[g];
    if (s.appended % bs != 0) {
      const int64_t b = s.appended / bs;
      const int32_t last = t[b];
      if (last >= 0 && refs_[last] > 1) {  // shared with another sequence: write a private copy
        const int32_t copy = take_page(g);
        copies->push_back({last, copy});
        release(last);
        set_entry(s, g, b, copy);
      }
    }
    while (int64_t(t.size()) < target) set_entry(s, g, int64_t(t.size()), take_page(g));
  }
  s.appended += n;
  return true;
}

void BlockManager::commit(SeqId id, const int32_t* tokens, int64_t n) {
  Seq& s = seq(id);
  if (int64_t(s.tokens.size()) + n > s.appended)
    throw InvalidInputError("commit of " + std::to_string(n) + " tokens to KV-cache sequence " + std::to_string(id) +
                            " exceeds the room appended for it");
  s.tokens.insert(s.tokens.end(), tokens, tokens + n);
  const int64_t bs = o_.block_size;
  // Hash the blocks before releasing: a released local block stays in the prefix cache.
  while (int64_t(s.hashes.size() + 1) * bs <= int64_t(s.tokens.size())) {
    const int64_t b = int64_t(s.hashes.size());
    const uint64_t parent = b ? s.hashes[b - 1] : 0;
    const int32_t* block_tokens = s.tokens.data() + b * bs;
    s.hashes.push_back(block_hash(parent, block_tokens, bs));
    if (!o_.prefix_caching) continue;
    for (int64_t g = 0; g < num_groups(); ++g) {
      const int32_t page = s.tables[g][b];
      if (page < 0 || page_hash_[page] != 0 || cache_[g].count(s.hashes[b])) continue;
      cache_[g].emplace(s.hashes[b], CachedBlock{page, parent, std::vector<int32_t>(block_tokens, block_tokens + bs)});
      page_hash_[page] = s.hashes[b];
    }
  }
  release_local_before(s, int64_t(s.tokens.size()));
}

void BlockManager::release_local_before(Seq& s, int64_t next_position) {
  if (o_.chunk_size <= 0) return;
  // Blocks wholly before the chunk of the next token are never read again.
  const int64_t lo = first_local_block(next_position);
  for (int64_t g = 0; g < num_groups(); ++g) {
    if (o_.groups[g] != AttentionKind::Local) continue;
    const auto& t = s.tables[g];
    for (int64_t b = 0; b < std::min<int64_t>(lo, int64_t(t.size())); ++b)
      if (t[b] >= 0) {
        release(t[b]);
        set_entry(s, g, b, -1);
      }
  }
}

void BlockManager::fork(SeqId parent, SeqId child) {
  if (seqs_.count(child)) throw InvalidInputError("KV-cache sequence " + std::to_string(child) + " already exists");
  Seq copy = seq(parent);
  copy.row = take_row();
  for (int64_t g = 0; g < num_groups(); ++g)
    for (int64_t b = 0; b < int64_t(copy.tables[g].size()); ++b) {
      const int32_t page = copy.tables[g][b];
      if (page >= 0) acquire(page, g);
      changes_.push_back({int32_t(g), copy.row, int32_t(b), page});
    }
  seqs_.emplace(child, std::move(copy));
}

void BlockManager::free(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  for (const auto& t : it->second.tables)
    for (int32_t page : t)
      if (page >= 0) release(page);
  free_rows_.push_back(it->second.row);
  std::push_heap(free_rows_.begin(), free_rows_.end(), std::greater<>());
  seqs_.erase(it);
}

BlockManager::Stats BlockManager::stats() const {
  Stats st;
  st.pages_total = o_.num_pages;
  st.pages_free = available_pages();
  for (const auto& m : cache_) st.pages_cached += int64_t(m.size());
  st.pages_used_global = used_[int(AttentionKind::Global)];
  st.pages_used_local = used_[int(AttentionKind::Local)];
  st.prefix_hit_tokens = prefix_hit_tokens_;
  return st;
}

}  // namespace corral
