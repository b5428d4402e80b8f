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
     (vLLM's block manager); a running-sequence place (`max_num_seqs`); and some of the
     token budget. A prompt longer than the budget left runs its first chunk now.
     `SchedulerOutput.admission_stop` says which rule stopped admitting.

What it hands the model runner is plain data keyed by sequence id (vLLM v1's
SchedulerOutput): the sequences the runner has not seen, how many tokens each scheduled
sequence computes, what changed in the block tables, copy-on-write copies, and who left.
The runner keeps its own rows and never reads a Sequence; its answer, a ModelRunnerOutput
(sampled token ids per sequence), comes back through `update_from_output`, which appends
the tokens, registers the blocks they filled in the prefix cache, and finishes sequences on
EOS, stop tokens, max_tokens or the model's maximum length: their blocks are free at once.

Asynchronous scheduling. `schedule()` moves `num_computed_tokens` forward at once, so it
can plan step N + 1 before step N's output has come back: step N's sampled tokens are then
*pending* (a slot is taken for each with `BlockAllocator.append_slot`, the runner feeds the
ids on the device), and `update_from_output(N)` arrives while step N + 1 runs. A sequence
that step N ends (EOS, a stop string) has had one more token computed in step N + 1, which
is dropped; one that ends by length is not scheduled again (its length is known in advance).

vLLM v1's `Scheduler` (vllm/v1/core/sched/scheduler.py) follows the same loop; nano-vllm's
is the same idea without chunking. The same rules, with prompts one token longer, are what
`kvlab.fragmentation` simulates for the "paged" policy (its request holds the slot of the
token it is about to produce, the engine writes a token's K/V the step after sampling it);
tests hold the two equal on random traces. `kvlab.engine.replay` drives this scheduler with
no model (notebook 05).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from kvlab.engine.sampling_params import SamplingParams
from kvlab.engine.sequence import Request, Sequence, SequenceStatus, SeqId
from kvlab.paged.block_allocator import BlockAllocator


@dataclass
class NewSequenceData:
    """A sequence the model runner has not seen: it gets a row (admitted, re-admitted after a
    preemption, or forked from a sample of the same request)."""
    seq_id: SeqId
    token_ids: list[int]                 # known token ids (prompt, + generated before a preemption)
    params: SamplingParams
    sample_from: SeqId | None = None     # n > 1: forked in this step, samples from this sequence's logits


@dataclass
class SchedulerOutput:
    """One step, as plain data for the model runner (vLLM v1's SchedulerOutput)."""
    new_seqs: list[NewSequenceData]
    num_scheduled_tokens: dict[SeqId, int]          # tokens each sequence computes in this step: one-token rows
                                                    # (decodes) first, then prompt chunks
    num_computed_tokens: dict[SeqId, int]           # tokens each scheduled sequence has cached before the step
    block_updates: dict[SeqId, tuple[int, list[int]]]   # table entries from `start` on (BlockAllocator.pop_table_updates)
    copies: list[tuple[int, int]]                   # copy-on-write (src, dst) blocks to copy before this step's writes
    finished_seq_ids: list[SeqId]                   # ended since the last step (finished, aborted): forget them
    preempted_seq_ids: list[SeqId]                  # sent back to the queue in this step: rows to free
    admission_stop: str | None = None               # why admission stopped (None: nobody was waiting)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens

    @property
    def num_decodes(self) -> int:
        return sum(1 for n in self.num_scheduled_tokens.values() if n == 1)


# Why admission stopped, as SchedulerOutput.admission_stop says it (the x-ray shows these)
STOP_PREEMPTED = "preempted"        # this step preempted someone: nobody is admitted
STOP_BUDGET = "budget"              # no token budget left in this step
STOP_SEQS = "max_num_seqs"          # every place under max_num_seqs is taken
STOP_BLOCKS = "blocks"              # its blocks (plus the watermark) are not free
STOP_NO_CHUNKING = "no_chunking"    # chunked prefill is off and the prompt does not fit the budget left
STOP_PENDING = "pending"            # its last token is still being sampled (a preemption a step ago)


class Scheduler:
    """Waiting and running queues over one BlockAllocator.

        add(request)                          its first sequence joins the waiting queue
        schedule() -> SchedulerOutput
        update_from_output(out, runner_output) after the step: tokens appended, finished ones freed
        finish(seq, reason)                   end a sequence early (a stop string seen in its text)
        abort(request_id)                     drop a request wherever it is; its blocks are freed
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
        self.num_seqs_in_use = 0                   # running sequences + places reserved for n > 1 samples
        self._left: list[SeqId] = []               # sequences that left since the last schedule()
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
        max_tokens = request.params.max_tokens
        limit = self.max_model_len if max_tokens is None else min(len(request.prompt_token_ids) + max_tokens,
                                                                  self.max_model_len)
        for seq in request.sequences:
            seq.max_num_tokens = limit
        self.waiting.extend(s for s in request.sequences if not s.finished)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def sequence(self, seq_id: SeqId) -> Sequence | None:
        """The live sequence with this id, or None once its request has finished or been aborted."""
        request = self.requests.get(seq_id[0])
        if request is None or seq_id[1] >= len(request.sequences):
            return None
        return request.sequences[seq_id[1]]

    @property
    def num_running_requests(self) -> int:
        return len({s.request.request_id for s in self.running})

    @property
    def num_waiting_requests(self) -> int:
        return len({s.request.request_id for s in self.waiting})

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        decodes: list[tuple[Sequence, int, int]] = []       # (sequence, tokens cached before, tokens now)
        chunks: list[tuple[Sequence, int, int]] = []
        new_seqs: list[NewSequenceData] = []
        preempted: list[SeqId] = []
        running = SequenceStatus.RUNNING

        # 1. decodes, oldest first; preempt the newest when blocks run out
        plenty = self.allocator.num_free_blocks >= len(self.running)    # each append takes <= 1 block
        for seq in list(self.running):
            if seq.status is not running or seq.num_allocated_tokens > seq.num_computed_tokens:
                continue                                   # preempted above, or still prefilling (step 2)
            if len(seq.token_ids) + seq.num_pending >= seq.max_num_tokens:
                continue                                   # its pending token is its last: no more compute
            if budget == 0:
                break
            while not plenty and not self.allocator.can_append(seq.seq_id):
                victim = self.running[-1]                  # the newest: never one scheduled above
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            if seq.status is not running:
                continue
            self._append_slot(seq)
            decodes.append((seq, seq.num_computed_tokens, 1))
            seq.num_computed_tokens += 1                   # moved now: the next schedule() may come first
            budget -= 1

        # 2. prompt chunks of sequences admitted in earlier steps
        for seq in self.running:
            if budget == 0:
                break
            left = seq.num_allocated_tokens - seq.num_computed_tokens
            if left > 0:
                n = min(left, budget)
                chunks.append((seq, seq.num_computed_tokens, n))
                seq.num_computed_tokens += n
                budget -= n

        # 3. admissions, first come first served, unless this step preempted someone
        stop = STOP_PREEMPTED if preempted and self.waiting else None
        while not preempted and self.waiting:
            stop = self._cannot_admit(self.waiting[0], budget)
            if stop is not None:
                break
            seq = self.waiting.popleft()
            self._admit(seq)
            new_seqs.append(NewSequenceData(seq.seq_id, list(seq.token_ids), seq.params))
            n = min(seq.num_allocated_tokens - seq.num_computed_tokens, budget)
            chunks.append((seq, seq.num_computed_tokens, n))
            seq.num_computed_tokens += n
            budget -= n

        # one-token rows first (decodes, one-token chunks), then the longer chunks
        rows = decodes + [c for c in chunks if c[2] == 1] + [c for c in chunks if c[2] > 1]
        for seq, _, _ in rows:
            if seq.num_computed_tokens == len(seq.token_ids) + seq.num_pending:   # it computes its last token:
                seq.num_pending += 1                                              # it samples the next one
                new_seqs += self._fork_if_first_sample(seq)
        self._left, left = [], self._left
        return SchedulerOutput(new_seqs, {seq.seq_id: n for seq, _, n in rows},
                               {seq.seq_id: before for seq, before, _ in rows}, self.allocator.pop_table_updates(),
                               self.allocator.pop_copies(), left, preempted, stop)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[SeqId, int]) -> list[Sequence]:
        """After step `out` ran: `sampled` maps each sequence that sampled to its new token (the
        ModelRunnerOutput's). Registers the blocks the step filled in the prefix cache, appends
        the tokens, and finishes sequences that stop. Returns the sequences that received a token,
        in order; a sequence that ended in the meantime (a stop string, an abort, EOS a step ago
        under asynchronous scheduling) receives nothing: its extra token is dropped."""
        if self.allocator.enable_prefix_caching:          # the step wrote these K/V: register full blocks
            for seq_id, n in out.num_scheduled_tokens.items():
                seq = self.sequence(seq_id)
                if seq is not None and seq.status == SequenceStatus.RUNNING:
                    self.allocator.mark_computed(seq_id, min(out.num_computed_tokens[seq_id] + n, len(seq.token_ids)))
        advanced = []
        requests, fill = self.requests, self.allocator.append_token     # (this loop runs per token: locals)
        running, finished = SequenceStatus.RUNNING, SequenceStatus.FINISHED
        for seq_id, token in sampled.items():
            request = requests.get(seq_id[0])
            if request is None:
                continue
            seq = request.sequences[seq_id[1]]
            if seq.status is finished:
                continue
            seq.num_pending -= 1
            if seq.status is running and len(seq.token_ids) < seq.num_allocated_tokens:
                fill(seq_id, token)                       # its slot was taken while it was pending
            seq.token_ids.append(token)
            advanced.append(seq)
            reason = self._stop_reason(seq)
            if reason is not None:
                self.finish(seq, *reason)
        return advanced

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """The sequence is done: its blocks and its place are free at once."""
        if seq.finished:
            return
        if seq.status == SequenceStatus.RUNNING:
            self._release(seq)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._left.append(seq.seq_id)                      # the runner forgets it (row, generator)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def abort(self, request_id: str, reason: str = "abort", message: str | None = None) -> Request:
        """Drop a request wherever its sequences are; every block it held is freed. reason
        "error" (with a message) when the engine could not run it."""
        request = self.requests.get(request_id)
        if request is None:
            raise ValueError(f"unknown request id {request_id!r}: not in the engine (never added, or finished)")
        for seq in request.sequences:
            self.finish(seq, reason, message)
        del self.requests[request_id]
        return request

    def pop_finished_request(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None and request.finished:
            del self.requests[request_id]
            return request
        return None

    # ------------------------------------------------------------------ internals
    def _cannot_admit(self, seq: Sequence, budget: int) -> str | None:
        """Which admission rule the head of the queue fails now (None: admit it)."""
        if budget == 0:
            return STOP_BUDGET
        if seq.num_pending:
            return STOP_PENDING
        if self.num_seqs_in_use + self._seqs_needed(seq) > self.max_num_seqs:
            return STOP_SEQS
        seq.prefix_hashes = self.allocator.prefix_hashes(seq.token_ids, seq.prefix_hashes)   # hashed once
        needed = self.allocator.free_blocks_needed(seq.token_ids, seq.prefix_hashes)
        if needed > self.allocator.num_free_blocks - (self.watermark_blocks if self.running else 0):
            return STOP_BLOCKS
        if not self.enable_chunked_prefill and len(seq.token_ids) > budget:
            return STOP_NO_CHUNKING                        # the whole prompt in one step, or wait
        return None

    def _seqs_needed(self, seq: Sequence) -> int:
        request = seq.request
        return request.params.n if (seq.index == 0 and request.params.n > 1 and not request.forked) else 1

    def _admit(self, seq: Sequence) -> None:
        self.allocator.allocate_sequence(seq.seq_id, seq.token_ids, seq.prefix_hashes)
        seq.num_allocated_tokens = len(seq.token_ids)
        seq.num_computed_tokens = self.allocator.num_cached_tokens(seq.seq_id)
        self.num_admitted_tokens += len(seq.token_ids)
        self.num_cached_tokens += seq.num_computed_tokens
        if seq.num_preemptions:
            self.num_recomputed_tokens += len(seq.token_ids)
        seq.num_reserved_seqs = self._seqs_needed(seq) - 1
        self.num_seqs_in_use += 1 + seq.num_reserved_seqs
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        metrics = seq.request.metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = time.perf_counter()
            metrics.num_cached_tokens = seq.num_computed_tokens

    def _fork_if_first_sample(self, seq: Sequence) -> list[NewSequenceData]:
        """n > 1: the step that computes the end of the prompt forks it into the n samples. They
        share its blocks (copy-on-write when they first append, in a later step, after this step
        has written them) and sample their first tokens from the same logits row."""
        request = seq.request
        if seq.index != 0 or request.params.n == 1 or request.forked:
            return []
        request.forked = True
        children = []
        for i in range(1, request.params.n):
            child = request.new_sequence(i, seq.token_ids)
            child.max_num_tokens = seq.max_num_tokens
            self.allocator.fork(seq.seq_id, child.seq_id)
            child.num_computed_tokens = child.num_allocated_tokens = seq.num_computed_tokens
            child.num_pending = seq.num_pending
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            children.append(NewSequenceData(child.seq_id, list(child.token_ids), request.params,
                                            sample_from=seq.seq_id))
        seq.num_reserved_seqs = 0                          # the places it kept are the children's now
        return children

    def _append_slot(self, seq: Sequence) -> None:
        """A slot for the token this decode computes: the one sampled last step (pending, its id
        not on the host yet, under asynchronous scheduling)."""
        pos = seq.num_allocated_tokens
        if pos < len(seq.token_ids):
            self.allocator.append_token(seq.seq_id, seq.token_ids[pos])
        else:
            self.allocator.append_slot(seq.seq_id)
        seq.num_allocated_tokens += 1

    def _release(self, seq: Sequence) -> None:
        self.allocator.free_sequence(seq.seq_id)
        self.num_seqs_in_use -= 1 + seq.num_reserved_seqs
        seq.num_reserved_seqs = 0

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
        if seq.num_pending == 0 and len(seq.token_ids) >= seq.max_num_tokens:   # max_tokens or the model's maximum
            return "length", None
        return None
