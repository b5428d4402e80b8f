"""The model runner's persistent input batch: one row per running sequence, kept between steps.

The scheduler sends each step's *changes* (kvlab.engine.scheduler.SchedulerOutput): which
sequences are new, how many tokens each computes, which block-table entries moved, who
left. The runner applies them to this batch and builds the step's inputs from it, so the
host work per step grows with what changed and with the batch, never with the context
(vLLM v1's InputBatch and BlockTable are the same idea, larger):

    row r   token_ids[r, :num_known[r]]   the sequence's tokens whose ids are on the host
            num_tokens[r]                 + the one a step is sampling right now (pending)
            tables.host[r]                its block table (block ids of its logical blocks)
            temperature, top_k, top_p,    its sampling parameters, converted once when it
            num_logprobs, generators[r]   arrives (a seeded request: its own torch.Generator)
            sample_index[r]               where its token sampled by the last step sits among
                                          that step's sampled ids (on the device until collected)

Rows are handed out lowest first (a heap), so the rows in use stay packed at the top of
the arrays and a step copies only that part of the block tables to the device.

Everything here is host memory except `tables.device`, the block tables the attention
kernels read on the GPU (on the CPU it is the host array itself). The host tables are in
pinned memory, so that their copy to the GPU is asynchronous: the caller must not write
them while the previous copy may still be reading them (ModelRunner waits for it first).
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from kvlab.engine.scheduler import NewSequenceData
from kvlab.engine.sequence import SeqId


class BlockTables:
    """Block tables of every row: `host` (numpy, pinned on a GPU machine) and `device` (what the
    kernels read). apply() writes the host side; sync() copies the rows in use to the device."""

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device):
        self.on_cpu = device.type == "cpu"
        host = torch.zeros(max_rows, max_blocks, dtype=torch.int32, pin_memory=not self.on_cpu)
        self.host = host.numpy()                                       # (rows, max_blocks)
        self.device = host if self.on_cpu else torch.zeros_like(host, device=device)
        self._host_tensor = host
        self._dirty = False

    def apply(self, row: int, start: int, block_ids: list[int]) -> None:
        """Entries start, start + 1, ... of the row's table become block_ids."""
        self.host[row, start:start + len(block_ids)] = block_ids
        self._dirty = True

    def sync(self, num_rows: int) -> None:
        """Copy rows 0 .. num_rows - 1 to the device if anything changed (asynchronous)."""
        if self._dirty and not self.on_cpu and num_rows:
            self.device[:num_rows].copy_(self._host_tensor[:num_rows], non_blocking=True)
        self._dirty = False


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, max_blocks: int, vocab_size: int,
                 device: torch.device, make_generator):
        """make_generator(params, sample_index) -> torch.Generator | None: a seeded sample's own
        random stream (kvlab.engine.sampler.sample_generator, on the runner's device)."""
        self.vocab_size = vocab_size
        self.make_generator = make_generator
        self.row_of: dict[SeqId, int] = {}
        self._free_rows = list(range(max_num_seqs))                    # a heap: lowest row first
        self.token_ids = np.zeros((max_num_seqs, max_model_len), dtype=np.int32)
        self.num_known = np.zeros(max_num_seqs, dtype=np.int64)
        self.num_tokens = np.zeros(max_num_seqs, dtype=np.int64)
        self.tables = BlockTables(max_num_seqs, max_blocks, device)
        self.temperature = np.zeros(max_num_seqs, dtype=np.float32)    # 0 = greedy
        self.top_k = np.zeros(max_num_seqs, dtype=np.int32)            # >= vocab: no limit
        self.top_p = np.ones(max_num_seqs, dtype=np.float32)
        self.num_logprobs = np.full(max_num_seqs, -1, dtype=np.int32)  # -1: not asked
        self.generators: list[torch.Generator | None] = [None] * max_num_seqs
        self.num_seeded = 0                                            # rows with a generator
        self.sample_index = np.full(max_num_seqs, -1, dtype=np.int64)  # -1: did not sample last step
        self._kept: dict[SeqId, torch.Generator] = {}                # preempted seeded sequences' generators

    @property
    def num_rows(self) -> int:
        """Rows 0 .. num_rows - 1 hold every running sequence (and maybe some free rows)."""
        return max(self.row_of.values(), default=-1) + 1

    def add(self, new: NewSequenceData) -> int:
        """Give a new sequence a row: its tokens and sampling parameters. Raises (and takes no row)
        if its parameters cannot be turned into what the sampler runs."""
        p = new.params
        generator = self._kept.pop(new.seq_id, None)                   # back after a preemption: same stream
        if generator is None:
            generator = self.make_generator(p, new.seq_id[1])         # may raise: before the row is taken
        top_k = self.vocab_size if p.top_k <= 0 else min(p.top_k, self.vocab_size)
        row = heapq.heappop(self._free_rows)
        self.row_of[new.seq_id] = row
        n = len(new.token_ids)
        self.token_ids[row, :n] = new.token_ids
        self.num_known[row] = self.num_tokens[row] = n
        self.temperature[row], self.top_k[row], self.top_p[row] = p.temperature, top_k, p.top_p
        self.num_logprobs[row] = -1 if p.logprobs is None else p.logprobs
        self.generators[row] = generator
        self.num_seeded += generator is not None
        self.sample_index[row] = -1
        return row

    def remove(self, seq_id: SeqId, preempted: bool = False) -> None:
        """Free the sequence's row. A preempted sequence comes back later: its random generator is
        kept, so that a seeded request draws the same stream however often it is preempted."""
        row = self.row_of.pop(seq_id, None)
        if row is not None:                     # None: it never got a row (its step failed first)
            if self.generators[row] is not None:
                self.num_seeded -= 1
                if preempted:
                    self._kept[seq_id] = self.generators[row]
            self.generators[row] = None
            heapq.heappush(self._free_rows, row)
        elif not preempted:
            self._kept.pop(seq_id, None)

    def record_sampled(self, seq_ids: list[SeqId], token_ids: list[int]) -> None:
        """Sampled ids reached the host: they become known tokens of their rows (rows that left
        in the meantime are skipped: their last token is dropped)."""
        rows = np.fromiter((self.row_of.get(s, -1) for s in seq_ids), dtype=np.int64, count=len(seq_ids))
        live = rows >= 0
        rows = rows[live]
        self.token_ids[rows, self.num_known[rows]] = np.asarray(token_ids, dtype=np.int32)[live]
        self.num_known[rows] += 1
