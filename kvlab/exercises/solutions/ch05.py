"""Solutions to chapter 05's exercises (notebooks/exercises/05_paged_allocator.ipynb)."""

from __future__ import annotations

from collections import deque

from kvlab.paged import block_hash


def slot_mapping(block_table: list[int], positions: list[int], block_size: int) -> list[int]:
    """Where each token's K/V live: its block's physical id x block_size + its offset in the block."""
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]


def prefix_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chained hash of each full block: equal hashes mean equal whole prefixes."""
    hashes, prev = [], -1                                      # the first block's "previous hash" is -1
    for i in range(len(token_ids) // block_size):              # full blocks only
        prev = block_hash(prev, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(prev)
    return hashes


def cached_prompt_tokens(computed_prompts: list[list[int]], prompt: list[int], block_size: int) -> int:
    """Prompt tokens whose K/V the prefix cache holds after the computed prompts ran."""
    cached = {h for p in computed_prompts for h in prefix_block_hashes(p, block_size)}
    hits = 0
    for h in prefix_block_hashes(prompt, block_size)[: (len(prompt) - 1) // block_size]:   # never the last token's
        if h not in cached:
            break
        hits += 1
    return hits * block_size


class Allocator:
    """A pool of num_blocks blocks of block_size slots: block tables, reference counts, copy-on-write."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.free_queue = deque(range(num_blocks))            # FIFO: take from the front, return to the back
        self.refs = [0] * num_blocks
        self.tables: dict = {}                                # seq_id -> list of block ids
        self.lengths: dict = {}                               # seq_id -> tokens
        self.copies: list[tuple[int, int]] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def block_table(self, seq_id) -> list[int]:
        return list(self.tables[seq_id])

    def ref_count(self, block_id: int) -> int:
        return self.refs[block_id]

    def _take(self) -> int:
        block = self.free_queue.popleft()
        self.refs[block] = 1
        return block

    def allocate(self, seq_id, num_tokens: int) -> list[int]:
        needed = -(-num_tokens // self.block_size)
        if needed > len(self.free_queue):
            raise MemoryError(f"{seq_id!r} needs {needed} blocks, {len(self.free_queue)} are free")
        self.tables[seq_id] = [self._take() for _ in range(needed)]
        self.lengths[seq_id] = num_tokens
        return list(self.tables[seq_id])

    def append(self, seq_id) -> int:
        table, n = self.tables[seq_id], self.lengths[seq_id]
        offset = n % self.block_size
        if offset == 0:                                       # last block full (or none): a new block
            if not self.free_queue:
                raise MemoryError("no free block")
            table.append(self._take())
        elif self.refs[table[-1]] > 1:                        # shared and partly filled: copy-on-write
            if not self.free_queue:
                raise MemoryError("no free block")
            new = self._take()
            self.refs[table[-1]] -= 1
            self.copies.append((table[-1], new))
            table[-1] = new
        self.lengths[seq_id] = n + 1
        return table[-1] * self.block_size + offset

    def fork(self, parent_id, child_id) -> list[int]:
        for block in self.tables[parent_id]:
            self.refs[block] += 1                             # shared, not copied
        self.tables[child_id] = list(self.tables[parent_id])
        self.lengths[child_id] = self.lengths[parent_id]
        return list(self.tables[child_id])

    def free(self, seq_id) -> None:
        for block in reversed(self.tables.pop(seq_id)):       # last block first
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free_queue.append(block)
        del self.lengths[seq_id]

    def pop_copies(self) -> list[tuple[int, int]]:
        copies, self.copies = self.copies, []
        return copies
