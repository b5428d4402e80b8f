"""The block allocator: a fixed pool of KV blocks, per-sequence block tables,
reference counts, copy-on-write and prefix caching.

This is the bookkeeping half of vLLM's PagedAttention (Kwon et al., SOSP 2023):
the KV cache is cut into blocks of `block_size` token slots, like pages of
virtual memory. A sequence owns a *block table* (logical block i -> physical
block id), so its keys and values are logically contiguous but physically
scattered. A block is taken only when the sequence's last block is full, so at
most `block_size - 1` slots per sequence are ever wasted. nano-vllm's
`BlockManager` is the same idea in ~100 lines; vLLM v1's `KVCacheManager` /
`BlockPool` is the industrial version.

Three ideas on top of plain paging:

* Reference counts. `fork(parent, child)` shares every block of the parent
  (parallel sampling, beam search): nothing is copied, counts go up by one.
* Copy-on-write. The first append into a shared, partly filled last block moves
  the writer to a fresh block; the allocator *reports* the copy
  (source, destination) through `pop_copies()`, and `PagedKVCache.copy_blocks`
  performs it on the tensors. Full shared blocks are never written again, so they
  stay shared for good.
* Prefix caching (`enable_prefix_caching=True`). A full block is named by a hash
  chained over (previous block's hash, this block's token ids), so equal hashes
  mean equal prefixes. A block is registered under its hash only once its K/V
  have been computed: the runner reports that with `mark_computed(seq_id, n)`
  after each forward pass. Registering the whole prompt at allocation would let a
  later prompt hit a block whose owner was preempted or aborted before its prefill
  ran: garbage K/V. (vLLM v1 registers a block when it schedules the step that fills
  it, safe there because that step always runs before the next scheduling: requests
  scheduled in the same step can then share blocks, which kvlab's rule forgoes.) A new prompt
  that starts with registered full blocks reuses them; `num_cached_tokens(seq_id)`
  says how many prompt tokens need no prefill. Freed cached blocks keep their hash
  and contents: they count as free, and are evicted least recently used first,
  only when a block is needed and no uncached free block is left.

The allocator knows nothing of tensors or models: it hands out block ids and
slots (slot = block_id * block_size + offset), and `kvlab.paged.PagedKVCache`
holds the tensors those numbers index.
"""

from __future__ import annotations

import operator

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from kvlab import checks

SeqId = Hashable
_NO_PARENT = -1          # the "previous hash" of a sequence's first block


class OutOfBlocksError(RuntimeError):
    """More blocks were needed than are free. Nothing was changed."""


@dataclass
class _Block:
    """One physical block's bookkeeping (its K/V live in PagedKVCache)."""
    block_id: int
    ref_count: int = 0
    hash: int | None = None                  # set while the block is registered in the prefix cache
    token_ids: tuple[int, ...] = ()          # contents of a hashed block, checked on every hit


@dataclass
class _Sequence:
    """What the allocator remembers about one live sequence."""
    block_table: list[int]
    token_ids: list[int]
    block_hashes: list[int] = field(default_factory=list)  # chained hash of each full, computed block
    num_cached_tokens: int = 0
    num_reserved: int = 0                    # slots past token_ids whose token ids are not known yet

    @property
    def num_slots(self) -> int:
        return len(self.token_ids) + self.num_reserved


def _check_seq_id(name: str, seq_id):
    """A sequence id is any hashable value (a str, an int): a dict key of the allocator."""
    try:
        hash(seq_id)
    except TypeError:
        raise TypeError(f"{name} must be hashable (a str or an int, e.g. 'A'), got {checks.shown(seq_id)}") from None
    return seq_id


