"""The one place where kvlab.exercises drives kvlab's Scheduler (chapter 07's scheduler-step check).

`engine_steps` runs a request trace through the engine's real `Scheduler` and `BlockAllocator`
with no model (every sampled token is 0, as `kvlab.engine.replay` does) and records, for every
step, the scheduler's state just before `schedule()` and its decision, both as plain data:

    Seq        request_id, num_tokens (prompt + generated), num_computed (K/V cached),
               num_slots (tokens holding a cache slot: computed, or about to be)
    StepState  running (admission order), waiting (queue order), free_blocks
    StepPlan   scheduled {request_id: tokens computed this step}, preempted [request_id, ...]

The learner's `schedule_step(running, waiting, free_blocks, limits)` gets the same state and must
return the same plan. Everything else in the exercises reads these plain records, so when the
Scheduler's API changes, only `_decision` below and kvlab.engine.replay's helpers need to follow.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq_
from dataclasses import dataclass, field

from kvlab.engine.replay import advance_without_model, trace_request
from kvlab.engine.scheduler import Scheduler
from kvlab.paged.block_allocator import BlockAllocator


@dataclass
class Seq:
    """One request's sequence as the scheduler sees it (n = 1: one sequence per request)."""
    request_id: str
    num_tokens: int          # prompt + generated so far
    num_computed: int        # tokens whose K/V are in the cache
    num_slots: int           # tokens holding a cache slot (0 while waiting)

    def __repr__(self) -> str:
        return f"{self.request_id}(tokens {self.num_tokens}, computed {self.num_computed}, slots {self.num_slots})"


@dataclass(frozen=True)
class Limits:
    block_size: int          # tokens per KV block
    token_budget: int        # tokens one step may compute (max_num_batched_tokens)
    max_running: int         # sequences running at once (max_num_seqs)
    watermark_blocks: int    # blocks an admission must leave free while anything runs


@dataclass
class StepState:
    running: list[Seq]       # admission order: the last one is the newest
    waiting: list[Seq]       # queue order: the first one is next
    free_blocks: int


@dataclass
class StepPlan:
    scheduled: dict[str, int] = field(default_factory=dict)   # request id -> tokens computed in this step
    preempted: list[str] = field(default_factory=list)        # request ids sent back to the queue, in order


def _snapshot(seq) -> Seq:
    return Seq(seq.request.request_id, seq.num_tokens, seq.num_computed_tokens, seq.num_allocated_tokens)


def _decision(out) -> StepPlan:
    """The scheduler's output (a SchedulerOutput keyed by sequence id) as a StepPlan."""
    return StepPlan({seq_id[0]: n for seq_id, n in out.num_scheduled_tokens.items()},
                    [seq_id[0] for seq_id in out.preempted_seq_ids])


def engine_steps(prompt_lens: Seq_[int], output_lens: Seq_[int], *, num_blocks: int, block_size: int,
                 max_running: int, token_budget: int, watermark: float = 0.01,
                 arrival_steps: Seq_[int] | None = None, max_steps: int = 10_000) -> tuple[Limits, list]:
    """Run the trace through kvlab's Scheduler; return its Limits and [(StepState, StepPlan), ...], one per step."""
    allocator = BlockAllocator(num_blocks, block_size)
    scheduler = Scheduler(allocator, max_running, token_budget, max_model_len=num_blocks * block_size + 1,
                          watermark=watermark)
    limits = Limits(block_size, token_budget, max_running, scheduler.watermark_blocks)
    n = len(prompt_lens)
    arrivals = sorted(range(n), key=lambda i: (arrival_steps[i] if arrival_steps is not None else 0, i))
    steps, nxt, step = [], 0, 0
    while nxt < n or scheduler.has_unfinished():
        while nxt < n and (arrival_steps is None or arrival_steps[arrivals[nxt]] <= step):
            i = arrivals[nxt]
            scheduler.add(trace_request(chr(ord("A") + i) if n <= 26 else f"r{i}", [7] * prompt_lens[i],
                                        output_lens[i], step))
            nxt += 1
        state = StepState([_snapshot(s) for s in scheduler.running], [_snapshot(s) for s in scheduler.waiting],
                          allocator.num_free_blocks)
        out = scheduler.schedule()
        steps.append((state, _decision(out)))
        advance_without_model(scheduler, out)
        step += 1
        if step > max_steps:
            raise RuntimeError(f"the trace did not finish in {max_steps} steps")
    return limits, steps
