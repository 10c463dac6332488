// Bookkeeping of the paged KV cache: which pages each sequence's blocks use, reference counts,
// copy-on-write, the prefix cache, and freeing the blocks chunked local layers no longer need.
// It knows nothing of K/V values; KvCache pairs it with the memory.
//
// Layers are split into groups of equal size, each group with its own block table per sequence;
// a page holds one block of every layer of one group, so all groups share one pool of pages.
// Global groups keep every block of a sequence. Local groups (chunked attention) keep only the
// blocks of the chunk of the sequence's next token: the others are released as it moves on.
//
// Each sequence also holds a row of the persistent block tables (BlockTables): the same row in
// every group, from add / fork until free. Every change of a table entry is recorded, so that
// the tables the kernels read are updated entry by entry rather than rebuilt each pass.
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

namespace corral {

enum class AttentionKind : uint8_t { Global, Local };

// A page to copy before a block that several sequences share is written.
struct PageCopy {
  int32_t src = 0;
  int32_t dst = 0;
};

// One change of a block table: entry `block` of row `row` of group `group` now holds `page`
// (-1: released).
struct TableEntry {
  int32_t group = 0;
  int32_t row = 0;
  int32_t block = 0;
  int32_t page = 0;
};

class BlockManager {
 public:
  using SeqId = int64_t;

  struct Options {
    int64_t num_pages = 0;
    int32_t block_size = 16;
    std::vector<AttentionKind> groups;  // the kind of each layer group
    int64_t chunk_size = 0;             // attention chunk of the local groups
    bool prefix_caching = true;
    int64_t max_blocks = 0;  // longest table (the block tables' width); 0: no limit
  };

  struct Stats {
    int64_t pages_total = 0;
    int64_t pages_free = 0;          // takeable now: never used, or cached with no user (evictable)
    int64_t pages_cached = 0;        // in the prefix cache (used or not)
    int64_t pages_used_global = 0;   // held by global groups' tables
    int64_t pages_used_local = 0;    // held by local groups' tables
    int64_t prefix_hit_tokens = 0;   // prompt tokens served from the prefix cache, in total
  };

  explicit BlockManager(const Options& options);

  // Starts sequence `id` for `prompt`. With prefix caching and `reuse`, it takes over the longest
  // cached prefix of full blocks that every group can serve (a local group needs the blocks of
  // the prefix's last chunk), always leaving at least one prompt token to compute. Returns that
  // prefix's length: tokens whose K/V are already in the cache. Takes no free pages.
  int64_t add(SeqId id, const std::vector<int32_t>& prompt, bool reuse = true);

  // Makes room for the next n tokens of `id`: gives the sequence a private copy of a
  // shared, partly filled last block (appending PageCopy entries the caller must carry out
  // before writing) and new pages for new blocks. Returns false, taking no pages, when too few
  // pages are available.
  bool append(SeqId id, int64_t n, std::vector<PageCopy>* copies);
  // Pages append(id, n) would take at most.
  int64_t pages_needed(SeqId id, int64_t n) const;
  // Whether append(id, n) would succeed and still leave `keep_free` pages available (the
  // scheduler's watermark: room for running sequences to keep decoding).
  bool can_append(SeqId id, int64_t n, int64_t keep_free = 0) const {
    return pages_needed(id, n) + keep_free <= available_pages();
  }

  // The first n tokens appended but not yet committed now hold K/V, for these token ids. Blocks
  // they fill join the prefix cache; local groups release the blocks wholly before the chunk of
  // the next token.
  void commit(SeqId id, const int32_t* tokens, int64_t n);

  // `child` starts as a copy of `parent`, sharing its pages (copy-on-write on later appends).
  void fork(SeqId parent, SeqId child);
  // Releases every page of `id`; cached pages stay reusable until evicted (least recently used).
  void free(SeqId id);

  bool contains(SeqId id) const { return seqs_.count(id) != 0; }
  int64_t num_tokens(SeqId id) const;    // tokens with room (appended)
  int64_t num_computed(SeqId id) const;  // tokens committed
  // Page of each block of `id` in `group`; -1 for blocks a local group released.
  const std::vector<int32_t>& table(SeqId id, int64_t group) const;
  // The block-table row of `id` (rows are reused after free, lowest first), and how many rows
  // have been handed out at most: the sequences held at once at their peak.
  int32_t row(SeqId id) const { return seq(id).row; }
  int32_t num_rows() const { return num_rows_; }
  // The table changes since the last call, oldest first (a later one overrides an earlier one).
  std::vector<TableEntry> take_table_changes();
  int64_t num_groups() const { return int64_t(o_.groups.size()); }
  AttentionKind group_kind(int64_t group) const { return o_.groups[group]; }
  int32_t block_size() const { return o_.block_size; }
  int64_t max_blocks() const { return o_.max_blocks; }  // longest table; 0: no limit

  int64_t available_pages() const { return int64_t(free_.size() + evictable_.size()); }
  // Of a page in [0, num_pages): InvalidInputError otherwise.
  int32_t refcount(int32_t page) const;
  bool is_cached(int32_t page) const;
  Stats stats() const;
  std::vector<SeqId> sequences() const;

 private:
  struct Seq {
    std::vector<std::vector<int32_t>> tables;  // per group
    std::vector<int32_t> tokens;               // committed token ids
    std::vector<uint64_t> hashes;              // hash chain of the committed full blocks
    int64_t appended = 0;                      // tokens with room
    int32_t row = -1;                          // its block-table row
  };
  struct CachedBlock {
    int32_t page;
    uint64_t parent;
    std::vector<int32_t> tokens;
  };

  Seq& seq(SeqId id);
  const Seq& seq(SeqId id) const;
  int32_t take_page(int64_t group);  // a free or evicted page, held once by `group`; -1 if none
  int64_t checked_page(int32_t page) const;  // page as an index; InvalidInputError outside the pool
  void acquire(int32_t page, int64_t group);
  void release(int32_t page);
  int32_t cached_page(int64_t group, uint64_t hash, uint64_t parent, const int32_t* tokens) const;
  int64_t first_local_block(int64_t next_position) const;
  void release_local_before(Seq& s, int64_t next_position);
  // Sets entry `block` of s's table of `group` (block == size: appends), recording the change.
  void set_entry(Seq& s, int64_t group, int64_t block, int32_t page);
  int32_t take_row();
  void check_blocks(int64_t blocks) const;  // InvalidInputError past Options::max_blocks

  Options o_;
  std::unordered_map<SeqId, Seq> seqs_;
  std::vector<int32_t> refs_;
  std::vector<uint64_t> page_hash_;  // 0: not in the prefix cache
  std::vector<int32_t> page_group_;  // the group whose tables hold the page
  int64_t used_[2] = {0, 0};          // pages with users, by AttentionKind
  std::vector<int32_t> free_;                   // never-cached free pages (a stack)
  std::list<int32_t> evictable_;                // cached pages nobody uses, least recent first
  std::vector<std::list<int32_t>::iterator> lru_pos_;
  std::vector<std::unordered_map<uint64_t, CachedBlock>> cache_;  // per group: hash -> block
  int64_t prefix_hit_tokens_ = 0;
  std::vector<int32_t> free_rows_;  // a min-heap of rows given back
  int32_t num_rows_ = 0;
  std::vector<TableEntry> changes_;
};

}  // namespace corral