def _block_ids(name: str, value, num_blocks: int) -> list[int]:
    """A permutation of range(num_blocks), e.g. free_order; numpy ints pass, 1.5 and 'a' do not."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a permutation of range({num_blocks}) (a list of block ids), got "
                        f"{checks.shown(value)}")
    ids = [checks.integer(f"{name}[{i}]", b, allowed=f"a block id in 0..{num_blocks - 1}")
           for i, b in enumerate(value)]
    if sorted(ids) != list(range(num_blocks)):
        raise ValueError(f"{name} must be a permutation of range({num_blocks}), got {len(ids)} ids: "
                         f"{checks.brief(ids)}")
    return ids


def block_hash(prev_hash: int, token_ids: Sequence[int]) -> int:
    """The prefix-cache name of a full block: a hash chained over the previous block's hash
    and this block's tokens, so two blocks share a name only if their whole prefixes match.
    Python's hash of a tuple of ints is deterministic (PYTHONHASHSEED only salts str/bytes);
    a 64-bit collision is guarded against by comparing token ids on every hit."""
    return hash((prev_hash, tuple(token_ids)))


class BlockAllocator:
    """A pool of `num_blocks` blocks of `block_size` token slots each.

    Verbs, in the order a scheduler uses them (nano-vllm's can_allocate / allocate /
    can_append / append / deallocate):

        can_allocate(token_ids) -> bool      allocate_sequence(seq_id, token_ids) -> block table
        free_blocks_needed(token_ids) -> int (what can_allocate compares with num_free_blocks)
        can_append(seq_id) -> bool           append_token(seq_id, token_id) -> slot
        mark_computed(seq_id, num_tokens)    after a forward pass: register full blocks (prefix cache)
        fork(parent_id, child_id)            free_sequence(seq_id)
        pop_copies() -> [(src, dst), ...]    copy-on-write copies the cache must perform
        pop_table_updates() -> {seq_id: (start, block ids)}   what changed in the block tables

    And one for an engine that schedules a step before the previous step's token is known
    (asynchronous scheduling, kvlab.engine): append_slot(seq_id) -> slot gives the next token
    its slot now; the append_token that brings its id later fills that slot.

    Every method checks its arguments first and raises before changing anything.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 free_order: Iterable[int] | None = None):
        """free_order: the initial order of the free queue (default 0, 1, ..., num_blocks - 1).
        Tests and notebooks pass a permutation to scatter sequences over the pool on purpose."""
        num_blocks = checks.integer("num_blocks", num_blocks, minimum=1)      # numpy ints pass, True does not
        block_size = checks.integer("block_size", block_size, minimum=1)
        order = list(range(num_blocks)) if free_order is None else _block_ids("free_order", free_order, num_blocks)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(order)                 # free, no cached contents: FIFO
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free but hashed: LRU first
        self._hash_to_block: dict[int, int] = {}
        self._seqs: dict[SeqId, _Sequence] = {}
        self._copies: list[tuple[int, int]] = []
        self._table_changes: dict[SeqId, int] = {}           # sequence -> first table index changed

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any live sequence (cached free blocks included)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> list[SeqId]:
        """Live sequences, in allocation order."""
        return list(self._seqs)

    def block_table(self, seq_id: SeqId) -> list[int]:
        """Physical block id of each logical block of the sequence (a copy)."""
        return list(self._seq(seq_id).block_table)

    def num_tokens(self, seq_id: SeqId) -> int:
        return len(self._seq(seq_id).token_ids)

    def token_ids(self, seq_id: SeqId) -> list[int]:
        return list(self._seq(seq_id).token_ids)

    def num_cached_tokens(self, seq_id: SeqId) -> int:
        """Prompt tokens whose K/V were found in the prefix cache: prefill starts after them."""
        return self._seq(seq_id).num_cached_tokens

    def ref_count(self, block_id: int) -> int:
        """How many live block tables hold this block (0: free)."""
        return self._blocks[self._check_block_id(block_id)].ref_count

    def block_hash(self, block_id: int) -> int | None:
        """The block's prefix-cache hash if it is registered (its contents reusable), else None."""
        return self._blocks[self._check_block_id(block_id)].hash

    def slot(self, seq_id: SeqId, position: int) -> int:
        """Where token `position` of the sequence lives: block_id * block_size + offset."""
        seq = self._seq(seq_id)
        position = checks.integer("position", position)
        if not 0 <= position < seq.num_slots:
            raise ValueError(f"position {position} out of range for sequence {seq_id!r} "
                             f"with {seq.num_slots} slots")
        return self._slot(seq, position)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ allocate

    def free_blocks_needed(self, token_ids: Sequence[int], prefix_hashes: list[int] | None = None) -> int:
        """Free blocks allocate_sequence(…, token_ids) would take now: new blocks, plus prefix-cache
        hits that sit free (reusing them takes them out of the free pool); hits in use cost none.
        prefix_hashes: `self.prefix_hashes(token_ids)`, if the caller keeps them (a request waiting
        at the head of a queue is asked about every step; its blocks are hashed once)."""
        return self._free_blocks_needed(self._check_tokens(token_ids), prefix_hashes)

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Would allocate_sequence(…, token_ids) succeed now? (Counts prefix-cache hits.)"""
        return self.free_blocks_needed(token_ids) <= self.num_free_blocks

    def allocate_sequence(self, seq_id: SeqId, token_ids: Sequence[int],
                          prefix_hashes: list[int] | None = None) -> list[int]:
        """Give a new sequence the blocks for its prompt; return its block table.

        With prefix caching, leading full blocks already in the cache are reused (their
        count goes up) instead of taken; the block holding the last prompt token is never a
        hit, so prefill always computes at least one token (the one whose logits sample the
        next token). The new blocks are not registered yet: `mark_computed` does that once
        the forward pass has written their K/V. prefix_hashes: as in free_blocks_needed."""
        if _check_seq_id("seq_id", seq_id) in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        token_ids = self._check_tokens(token_ids)
        needed = self._free_blocks_needed(token_ids, prefix_hashes)
        if needed > self.num_free_blocks:
            raise OutOfBlocksError(f"sequence {seq_id!r} with {len(token_ids)} tokens needs "
                                   f"{needed} free blocks, only {self.num_free_blocks} are free")
        hits, hashes = self._match_prefix(token_ids, prefix_hashes)
        table = []
        for block_id in hits:                       # reuse cached blocks (count + 1)
            self._ref_cached(block_id)
            table.append(block_id)
        for _ in range(self.blocks_needed(len(token_ids)) - len(hits)):
            table.append(self._take_free_block())
        self._seqs[seq_id] = _Sequence(table, token_ids, block_hashes=hashes[:len(hits)],
                                       num_cached_tokens=len(hits) * self.block_size)
        self._table_changes[seq_id] = 0
        return list(table)

    # ------------------------------------------------------------------ append

    def can_append(self, seq_id: SeqId) -> bool:
        """Would append_token(seq_id, …) succeed now?"""
        return self._blocks_needed_to_append(self._seq(seq_id)) <= self.num_free_blocks

    def append_token(self, seq_id: SeqId, token_id: int) -> int:
        """Add one token to the sequence; return the slot its K/V must be written to.

        A new block is taken only when the last block is full. If the last block is
        partly filled and shared (after a fork), the writer is moved to a fresh block and
        the copy (source, destination) is queued for `pop_copies()`: perform it before
        writing this token's K/V. If `append_slot` reserved a slot for this token earlier,
        that slot is the one: nothing is taken."""
        seq = self._seq(seq_id)
        if token_id.__class__ is not int or token_id < 0:   # (the engine's ids are ints: one test)
            token_id = self._check_token(token_id)
        if seq.num_reserved:                        # its slot was handed out before its id was known
            seq.num_reserved -= 1
            seq.token_ids.append(token_id)
            return self._slot(seq, len(seq.token_ids) - 1)
        slot = self._new_slot(seq_id, seq)
        seq.token_ids.append(token_id)
        return slot

    def append_slot(self, seq_id: SeqId) -> int:
        """Give the sequence's next token a slot before its id is known; return the slot.

        An engine with asynchronous scheduling plans step N + 1 while step N is still sampling:
        the token step N samples must get its slot (step N + 1 writes its K/V) before anyone
        knows which token it is. Its id arrives later with append_token, which fills this slot.
        Blocks, copy-on-write and OutOfBlocksError as in append_token."""
        seq = self._seq(seq_id)
        slot = self._new_slot(seq_id, seq)
        seq.num_reserved += 1
        return slot

    def _new_slot(self, seq_id: SeqId, seq: _Sequence) -> int:
        """Take what the slot after the sequence's last one needs (a new block, or a private copy
        of a shared last block) and return that slot."""
        pos = len(seq.token_ids) + seq.num_reserved
        offset = pos % self.block_size
        table = seq.block_table
        if offset == 0 or self._blocks[table[-1]].ref_count > 1:   # a new block, or a private copy of the last
            if not (self._free or self._cached_free):
                raise OutOfBlocksError(f"appending to sequence {seq_id!r} needs 1 free block, only 0 are free")
            if offset == 0:                         # last block full (or none yet): a new one
                table.append(self._take_free_block())
            else:                                   # shared and partly filled: copy-on-write
                last = self._blocks[table[-1]]
                last.ref_count -= 1
                table[-1] = self._take_free_block()
                self._copies.append((last.block_id, table[-1]))
            self._table_changed(seq_id, len(table) - 1)
        return table[-1] * self.block_size + offset

    def _slot(self, seq: _Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def mark_computed(self, seq_id: SeqId, num_tokens: int) -> None:
        """The forward pass has written the K/V of the sequence's first `num_tokens` tokens.
        With prefix caching, each full block among them is registered under its chained hash,
        so later prompts that start the same way can reuse it. A no-op without prefix caching."""
        seq = self._seq(seq_id)
        if not isinstance(num_tokens, int) or not 0 <= num_tokens <= len(seq.token_ids):
            raise ValueError(f"num_tokens must be an int in [0, {len(seq.token_ids)}] for sequence "
                             f"{seq_id!r}, got {num_tokens!r}")
        if not self.enable_prefix_caching:
            return
        for i in range(len(seq.block_hashes), num_tokens // self.block_size):
            self._register_full_block(seq, i)

    def pop_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write copies (source block, destination block) queued since the last call."""
        copies, self._copies = self._copies, []
        return copies

    def pop_table_updates(self) -> dict[SeqId, tuple[int, list[int]]]:
        """What changed in the block tables since the last call: {seq_id: (start, block ids)}, the
        table's entries from index `start` on (a new sequence or a fork: all of it; an append: the
        new block; copy-on-write: the moved last block). Whoever mirrors the tables elsewhere (the
        engine's model runner keeps them on the GPU) applies these and never reads a whole table.
        Freed sequences are left out."""
        updates = {seq_id: (start, self._seqs[seq_id].block_table[start:])
                   for seq_id, start in self._table_changes.items()}
        self._table_changes = {}
        return updates

    # ------------------------------------------------------------------ fork / free

    def fork(self, parent_id: SeqId, child_id: SeqId) -> list[int]:
        """The child shares every block of the parent (each count + 1); nothing is copied
        until one of them appends into a shared, partly filled block. Returns the child's table.

        A copy-on-write copy runs before the writes of the step that appends: the forward pass
        that fills the shared blocks must come before that step (fork after it, or in the step
        that fills them, as the engine does, if nobody appends until the next step), or the
        block would be copied empty."""
        parent = self._seq(parent_id)
        if _check_seq_id("child_id", child_id) in self._seqs:
            raise ValueError(f"cannot fork into {child_id!r}: that sequence is already allocated")
        for block_id in parent.block_table:
            self._blocks[block_id].ref_count += 1
        self._seqs[child_id] = _Sequence(list(parent.block_table), list(parent.token_ids),
                                         list(parent.block_hashes), parent.num_cached_tokens, parent.num_reserved)
        self._table_changes[child_id] = 0
        return list(parent.block_table)

    def free_sequence(self, seq_id: SeqId) -> None:
        """Drop the sequence; blocks whose count reaches 0 become free at once. Blocks go to
        the free queues last block first, so a sequence's tail (least likely to be shared by
        a later prompt) is evicted from the prefix cache before its head."""
        seq = self._seq(seq_id)
        del self._seqs[seq_id]
        self._table_changes.pop(seq_id, None)
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._cached_free[block_id] = None      # most recently used end
                else:
                    self._free.append(block_id)

    # ------------------------------------------------------------------ internals

    def _seq(self, seq_id: SeqId) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except TypeError:                                # a list, a dict: no sequence has such an id
            _check_seq_id("seq_id", seq_id)
            raise
        except KeyError:
            raise ValueError(f"sequence {seq_id!r} is not allocated (never allocated, or already "
                             f"freed); live sequences: {len(self._seqs)}") from None

    def _check_block_id(self, block_id: int) -> int:
        return checks.integer("block_id", block_id, 0, self.num_blocks - 1,
                              allowed=f"a block id in 0..{self.num_blocks - 1}")

    @staticmethod
    def _check_tokens(token_ids: Sequence[int]) -> list[int]:
        if isinstance(token_ids, (str, bytes)):
            raise ValueError("token_ids must be a sequence of ints, not a string")
        try:
            items = token_ids if isinstance(token_ids, (list, tuple)) else list(token_ids)
            if any(t.__class__ is bool for t in items):       # True is an int to Python, not a token id
                raise TypeError
            ids = [operator.index(t) for t in items]
        except TypeError:
            raise ValueError(f"token_ids must be a sequence of ints, got {checks.brief(token_ids)}") from None
        if not ids:
            raise ValueError("a sequence needs at least one token")
        if min(ids) < 0:
            raise ValueError(f"token ids must be >= 0, got {min(ids)}")
        return ids

    @staticmethod
    def _check_token(token_id: int) -> int:
        try:
            if token_id.__class__ is bool:
                raise TypeError
            t = operator.index(token_id)
        except TypeError:
            raise ValueError(f"a token id must be an int, got {checks.shown(token_id)}") from None
        if t < 0:
            raise ValueError(f"token ids must be >= 0, got {t}")
        return t

    def prefix_hashes(self, token_ids: Sequence[int], known: list[int] | None = None) -> list[int]:
        """The prefix-cache names of the blocks of token_ids that a new sequence can find in the
        cache: the chained hash of each full block but the one holding the last token
        ((len - 1) // block_size of them). known: the hashes of a shorter prefix of the same
        tokens, computed earlier; they are extended, not recomputed. (Empty without prefix caching.)"""
        hashes = list(known or [])
        if not self.enable_prefix_caching:
            return hashes
        bs = self.block_size
        for i in range(len(hashes), (len(token_ids) - 1) // bs):
            hashes.append(block_hash(hashes[-1] if hashes else _NO_PARENT, token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def _match_prefix(self, token_ids: list[int], prefix_hashes: list[int] | None = None
                      ) -> tuple[list[int], list[int]]:
        """Cached blocks that hold the leading full blocks of token_ids (at most
        (len - 1) // block_size of them), and the hashes of those blocks."""
        if not self.enable_prefix_caching:
            return [], []
        hashes = self.prefix_hashes(token_ids) if prefix_hashes is None else prefix_hashes
        hits: list[int] = []
        bs = self.block_size
        for i, h in enumerate(hashes[:(len(token_ids) - 1) // bs]):
            block_id = self._hash_to_block.get(h)
            if block_id is None or self._blocks[block_id].token_ids != tuple(token_ids[i * bs:(i + 1) * bs]):
                break                                    # a miss (or a 64-bit collision: contents differ)
            hits.append(block_id)
        return hits, hashes[:len(hits)]

    def _free_blocks_needed(self, token_ids: list[int], prefix_hashes: list[int] | None = None) -> int:
        """Free blocks an allocation would consume: new blocks, plus hits that sit free in
        the cache (reusing them takes them out of the free pool)."""
        hits, _ = self._match_prefix(token_ids, prefix_hashes)
        hits_in_use = sum(1 for b in hits if self._blocks[b].ref_count > 0)
        return self.blocks_needed(len(token_ids)) - hits_in_use

    def _table_changed(self, seq_id: SeqId, index: int) -> None:
        self._table_changes[seq_id] = min(index, self._table_changes.get(seq_id, index))

    def _blocks_needed_to_append(self, seq: _Sequence) -> int:
        if seq.num_slots % self.block_size == 0:
            return 1
        return 1 if self._blocks[seq.block_table[-1]].ref_count > 1 else 0

    def _take_free_block(self) -> int:
        """Pop a free block: an uncached one if any, else evict the least recently used
        cached one (forgetting its hash). Callers have checked that one is free."""
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached_free.popitem(last=False)
            block = self._blocks[block_id]
            if self._hash_to_block.get(block.hash) == block_id:
                del self._hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        self._blocks[block_id].ref_count = 1
        return block_id

    def _ref_cached(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._cached_free[block_id]
        block.ref_count += 1

    def _register_full_block(self, seq: _Sequence, index: int) -> None:
        """Block `index` of the sequence is full and computed: record its chained hash and, if
        no other block holds the same prefix, make it findable by later prompts."""
        bs = self.block_size
        chunk = tuple(seq.token_ids[index * bs:(index + 1) * bs])
        prev = seq.block_hashes[index - 1] if index > 0 else _NO_PARENT
        h = block_hash(prev, chunk)
        seq.block_hashes.append(h)
        block = self._blocks[seq.block_table[index]]
        if block.hash is None and h not in self._hash_to_block:
            block.hash, block.token_ids = h, chunk
            self._hash_to_block[h] = block.block_id
