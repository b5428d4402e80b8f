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
import random

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvlab.paged import BlockAllocator, OutOfBlocksError, PagedAttention, PagedBatch, PagedKVCache
from kvlab.model.attention import sdpa

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
        """The forward pass: copy-on-write copies first, in order, then the new tokens' writes."""
        for src, dst in self.pending_copies:
            self.store[dst * BS:(dst + 1) * BS] = self.store[src * BS:(src + 1) * BS]
        for slot, tok in self.pending_writes:
            self.store[slot] = tok
        self.pending_copies, self.pending_writes = [], []

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
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data, token):
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
    alloc.allocate_sequence("b", [1, 2, 3, 4, 9])
    assert alloc.num_cached_tokens("b") == 4
    assert alloc.block_table("b")[0] == alloc.block_table("a")[0]


def test_freed_cached_blocks_stay_reusable_and_are_evicted_lru_last():
    alloc = BlockAllocator(4, 2, enable_prefix_caching=True)
    alloc.allocate_sequence("a", [1, 2, 3, 4, 5])            # blocks 0, 1 full (hashed), 2 partly
    alloc.free_sequence("a")
    assert alloc.num_free_blocks == 4                         # cached blocks count as free
    assert [alloc.block_hash(b) is not None for b in range(4)] == [True, True, False, False]
    alloc.allocate_sequence("x", [7, 8, 9])                   # uncached free blocks go first
    assert alloc.block_table("x") == [3, 2]
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


def test_can_allocate_counts_hits_that_are_in_use():
    alloc = BlockAllocator(3, 2, enable_prefix_caching=True)
    alloc.allocate_sequence("a", [1, 2, 3, 4, 5])                        # 3 blocks, none free
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


def test_paged_attention_matches_dense_causal_attention():
    """Prefill of several right-padded rows (one after a cached prefix), then a decode step,
    against plain SDPA on the contiguous tensors."""
    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 8, 4
    cache = PagedKVCache(1, 16, bs, hkv, d, dtype=torch.float64)
    alloc = BlockAllocator(16, bs, free_order=torch.randperm(16).tolist())
    lens, cached = [9, 3, 6], [0, 0, 4]          # row 2: its first 4 tokens were written earlier
    q = [torch.randn(n, hq, d, dtype=torch.float64) for n in lens]
    k = [torch.randn(n, hkv, d, dtype=torch.float64) for n in lens]
    v = [torch.randn(n, hkv, d, dtype=torch.float64) for n in lens]
    for i, n in enumerate(lens):
        alloc.allocate_sequence(i, list(range(n)))
        if cached[i]:
            pre = torch.tensor([alloc.slot(i, p) for p in range(cached[i])])
            cache.write(0, pre, k[i][:cached[i]], v[i][:cached[i]])
    new = [n - c for n, c in zip(lens, cached)]
    batch = PagedBatch.build([alloc.block_table(i) for i in range(3)], lens, new, bs)
    t = max(new)
    pad = lambda x, i: torch.cat([x[cached[i]:], x.new_zeros(t - new[i], *x.shape[1:])])
    qb, kb, vb = (torch.stack([pad(x[i], i) for i in range(3)]) for x in (q, k, v))
    pos = torch.stack([torch.cat([torch.arange(cached[i], lens[i]), torch.zeros(t - new[i], dtype=torch.long)])
                       for i in range(3)])
    out = PagedAttention(cache).set_batch(batch)(0, qb, kb, vb, pos)
    for i in range(3):
        ref = sdpa(q[i][None], k[i][None], v[i][None], is_causal=True)[0]
        torch.testing.assert_close(out[i, :new[i]], ref[cached[i]:])
    # decode: one more token per row, through the decode attention function
    q1, k1, v1 = torch.randn(3, 1, hq, d, dtype=torch.float64), torch.randn(3, 1, hkv, d, dtype=torch.float64), \
        torch.randn(3, 1, hkv, d, dtype=torch.float64)
    slots = [alloc.append_token(i, 0) for i in range(3)]
    batch = PagedBatch.build([alloc.block_table(i) for i in range(3)], [n + 1 for n in lens], [1] * 3, bs)
    assert batch.slot_mapping[:, 0].tolist() == slots
    out = PagedAttention(cache).set_batch(batch)(0, q1, k1, v1, torch.tensor(lens)[:, None])
    for i in range(3):
        kk, vv = torch.cat([k[i], k1[i]]), torch.cat([v[i], v1[i]])
        ref = sdpa(q1[i][None], kk[None], vv[None])[0]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)   # the reference softmaxes in fp32


def test_paged_attention_without_batch_raises():
    cache = PagedKVCache(1, 2, 2, 1, 2)
    with pytest.raises(ValueError, match="set_batch"):
        PagedAttention(cache)(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2),
                              torch.zeros(1, 1, dtype=torch.long))


# ---------------------------------------------------------------- trace replay

