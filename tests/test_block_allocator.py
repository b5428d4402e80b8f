"""BlockAllocator and PagedKVCache against brute-force models.

The stateful tests drive the allocator with random allocate / append / fork / free
sequences and check it, after every step, against an independent model:
  * a "logical block" model (Python objects shared by fork, replaced on
    copy-on-write) that predicts free counts, out-of-blocks errors and sharing exactly;
  * a slot store that plays the KV cache: every token's prefix (what its K/V depend
    on) is written to the slot the allocator gave it, copy-on-write copies are performed as reported, and every live
    sequence read back through its block table must equal its tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvlab.paged import BlockAllocator, OutOfBlocksError, PagedKVCache

BS, NB = 4, 12


def snapshot(alloc: BlockAllocator):
    """Everything the public API says about the allocator's state."""
    return (alloc.num_free_blocks,
            {s: (alloc.block_table(s), alloc.token_ids(s), alloc.num_cached_tokens(s)) for s in alloc.seq_ids()},
            [alloc.ref_count(b) for b in range(alloc.num_blocks)],
            [alloc.block_hash(b) for b in range(alloc.num_blocks)])


class AllocatorMachine(RuleBasedStateMachine):
    prefix_caching = False

    def __init__(self):
        super().__init__()
        self.tokens: dict[int, list[int]] = {}     # live sequence -> its tokens (the model)
        self.logical: dict[int, list[object]] = {}  # live sequence -> its logical blocks (no prefix caching)
        self.freed: list[int] = []
        # The "KV cache": what each slot holds. Token p's K/V depend on tokens 0..p, so a
        # slot holds that whole prefix: a block reused at the wrong place would read wrong.
        self.store: list[tuple | None] = [None] * (NB * BS)
        self.pending_writes: list[tuple[int, tuple]] = []   # (slot, prefix) the next forward pass writes
        self.pending_copies: list[tuple[int, int]] = []
        self.next_id = 0

    @initialize(order=st.permutations(list(range(NB))))
    def make(self, order):
        self.alloc = BlockAllocator(NB, BS, enable_prefix_caching=self.prefix_caching, free_order=order)

    # ------------------------------------------------------------ helpers
    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def model_free(self) -> int:
        return NB - len({id(b) for blocks in self.logical.values() for b in blocks})

    def shared(self, block: object) -> bool:
        return sum(b is block for blocks in self.logical.values() for b in blocks) > 1

    def flush(self):
        """The forward pass: copy-on-write copies first, in order, then the new tokens' writes;
        then the runner reports every live sequence computed (prefix caching registers blocks)."""
        for src, dst in self.pending_copies:
            self.store[dst * BS:(dst + 1) * BS] = self.store[src * BS:(src + 1) * BS]
        for slot, tok in self.pending_writes:
            self.store[slot] = tok
        self.pending_copies, self.pending_writes = [], []
        for sid, toks in self.tokens.items():
            self.alloc.mark_computed(sid, len(toks))

    def do_allocate(self, tokens: list[int]) -> int | None:
        sid = self.new_id()
        before = snapshot(self.alloc)
        need = math.ceil(len(tokens) / BS)
        if self.prefix_caching:
            fits = self.alloc.can_allocate(tokens)
            if self.alloc.num_free_blocks >= need:
                assert fits, "hits can only lower the need for free blocks"
        else:
            fits = need <= self.model_free()
            assert self.alloc.can_allocate(tokens) == fits
        if not fits:
            with pytest.raises(OutOfBlocksError, match=r"needs \d+ free blocks, only \d+ are free"):
                self.alloc.allocate_sequence(sid, tokens)
            assert snapshot(self.alloc) == before
            return None
        table = self.alloc.allocate_sequence(sid, tokens)
        assert len(table) == need
        cached = self.alloc.num_cached_tokens(sid)
        assert cached % BS == 0 and 0 <= cached <= len(tokens) - 1
        if not self.prefix_caching:
            assert cached == 0
            self.logical[sid] = [object() for _ in table]
        self.tokens[sid] = list(tokens)
        for p in range(cached, len(tokens)):                 # prefill computes the rest
            self.pending_writes.append((table[p // BS] * BS + p % BS, tuple(tokens[:p + 1])))
        return sid

    # ------------------------------------------------------------ rules
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=14))
    def allocate(self, tokens):
        self.do_allocate(tokens)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), token=st.integers(0, 2), two_phase=st.booleans())
    def append(self, data, token, two_phase):
        """append_token, or (two_phase) append_slot first and the token's id later, as an engine
        with asynchronous scheduling does: the same slot, the same blocks, the same copies."""
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        n = len(self.tokens[sid])
        before = snapshot(self.alloc)
        if self.prefix_caching:
            fits = self.alloc.can_append(sid)
        else:
            cow = n % BS != 0 and self.shared(self.logical[sid][-1])
            need = 1 if (n % BS == 0 or cow) else 0
            fits = need <= self.model_free()
            assert self.alloc.can_append(sid) == fits
        if not fits:
            with pytest.raises(OutOfBlocksError):
                self.alloc.append_token(sid, token)
            assert snapshot(self.alloc) == before
            return
        old_table = self.alloc.block_table(sid)
        if two_phase:
            slot = self.alloc.append_slot(sid)
            assert self.alloc.token_ids(sid) == self.tokens[sid]          # the id is not known yet
            free = self.alloc.num_free_blocks
            assert self.alloc.append_token(sid, token) == slot and self.alloc.num_free_blocks == free
        else:
            slot = self.alloc.append_token(sid, token)
        copies = self.alloc.pop_copies()
        table = self.alloc.block_table(sid)
        block, offset = divmod(slot, BS)
        assert offset == n % BS and table[n // BS] == block
        assert self.alloc.ref_count(block) == 1, "the slot written must be this sequence's alone"
        if n % BS != 0 and old_table[-1] != table[-1]:       # moved: copy-on-write
            assert copies == [(old_table[-1], table[-1])]
        else:
            assert copies == [] and table[:len(old_table)] == old_table
        if not self.prefix_caching:
            if n % BS == 0:
                self.logical[sid].append(object())
            elif cow:
                self.logical[sid][-1] = object()
            assert bool(copies) == cow
        self.tokens[sid].append(token)
        self.pending_copies += copies
        self.pending_writes.append((slot, tuple(self.tokens[sid])))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self.new_id()
        self.flush()                          # fork a sequence once its tokens are in the cache
        before_free = self.alloc.num_free_blocks
        assert self.alloc.fork(parent, child) == self.alloc.block_table(parent)
        assert self.alloc.num_free_blocks == before_free             # sharing takes nothing
        self.tokens[child] = list(self.tokens[parent])
        if not self.prefix_caching:
            self.logical[child] = list(self.logical[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.flush()                          # a sequence finishes after its last forward pass
        self.alloc.free_sequence(sid)
        del self.tokens[sid]
        self.logical.pop(sid, None)
        self.freed.append(sid)

    @rule()
    def forward_pass(self):
        self.flush()

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def misuse(self, data):
        """Double free, append to a freed sequence, fork from it: clear errors, nothing changed."""
        sid = data.draw(st.sampled_from(self.freed))
        before = snapshot(self.alloc)
        with pytest.raises(ValueError, match="not allocated"):
            self.alloc.free_sequence(sid)
        with pytest.raises(ValueError, match="not allocated"):
            self.alloc.append_token(sid, 0)
        with pytest.raises(ValueError, match="not allocated"):
            self.alloc.fork(sid, self.new_id())
        assert snapshot(self.alloc) == before

    @rule()
    def free_all(self):
        self.flush()
        for sid in list(self.tokens):
            self.alloc.free_sequence(sid)
            self.freed.append(sid)
        self.tokens.clear()
        self.logical.clear()
        assert self.alloc.num_free_blocks == NB
        assert all(self.alloc.ref_count(b) == 0 for b in range(NB))

    # ------------------------------------------------------------ invariants
    @invariant()
    def table_updates_rebuild_every_table(self):
        """A mirror of the block tables kept only from pop_table_updates() (as the engine's model
        runner keeps one on the GPU) equals every live sequence's table."""
        if not hasattr(self, "alloc"):
            return
        mirror = self.__dict__.setdefault("mirror", {})
        for sid, (start, ids) in self.alloc.pop_table_updates().items():
            assert sid in self.tokens                                  # freed sequences are left out
            assert 0 <= start <= len(mirror.get(sid, []))               # a new one starts at 0
            mirror[sid] = mirror.get(sid, [])[:start] + ids
        for sid in list(mirror):
            if sid not in self.tokens:
                del mirror[sid]
        assert mirror == {sid: self.alloc.block_table(sid) for sid in self.tokens}

    @invariant()
    def ref_counts_match_tables(self):
        if not hasattr(self, "alloc"):
            return
        counts = [0] * NB
        for sid in self.tokens:
            table = self.alloc.block_table(sid)
            assert len(table) == math.ceil(len(self.tokens[sid]) / BS)
            assert self.alloc.token_ids(sid) == self.tokens[sid]
            for b in table:
                counts[b] += 1
        assert counts == [self.alloc.ref_count(b) for b in range(NB)]
        assert self.alloc.num_free_blocks == sum(c == 0 for c in counts)
        assert sorted(self.alloc.seq_ids()) == sorted(self.tokens)

    @invariant()
    def sharing_matches_model(self):
        """Same logical block <=> same physical block (a bijection), so the free count is exact."""
        if self.prefix_caching or not hasattr(self, "alloc"):
            return
        phys_of: dict[int, int] = {}
        for sid, blocks in self.logical.items():
            for lb, pb in zip(blocks, self.alloc.block_table(sid)):
                assert phys_of.setdefault(id(lb), pb) == pb
        assert len(set(phys_of.values())) == len(phys_of)
        assert self.alloc.num_free_blocks == self.model_free()

    @invariant()
    def writable_slots_are_exclusive(self):
        """No two live sequences own the same slot they would write next."""
        if not hasattr(self, "alloc"):
            return
        slots = []
        for sid, toks in self.tokens.items():
            last = self.alloc.block_table(sid)[-1]
            if len(toks) % BS and self.alloc.ref_count(last) == 1:
                slots.append(last * BS + len(toks) % BS)
        assert len(slots) == len(set(slots))

    @invariant()
    def contents_read_back(self):
        """Through its block table, every live sequence reads exactly its own tokens."""
        if self.pending_writes or self.pending_copies or not hasattr(self, "alloc"):
            return
        for sid, toks in self.tokens.items():
            table = self.alloc.block_table(sid)
            assert [self.store[table[p // BS] * BS + p % BS] for p in range(len(toks))] == \
                [tuple(toks[:p + 1]) for p in range(len(toks))]


class PrefixCachingMachine(AllocatorMachine):
    prefix_caching = True

    @rule(prompt=st.lists(st.integers(0, 1), min_size=BS, max_size=10),
          keep=st.integers(0, 10), tail=st.lists(st.integers(0, 1), min_size=1, max_size=5))
    def allocate_pair(self, prompt, keep, tail):
        """A prompt allocated right after another that shares its first full blocks hits them."""
        a = self.do_allocate(prompt)
        if a is None:
            return
        self.flush()                          # a's prefill runs: its full blocks become hits
        second = prompt[:keep] + tail
        b = self.do_allocate(second)
        if b is None:
            return
        common = 0
        while common < min(len(prompt), len(second)) and prompt[common] == second[common]:
            common += 1
        expect = min(common // BS, (len(second) - 1) // BS) * BS
        assert self.alloc.num_cached_tokens(b) >= expect


SETTINGS = settings(max_examples=150, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestAllocatorStateful = AllocatorMachine.TestCase
TestAllocatorStateful.settings = SETTINGS
TestPrefixCachingStateful = PrefixCachingMachine.TestCase
TestPrefixCachingStateful.settings = SETTINGS


# ---------------------------------------------------------------- worked examples

def test_blocks_taken_only_when_last_block_is_full():
    alloc = BlockAllocator(8, 4)
    assert alloc.allocate_sequence("a", [1, 2, 3, 4, 5]) == [0, 1]
    assert alloc.num_free_blocks == 6
    assert [alloc.append_token("a", 9) for _ in range(3)] == [5, 6, 7]   # fills block 1
    assert alloc.num_free_blocks == 6
    assert alloc.append_token("a", 9) == 2 * 4 + 0                       # block 2 taken now
    assert alloc.block_table("a") == [0, 1, 2] and alloc.num_free_blocks == 5
    alloc.free_sequence("a")
    assert alloc.num_free_blocks == 8


def test_fork_shares_then_copy_on_write_moves_the_first_writer():
    alloc = BlockAllocator(8, 4)
    alloc.allocate_sequence("p", [1, 2, 3, 4, 5, 6])                     # blocks [0, 1]; 1 partly full
    assert alloc.fork("p", "c") == [0, 1]
    assert (alloc.ref_count(0), alloc.ref_count(1), alloc.num_free_blocks) == (2, 2, 6)
    slot = alloc.append_token("c", 7)                                    # c writes first: moves
    assert alloc.block_table("c") == [0, 2] and slot == 2 * 4 + 2
    assert alloc.pop_copies() == [(1, 2)] and alloc.pop_copies() == []
    assert alloc.append_token("p", 8) == 1 * 4 + 2                       # p now alone: in place
    assert alloc.pop_copies() == []
    assert (alloc.ref_count(0), alloc.ref_count(1), alloc.ref_count(2)) == (2, 1, 1)


def test_out_of_blocks_says_needed_vs_free_and_changes_nothing():
    alloc = BlockAllocator(3, 4)
    alloc.allocate_sequence("a", [1] * 8)
    assert not alloc.can_allocate([1] * 5)
    with pytest.raises(OutOfBlocksError, match="needs 2 free blocks, only 1 are free"):
        alloc.allocate_sequence("b", [1] * 5)
    assert "b" not in alloc and alloc.num_free_blocks == 1
    alloc.allocate_sequence("b", [1] * 4)
    assert not alloc.can_append("b")
    with pytest.raises(OutOfBlocksError, match="needs 1 free block, only 0 are free"):
        alloc.append_token("b", 1)
    assert alloc.num_tokens("b") == 4


@pytest.mark.parametrize("bad, match", [
    (dict(num_blocks=0, block_size=4), "num_blocks must be a positive int"),
    (dict(num_blocks=4, block_size=0), "block_size must be a positive int"),
    (dict(num_blocks=3, block_size=4, free_order=[0, 1, 1]), "free_order must be a permutation"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        BlockAllocator(**bad)


def test_bad_calls_raise_clear_errors():
    alloc = BlockAllocator(4, 4)
    alloc.allocate_sequence("a", [1, 2])
    with pytest.raises(ValueError, match="already allocated"):
        alloc.allocate_sequence("a", [1])
    with pytest.raises(ValueError, match="at least one token"):
        alloc.allocate_sequence("b", [])
    with pytest.raises(ValueError, match=">= 0"):
        alloc.allocate_sequence("b", [1, -3])
    with pytest.raises(ValueError, match="sequence of ints"):
        alloc.allocate_sequence("b", "hello")
    with pytest.raises(ValueError, match="already allocated"):
        alloc.fork("a", "a")
    with pytest.raises(ValueError, match="not allocated"):
        alloc.block_table("zzz")
    with pytest.raises(ValueError, match="block id"):
        alloc.ref_count(4)
    alloc.free_sequence("a")
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free_sequence("a")
    assert alloc.num_free_blocks == 4 and alloc.seq_ids() == []


def test_prefix_cache_reuses_full_blocks_and_caps_at_last_token():
    alloc = BlockAllocator(16, 4, enable_prefix_caching=True)
    system = list(range(100, 112))                                       # 3 full blocks
    a = alloc.allocate_sequence("a", system + [1, 2])
    assert alloc.num_cached_tokens("a") == 0
    alloc.mark_computed("a", 14)                                         # its prefill ran
    b = alloc.allocate_sequence("b", system + [3])
    assert b[:3] == a[:3] and alloc.num_cached_tokens("b") == 12
    assert [alloc.ref_count(x) for x in a[:3]] == [2, 2, 2]
    c = alloc.allocate_sequence("c", system)                             # all full: last block recomputed
    assert c[:2] == a[:2] and c[2] != a[2] and alloc.num_cached_tokens("c") == 8
    d = alloc.allocate_sequence("d", [100, 101, 102, 999, 104])          # differs inside block 0
    assert alloc.num_cached_tokens("d") == 0 and d[0] != a[0]


def test_prefix_cache_blocks_filled_by_appends_become_hits():
    alloc = BlockAllocator(8, 4, enable_prefix_caching=True)
    alloc.allocate_sequence("a", [1, 2, 3])
    alloc.append_token("a", 4)                                           # block 0 now full
    alloc.append_token("a", 5)
    alloc.mark_computed("a", 5)                                          # the decode step ran
    alloc.allocate_sequence("b", [1, 2, 3, 4, 9])
    assert alloc.num_cached_tokens("b") == 4
    assert alloc.block_table("b")[0] == alloc.block_table("a")[0]


def test_freed_cached_blocks_stay_reusable_and_are_evicted_lru_last():
    alloc = BlockAllocator(4, 2, enable_prefix_caching=True)
    alloc.allocate_sequence("a", [1, 2, 3, 4, 5])            # blocks 0, 1 full (hashed), 2 partly
    alloc.mark_computed("a", 5)
    alloc.free_sequence("a")
    assert alloc.num_free_blocks == 4                         # cached blocks count as free
    assert [alloc.block_hash(b) is not None for b in range(4)] == [True, True, False, False]
    alloc.allocate_sequence("x", [7, 8, 9])                   # uncached free blocks go first
    assert alloc.block_table("x") == [3, 2]
    alloc.mark_computed("x", 3)                               # x's full block 3 is cached too
    assert alloc.block_hash(0) is not None and alloc.block_hash(1) is not None
    alloc.free_sequence("x")
    alloc.allocate_sequence("b", [1, 2, 3, 4, 6])             # hits both of a's blocks
    assert alloc.block_table("b") == [0, 1, 2] and alloc.num_cached_tokens("b") == 4
    alloc.free_sequence("b")                                  # LRU order now: 3 (x's), 1, 0 (tail first)
    alloc.allocate_sequence("y", [8, 8, 8, 8, 8])             # uncached 2, then evicts 3, then 1
    assert alloc.block_table("y") == [2, 3, 1]
    assert alloc.block_hash(1) is None and alloc.block_hash(0) is not None
    alloc.free_sequence("y")
    alloc.allocate_sequence("z", [1, 2, 5])                   # block 0 survived: still a hit
    assert alloc.block_table("z")[0] == 0 and alloc.num_cached_tokens("z") == 2


def test_prefix_cache_never_hits_blocks_whose_prefill_did_not_run():
    """Regression: hashes used to be registered at allocation, before the K/V were written. A
    request preempted or aborted before its prefill ran left registered blocks holding garbage,
    and a later prompt with the same prefix hit them. Now only mark_computed registers."""
    alloc = BlockAllocator(8, 4, enable_prefix_caching=True)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    alloc.allocate_sequence("aborted", prompt)              # admitted, then aborted before any forward pass
    alloc.free_sequence("aborted")
    assert all(alloc.block_hash(b) is None for b in range(8))
    alloc.allocate_sequence("next", prompt)
    assert alloc.num_cached_tokens("next") == 0             # nothing to reuse: it must prefill everything
    alloc.mark_computed("next", 6)                          # a chunk of 6 ran: block 0 is full and computed
    assert alloc.block_hash(alloc.block_table("next")[0]) is not None
    assert alloc.block_hash(alloc.block_table("next")[1]) is None
    alloc.allocate_sequence("third", prompt)
    assert alloc.num_cached_tokens("third") == 4            # only the computed block is a hit
    with pytest.raises(ValueError, match="num_tokens"):
        alloc.mark_computed("next", 10)


def test_prefix_hashes_are_the_chained_hashes_of_the_full_blocks_a_prompt_can_hit():
    """prefix_hashes, written out by hand: block i's name hashes (block i - 1's name, its tokens);
    the block of the last token is left out; a longer prompt extends a shorter one's list; the
    allocator answers the same with the hashes passed in as without."""
    from kvlab.paged.block_allocator import block_hash

    alloc = BlockAllocator(16, 4, enable_prefix_caching=True)
    tokens = list(range(10, 23))                                   # 13 tokens: blocks 0..2 full, 3 holds the last
    h0 = block_hash(-1, tokens[0:4])
    h1 = block_hash(h0, tokens[4:8])
    h2 = block_hash(h1, tokens[8:12])
    assert alloc.prefix_hashes(tokens) == [h0, h1, h2]
    assert alloc.prefix_hashes(tokens[:12]) == [h0, h1]            # block 2 holds the last token
    assert alloc.prefix_hashes(tokens, known=[h0]) == [h0, h1, h2]
    assert BlockAllocator(16, 4).prefix_hashes(tokens) == []        # no prefix caching: nothing to name
    alloc.allocate_sequence("a", tokens)
    alloc.mark_computed("a", 13)
    again = tokens[:9] + [99] * 4
    assert alloc.free_blocks_needed(again) == alloc.free_blocks_needed(again, alloc.prefix_hashes(again)) == 2
    assert alloc.allocate_sequence("b", again, alloc.prefix_hashes(again))[:2] == alloc.block_table("a")[:2]


def test_can_allocate_counts_hits_that_are_in_use():
    alloc = BlockAllocator(3, 2, enable_prefix_caching=True)
    alloc.allocate_sequence("a", [1, 2, 3, 4, 5])                        # 3 blocks, none free
    alloc.mark_computed("a", 5)
    assert alloc.num_free_blocks == 0
    assert alloc.can_allocate([1, 2, 3]) is False                        # hit block 0, needs 1 new
    assert alloc.free_blocks_needed([1, 2, 3]) == 1 and alloc.free_blocks_needed([7, 8, 9]) == 2
    alloc.free_sequence("a")
    assert alloc.free_blocks_needed([1, 2, 3]) == 2                      # the hit now sits free: it costs one
    alloc.allocate_sequence("a2", [1, 2, 3, 4, 9])                       # hits 0, 1 (cached free)
    assert alloc.num_cached_tokens("a2") == 4 and alloc.num_free_blocks == 0


# ---------------------------------------------------------------- the cache tensors

def test_paged_cache_write_gather_copy_against_contiguous():
    torch.manual_seed(0)
    cache = PagedKVCache(num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=3)
    alloc = BlockAllocator(6, 4, free_order=[5, 2, 0, 4, 1, 3])
    k = torch.randn(7, 2, 3)                                             # a contiguous reference
    v = torch.randn(7, 2, 3)
    table = alloc.allocate_sequence("s", list(range(7)))
    slots = torch.tensor([alloc.slot("s", p) for p in range(7)])
    cache.write(1, slots, k, v)
    gk, gv = cache.gather(1, table, 7)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    assert cache.gather(0, table, 7)[0].abs().sum() == 0                 # other layer untouched
    alloc.fork("s", "t")
    alloc.append_token("t", 0)
    cache.copy_blocks(alloc.pop_copies())
    assert torch.equal(cache.gather(1, alloc.block_table("t"), 7)[0], k)
    with pytest.raises(ValueError, match="positive int"):
        PagedKVCache(1, 0, 4, 1, 1)


def test_notebook_log_lists_non_contiguous_slots_as_runs():
    """Notebook 05's log once printed "slots 10..26" for an append that wrote slots 10, 11, 24, 25, 26.
    Setup: pool of 8 blocks of 4; A holds 10 tokens (blocks 0-2), B takes block 3, then A appends 5:
    2 slots in block 2, then a new block 4 (slots 16-18). The line lists the runs, read back by alloc.slot."""
    from kvlab.ui.paged import apply_op, replay_ops, slot_ranges
    alloc, log = replay_ops([("allocate", "A", 10), ("allocate", "B", 3)], num_blocks=8, block_size=4)
    line = apply_op(alloc, ("append", "A", 5))
    assert [alloc.slot("A", p) for p in range(10, 15)] == [10, 11, 16, 17, 18]
    assert line == "append 5 to A: slots 10..11, 16..18, table [0, 1, 2, 4]"
    assert (slot_ranges([7]), slot_ranges([1, 3, 4, 6])) == ("7", "1, 3..4, 6")
