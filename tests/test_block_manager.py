"""Property tests of the KV cache's block manager (hypothesis drives random programs of add /
append / fork / free with prefix reuse and eviction), against a model of what each page holds.

Every page carries, per slot, the (token, position) written there. A sequence's tables must
always read back its own tokens; a block shared by several sequences must never be written
(copy-on-write first); reference counts must equal the number of tables holding a page, and
every page not held must be takeable again."""

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from corral import _core

BLOCK = 4
LAYOUTS = [
    # (groups, chunk size): Llama 4-like mixes, a chunk that is not a multiple of the block, no local layers
    (["global", "local", "local", "local"], 8),
    (["global", "local"], 10),
    (["global", "global"], 0),
    (["local", "local"], 12),
]
TOKENS = st.integers(0, 2)
# Prompts are a prefix of one of a few fixed texts plus a random tail, so that they share cached
# blocks often (prefix hits, also on blocks whose sequences have ended).
TEXTS = [[(i * 7 + t * 3) % 5 for i in range(40)] for t in range(3)]
PROMPTS = st.builds(
    lambda text, cut, tail: TEXTS[text][:cut] + tail,
    st.integers(0, len(TEXTS) - 1),
    st.integers(0, 40),
    st.lists(TOKENS, max_size=6),
).filter(len)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(layout=st.sampled_from(LAYOUTS), pages=st.integers(6, 60), caching=st.booleans())
    def setup(self, layout, pages, caching):
        self.groups, self.chunk = layout
        self.bm = _core.BlockManager(pages, BLOCK, self.groups, self.chunk, caching)
        self.pages = pages
        self.content = {}  # page -> [(token, position) or None] * BLOCK
        self.seqs = {}  # id -> {"tokens": all known tokens, "computed": int}
        self.next_id = 0
        self.rows = {}  # (group, row) -> {block: page}: the table changes replayed, as BlockTables does

    # ---------------------------------------------------------------- helpers

    def write(self, seq, start, n):
        """Writes tokens [start, start + n) of `seq` into its pages, checking no page is shared."""
        tokens = self.seqs[seq]["tokens"]
        for g in range(len(self.groups)):
            table = self.bm.table(seq, g)
            for p in range(start, start + n):
                page = table[p // BLOCK]
                assert page >= 0, "a block being written was released"
                assert self.bm.refcount(page) == 1, f"page {page} is shared but written (group {g}, position {p})"
                self.content.setdefault(page, [None] * BLOCK)[p % BLOCK] = (tokens[p], p)

    def local_first_block(self, next_position):
        return (next_position - next_position % self.chunk) // BLOCK

    # ---------------------------------------------------------------- rules

    @rule(prompt=PROMPTS, reuse=st.booleans())
    def add(self, prompt, reuse):
        seq = self.next_id
        self.next_id += 1
        hit = self.bm.add(seq, prompt, reuse)
        assert hit % BLOCK == 0 and 0 <= hit < len(prompt)
        self.seqs[seq] = {"tokens": list(prompt), "computed": hit}
        assert self.bm.num_tokens(seq) == self.bm.num_computed(seq) == hit

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), n=st.integers(1, 20))
    def append(self, data, n):
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        s = self.seqs[seq]
        start = s["computed"]
        while len(s["tokens"]) < start + n:  # generated tokens beyond the prompt
            s["tokens"].append(data.draw(TOKENS))
        available = self.bm.available_pages()
        ok, copies = self.bm.append(seq, n)
        if not ok:
            assert self.bm.pages_needed(seq, n) > self.bm.available_pages()
            assert self.bm.available_pages() >= available  # took nothing (may have released local blocks)
            return
        for src, dst in copies:  # the caller copies the pages before writing
            self.content[dst] = list(self.content.get(src, [None] * BLOCK))
        self.write(seq, start, n)
        self.bm.commit(seq, s["tokens"][start : start + n])
        s["computed"] = start + n

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.seqs)))
        child = self.next_id
        self.next_id += 1
        self.bm.fork(parent, child)
        p = self.seqs[parent]
        self.seqs[child] = {"tokens": p["tokens"][: p["computed"]], "computed": p["computed"]}

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(seq)
        del self.seqs[seq]
        assert not self.bm.contains(seq)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def refcounts_match_tables(self):
        if not hasattr(self, "bm"):
            return
        held = {}
        for seq in self.seqs:
            for g in range(len(self.groups)):
                for page in self.bm.table(seq, g):
                    if page >= 0:
                        held[page] = held.get(page, 0) + 1
        for page in range(self.pages):
            assert self.bm.refcount(page) == held.get(page, 0), f"page {page}"
        # Every page not held is takeable: none leaked, none counted twice.
        assert self.bm.available_pages() == self.pages - len(held)
        stats = self.bm.stats()
        assert stats["pages_used_global"] + stats["pages_used_local"] == len(held)
        assert stats["pages_free"] == self.pages - len(held)

    @invariant()
    def table_changes_rebuild_the_tables(self):
        """Each live sequence has its own row, and the recorded changes, replayed, give its tables."""
        if not hasattr(self, "bm"):
            return
        for group, row, block, page in self.bm.take_table_changes():
            self.rows.setdefault((group, row), {})[block] = page
        rows = [self.bm.row(seq) for seq in self.seqs]
        assert len(set(rows)) == len(rows) and all(0 <= r < self.bm.num_rows for r in rows)
        assert self.bm.num_rows <= self.next_id
        for seq in self.seqs:
            for g in range(len(self.groups)):
                replayed = self.rows.get((g, self.bm.row(seq)), {})
                table = self.bm.table(seq, g)
                assert [replayed.get(b) for b in range(len(table))] == table, (seq, g)

    @invariant()
    def sequences_read_back_their_tokens(self):
        if not hasattr(self, "bm"):
            return
        assert sorted(self.bm.sequences()) == sorted(self.seqs)
        for seq, s in self.seqs.items():
            computed = s["computed"]
            assert self.bm.num_computed(seq) == computed
            for g, kind in enumerate(self.groups):
                table = self.bm.table(seq, g)
                assert len(table) == -(-self.bm.num_tokens(seq) // BLOCK)
                # A local group holds exactly the blocks of the chunk of the next token.
                first = self.local_first_block(computed) if kind == "local" else 0
                if kind == "local":
                    assert all(page == -1 for page in table[: min(first, len(table))])
                for p in range(first * BLOCK, computed):
                    page = table[p // BLOCK]
                    assert page >= 0
                    assert self.content[page][p % BLOCK] == (s["tokens"][p], p), (seq, g, p)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_block_manager = BlockManagerMachine.TestCase


def test_prefix_reuse_takes_cached_blocks():
    """A second prompt sharing full blocks with a finished one reuses them, and only them."""
    bm = _core.BlockManager(32, BLOCK, ["global", "local"], chunk_size=8)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert bm.add(0, prompt) == 0
    assert bm.append(0, len(prompt))[0]
    bm.commit(0, prompt)
    bm.free(0)
    # Blocks [0, 4) and [4, 8) are cached; the local group needs the chunk of position 8: none.
    assert bm.add(1, prompt[:9] + [99, 98]) == 8
    assert bm.stats()["prefix_hit_tokens"] == 8
    # A prefix ending inside a chunk also needs that chunk's local blocks, which are cached too.
    assert bm.add(2, prompt[:4] + [0, 0]) == 4
    # Different first block: nothing to reuse.
    assert bm.add(3, [0] + prompt[1:]) == 0


def test_local_blocks_released_past_their_chunk():
    bm = _core.BlockManager(64, BLOCK, ["global", "local"], chunk_size=8, prefix_caching=False)
    bm.add(0, [1])
    for position in range(38):
        assert bm.append(0, 1)[0]
        bm.commit(0, [position % 3])
        local = [p for p in bm.table(0, 1) if p >= 0]
        assert len(local) <= 8 // BLOCK + 1
    # 38 tokens: the global group holds all 10 blocks; the local group the chunk [32, 40) of the
    # next token, blocks 8 and 9.
    assert len(bm.table(0, 0)) == 10 and all(p >= 0 for p in bm.table(0, 0))
    assert [p >= 0 for p in bm.table(0, 1)] == [False] * 8 + [True] * 2
    assert bm.stats()["pages_used_local"] == 2 and bm.stats()["pages_used_global"] == 10


def test_eviction_is_least_recently_used():
    bm = _core.BlockManager(4, BLOCK, ["global"], prefix_caching=True)
    for seq, first in enumerate((10, 20)):
        prompt = [first] * 8 + [0]
        bm.add(seq, prompt)
        assert bm.append(seq, 8)[0]
        bm.commit(seq, prompt[:8])
        bm.free(seq)
    assert bm.stats()["pages_cached"] == 4 and bm.available_pages() == 4
    # Taking two pages evicts the blocks of the first (least recently used) prompt.
    bm.add(2, [30] * 9)
    assert bm.append(2, 8)[0]
    assert bm.add(3, [10] * 8 + [0]) == 0
    assert bm.add(4, [20] * 8 + [0]) == 8
