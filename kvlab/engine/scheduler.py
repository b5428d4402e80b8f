"""The scheduler: who runs in the next step, with how many tokens. The one policy.

Each call to `schedule()` builds one step's batch under two budgets, KV blocks
(`BlockAllocator`) and tokens (`max_num_batched_tokens`), in this order:

  1. decodes: every running sequence whose tokens are all computed gets one slot for the
     token it sampled last step, oldest first. When no block is free for it, the newest
     running sequence is preempted by recompute (its blocks freed, back to the head of
     the waiting queue keeping its generated tokens), until the block frees up or the
     sequence preempted is this one;
  2. prefill chunks of running sequences admitted earlier whose prompt did not fit one
     step (chunked prefill: a long prompt never stalls the decodes, which went first);
  3. admissions, only if nobody was preempted in this step: first come first served,
     while the sequence at the head of the queue fits (head-of-line blocking): its prompt
     (plus tokens it had generated before a preemption) needs blocks, leaving `watermark`
     of the pool free while anything runs so that the newcomer is not preempted at once
     (vLLM's block manager); a running-sequence slot (`max_num_seqs`); and some of the token
     budget. A prompt longer than the budget left runs its first chunk now.

After the forward pass `update()` advances what was computed (registering full blocks in
the prefix cache), appends the sampled tokens and finishes sequences on EOS, stop tokens,
max_tokens or the model's maximum length: their blocks are free at once. vLLM v1's
`Scheduler` (vllm/v1/core/sched/scheduler.py) follows the same loop; nano-vllm's is the
same idea without chunking.

The same rules, with prompts one token longer, are what `kvlab.fragmentation` simulates
for the "paged" policy (its request holds the slot of the token it is about to produce,
the engine writes a token's K/V the step after sampling it); tests hold the two equal on
random traces. `kvlab.engine.replay` drives this scheduler with no model (notebook 05).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kvlab.engine.sequence import Request, Sequence, SequenceStatus
from kvlab.paged.block_allocator import BlockAllocator


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int                  # tokens of this sequence computed in this step
    samples: bool                        # this step computes its last known token: sample the next
    children: list[Sequence] = field(default_factory=list)   # n > 1: samples forked after this step

    @property
    def context_len(self) -> int:
        """Tokens already cached before this step (the chunk starts here)."""
        return self.seq.num_computed_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]   # one-token rows first (decodes), then prefill chunks
    copies: list[tuple[int, int]]        # copy-on-write (src, dst) blocks to copy before this step's writes
    preempted: list[Sequence]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_decodes(self) -> int:
        return sum(1 for s in self.scheduled if s.num_new_tokens == 1)


class Scheduler:
    """Waiting and running queues over one BlockAllocator.

        add(request)            its first sequence joins the waiting queue
        schedule() -> SchedulerOutput
        update(output, sampled) after the forward pass: tokens appended, finished ones freed
        finish(seq, reason)     end a sequence early (a stop string seen in its text)
        abort(request_id)       drop a request wherever it is; its blocks are freed
    """

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, watermark: float = 0.01, enable_chunked_prefill: bool = True,
                 eos_token_id: int | None = None):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.watermark_blocks = int(watermark * allocator.num_blocks)
        self.enable_chunked_prefill = enable_chunked_prefill
        self.eos_token_id = eos_token_id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # admission order: the last one is preempted first
        self.requests: dict[str, Request] = {}
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))   # rows of the runner's block-table buffer
        # running totals, for metrics
        self.num_preemptions = 0
        self.num_admitted_tokens = 0      # tokens allocated at admissions (prompts, + generated after preemption)
        self.num_cached_tokens = 0        # of those, supplied by the prefix cache
        self.num_recomputed_tokens = 0    # tokens admitted again after a preemption

    # ------------------------------------------------------------------ queues
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self.waiting.extend(s for s in request.sequences if not s.finished)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_rows_in_use(self) -> int:
        return self.max_num_seqs - len(self._free_rows)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledSequence] = []
        chunks: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        # 1. decodes, oldest first; preempt the newest when blocks run out
        plenty = self.allocator.num_free_blocks >= len(self.running)    # each append takes <= 1 block
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or seq.num_uncomputed_allocated > 0:
                continue                                   # preempted above, or still prefilling (step 2)
            if budget == 0:
                break
            while not plenty and not self.allocator.can_append(seq.seq_id):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self._append_slot(seq)
            decodes.append(self._scheduled(seq, 1))
            budget -= 1

        # 2. prompt chunks of sequences admitted in earlier steps
        decoding = {id(d.seq) for d in decodes}
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed_allocated > 0 and id(seq) not in decoding:
                n = min(seq.num_uncomputed_allocated, budget)
                chunks.append(self._scheduled(seq, n))
                budget -= n

        # 3. admissions, first come first served, unless this step preempted someone
        while not preempted and self.waiting and budget > 0:
            seq = self.waiting[0]
            rows = self._rows_needed(seq)
            if self.num_rows_in_use + rows > self.max_num_seqs:
                break
            needed = self.allocator.free_blocks_needed(seq.token_ids)
            if needed > self.allocator.num_free_blocks - (self.watermark_blocks if self.running else 0):
                break
            if not self.enable_chunked_prefill and seq.num_tokens > budget:
                break                                      # the whole prompt in one step, or wait
            self.waiting.popleft()
            self._admit(seq, rows)
            n = min(seq.num_uncomputed_allocated, budget)
            chunks.append(self._scheduled(seq, n))
            budget -= n

        scheduled = decodes + [c for c in chunks if c.num_new_tokens == 1] + \
            [c for c in chunks if c.num_new_tokens > 1]
        return SchedulerOutput(scheduled, self.allocator.pop_copies(), preempted,
                               self.max_num_batched_tokens - budget)

    def update(self, output: SchedulerOutput, sampled: dict[Sequence, int]) -> list[Sequence]:
        """After the forward pass: `sampled` maps each sampling sequence (children included) to its
        new token. Returns the sequences that finished in this step."""
        finished: list[Sequence] = []
        for item in output.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if self.allocator.enable_prefix_caching:       # register the blocks this step filled
                self.allocator.mark_computed(seq.seq_id, seq.num_computed_tokens)
            for child in item.children:                   # n > 1: the prompt is in the cache, share it
                self.allocator.fork(seq.seq_id, child.seq_id)
                child.num_computed_tokens = child.num_allocated_tokens = seq.num_computed_tokens
                child.block_table = list(seq.block_table)
                child.status = SequenceStatus.RUNNING
                self.running.append(child)
            for s in [seq, *item.children]:
                if s in sampled:
                    s.token_ids.append(sampled[s])
                    reason = self._stop_reason(s)
                    if reason is not None:
                        self.finish(s, *reason)
                        finished.append(s)
        return finished

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """The sequence is done: its blocks and row are free at once."""
        if seq.finished:
            return
        if seq.status == SequenceStatus.RUNNING:
            self._release(seq)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def abort(self, request_id: str) -> Request:
        """Drop a request wherever its sequences are; every block it held is freed."""
        request = self.requests.get(request_id)
        if request is None:
            raise ValueError(f"unknown request id {request_id!r}: not in the engine (never added, or finished)")
        for seq in request.sequences:
            self.finish(seq, "abort")
        for seq in request.sequences:                      # n > 1 before the fork: rows kept for samples
            self._free_rows.extend(seq.reserved_rows)
            seq.reserved_rows = []
        del self.requests[request_id]
        return request

    def pop_finished_request(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None and request.finished:
            del self.requests[request_id]
            return request
        return None

    # ------------------------------------------------------------------ internals
    def _scheduled(self, seq: Sequence, n: int) -> ScheduledSequence:
        samples = seq.num_computed_tokens + n == seq.num_tokens
        item = ScheduledSequence(seq, n, samples)
        request = seq.request
        if samples and seq.index == 0 and request.params.n > 1 and not request.forked:
            request.forked = True                          # the samples sample from this row's logits
            for i, row in enumerate(seq.reserved_rows, start=1):
                device = seq.generator.device if seq.generator is not None else "cpu"
                child = request.new_sequence(i, seq.token_ids, sample_generator(request.params, i, device))
                child.row = row
                item.children.append(child)
            seq.reserved_rows = []
        return item

    def _rows_needed(self, seq: Sequence) -> int:
        request = seq.request
        return request.params.n if (seq.index == 0 and request.params.n > 1 and not request.forked) else 1

    def _admit(self, seq: Sequence, rows: int) -> None:
        table = self.allocator.allocate_sequence(seq.seq_id, seq.token_ids)
        seq.block_table = table
        seq.table_synced = 0
        seq.num_allocated_tokens = seq.num_tokens
        seq.num_computed_tokens = self.allocator.num_cached_tokens(seq.seq_id)
        self.num_admitted_tokens += seq.num_tokens
        self.num_cached_tokens += seq.num_computed_tokens
        if seq.num_preemptions:
            self.num_recomputed_tokens += seq.num_tokens
        seq.row = self._free_rows.pop()
        seq.reserved_rows = [self._free_rows.pop() for _ in range(rows - 1)]
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        metrics = seq.request.metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = time.perf_counter()
            metrics.num_cached_tokens = seq.num_computed_tokens

    def _append_slot(self, seq: Sequence) -> None:
        """Give the sequence's last sampled token a slot; keep seq.block_table equal to the
        allocator's (a new block, or a copy-on-write move of the last one)."""
        pos = seq.num_allocated_tokens
        slot = self.allocator.append_token(seq.seq_id, seq.token_ids[pos])
        block = slot // self.allocator.block_size
        if pos % self.allocator.block_size == 0:
            seq.block_table.append(block)
            seq.table_synced = min(seq.table_synced, len(seq.block_table) - 1)
        elif seq.block_table[-1] != block:                 # copy-on-write moved the last block
            seq.block_table[-1] = block
            seq.table_synced = min(seq.table_synced, len(seq.block_table) - 1)
        seq.num_allocated_tokens += 1

    def _release(self, seq: Sequence) -> None:
        self.allocator.free_sequence(seq.seq_id)
        self._free_rows.append(seq.row)
        self._free_rows.extend(seq.reserved_rows)
        seq.row, seq.reserved_rows = -1, []
        seq.block_table, seq.table_synced = [], 0

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_allocated_tokens = 0
        seq.num_preemptions += 1
        seq.request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _stop_reason(self, seq: Sequence) -> tuple[str, int | None] | None:
        params = seq.request.params
        token = seq.token_ids[-1]
        if not params.ignore_eos and self.eos_token_id is not None and token == self.eos_token_id:
            return "stop", None
        if token in params.stop_token_ids:
            return "stop", token
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None


def sample_generator(params, index: int, device) -> torch.Generator | None:
    """Sample i of a seeded request draws from its own generator, seeded with (seed + i) mod 2**64."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed((params.seed + index) % 2**64)