def test_replay_matches_brute_force_lengths():
    """A pool large enough for everything: blocks in use each step are sum(ceil(len / bs))
    over the requests still running, computed here from lengths alone."""
    from kvlab.paged.trace import replay
    prompts, outs, bs = [[1] * 5, [2] * 9, [3] * 2], [3, 1, 4], 4
    stats = replay(prompts, outs, num_blocks=64, block_size=bs)
    expected = []
    for step in range(1, max(outs) + 1):
        expected.append(sum(-(-(len(p) + step) // bs) for p, o in zip(prompts, outs) if o > step))
    assert stats.used_blocks == expected
    assert (stats.steps, stats.peak_running, stats.preemptions, stats.prompt_tokens) == (4, 3, 0, 16)


def test_replay_preempts_the_newest_and_recomputes_it_with_its_generated_tokens():
    """Worked by hand. Pool of 4 blocks of 2 (watermark int(0.01 * 4) = 0 blocks). Request 0:
    prompt 2, output 5; request 1: prompt 2, output 3. A request holds prompt + tokens produced
    (the last one is never appended: it finishes instead).
      step 1: admit 0 and 1 (1 block each); each produces and appends a token (3 held, 2 blocks each): 4 used
      step 2: each appends its 2nd token into its partly filled block (4 held): 4 used
      step 3: 0 produces its 3rd token, needs a 3rd block, none free: preempt the newest (1, holding
              2 blocks, 2 tokens generated); 0 appends (5 held, 3 blocks): 3 used
      step 4: 1 needs 2 blocks to come back (prompt 2 + generated 2), 1 free: waits; 0 appends (6 held): 3 used
      step 5: 0 produces its 5th token and finishes: 0 used
      step 6: 1 is re-admitted with 2 + 2 tokens (4 recomputed), produces its 3rd token and finishes: 0 used
    Appended while decoding: 0 -> 4 (steps 1-4), 1 -> 2 (steps 1-2); restarting 1's output from
    zero (as the old code did) would have appended 4 to it and taken 8 steps."""
    from kvlab.paged.trace import replay
    stats = replay([[1] * 2, [2] * 2], [5, 3], num_blocks=4, block_size=2)
    assert (stats.steps, stats.preemptions, stats.appended) == (6, 1, [4, 2])
    assert stats.used_blocks == [4, 4, 3, 3, 0, 0] and stats.running == [2, 2, 1, 1, 0, 0]
    assert (stats.prompt_tokens, stats.recomputed_tokens, stats.peak_running) == (2 + 2 + 4, 4, 2)


def test_replay_admission_keeps_the_watermark_free_while_anything_runs():
    """Pool of 4 blocks of 2, three requests of prompt 4 (2 blocks), output 1. Watermark 0: two
    fit at once (2 + 2 blocks), two steps. Watermark 0.25 (1 block): the second would leave 0 < 1
    free while the first runs, so they run one at a time, three steps; an empty pool ignores it."""
    from kvlab.paged.trace import replay
    trace = ([[1] * 4] * 3, [1] * 3)
    assert [(s.steps, s.peak_running) for s in (replay(*trace, num_blocks=4, block_size=2, watermark=w)
                                                for w in (0.0, 0.25))] == [(2, 2), (3, 1)]


def test_replay_prefix_cache_hits_on_a_shared_prefix():
    from kvlab.paged.trace import replay
    shared = list(range(100, 116))                       # 4 full blocks of 4
    prompts = [shared + [i] for i in range(5)]
    stats = replay(prompts, [2] * 5, num_blocks=64, block_size=4, enable_prefix_caching=True)
    assert stats.cached_tokens == 4 * 16 and stats.hit_rate == 64 / 85


def test_replay_bad_input():
    from kvlab.paged.trace import replay
    with pytest.raises(ValueError, match="one output length per prompt"):
        replay([[1]], [1, 2], num_blocks=4)
    with pytest.raises(ValueError, match="needs more than the 2 blocks"):
        replay([[1] * 40], [1], num_blocks=2, block_size=16)


def test_gather_decode_attention_matches_the_reference():
    from kvlab.kernels import paged_attention_reference
    from kvlab.paged import gather_decode_attention
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(10, 4, 2, 8), torch.randn(10, 4, 2, 8)
    tables = torch.tensor([[7, 2, 9], [0, 5, 0], [3, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([11, 5, 1], dtype=torch.int32)
    q = torch.randn(3, 6, 8)
    torch.testing.assert_close(gather_decode_attention(q, k_cache, v_cache, tables, lens),
                               paged_attention_reference(q, k_cache, v_cache, tables, lens), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="default scale"):
        gather_decode_attention(q, k_cache, v_cache, tables, lens, scale=0.5)


def test_blocks_to_append_matches_appending_on_a_copy():
    """Random allocate / fork / append histories (forks share partly filled last blocks, 2 to 4
    ways): blocks_to_append(ids) equals the free blocks actually taken by appending one token to
    each of ids on a deep copy of the allocator, for random subsets ids of the live sequences."""
    import copy
    from kvlab.paged import blocks_to_append
    rng = random.Random(0)
    for _ in range(200):
        alloc = BlockAllocator(64, rng.choice([1, 2, 4]))
        names = []
        for i in range(rng.randint(1, 3)):
            alloc.allocate_sequence(f"p{i}", [0] * rng.randint(1, 9))
            names.append(f"p{i}")
            for j in range(rng.randint(0, 3)):
                alloc.fork(f"p{i}", f"p{i}.{j}")
                names.append(f"p{i}.{j}")
        for s in rng.sample(names, rng.randint(0, len(names))):    # some writers move off shared blocks
            alloc.append_token(s, 1)
        ids = rng.sample(names, rng.randint(1, len(names)))
        trial = copy.deepcopy(alloc)
        for s in ids:
            trial.append_token(s, 2)
        assert blocks_to_append(alloc, ids) == alloc.num_free_blocks - trial.num_free_blocks


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
