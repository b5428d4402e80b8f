"""The engine's scheduler on a request trace, with a runner that has no model.

`replay` feeds requests (prompt token ids and an output length, optionally an arrival
step) to the real `Scheduler` over a real `BlockAllocator`, and in place of the forward
pass "samples" token 0 for every sequence that samples. Everything the scheduler
decides (admission under the watermark and the token budget, chunked prefill,
preemption by recompute, prefix-cache hits, freeing) is exactly what the engine would
decide for the same trace: this is the engine with the model taken out, fast enough
for thousands of requests. Notebook 05 uses it to show what paging buys; the tests use
it to hold `kvlab.fragmentation`'s fast simulator to the engine's rules.

`trace_request` and `advance_without_model` are its two pieces, for other drivers of the same
scheduler (kvlab.exercises checks a learner's scheduler step against it).

It counts what an engine would see: blocks in use and requests running per step,
prompt tokens admitted vs those the prefix cache supplied, preemptions and the tokens
they made the engine compute again, and each request's admission and finish step.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from kvlab.engine.outputs import RequestMetrics
from kvlab.engine.sampling_params import SamplingParams
from kvlab.engine.scheduler import Scheduler
from kvlab.engine.sequence import Request, Sequence
from kvlab.paged.block_allocator import BlockAllocator


@dataclass
class TraceStats:
    num_requests: int
    prompt_tokens: int = 0            # tokens admitted to prefill: prompts, plus generated tokens recomputed
    cached_tokens: int = 0            # of those, tokens whose K/V came from the prefix cache
    computed_tokens: int = 0          # tokens the forward passes computed (prefill and decode)
    steps: int = 0                    # engine steps until every request finished
    peak_blocks: int = 0              # most blocks in use at once
    peak_running: int = 0             # most requests running at once
    preemptions: int = 0              # sequences sent back to the queue to free blocks
    recomputed_tokens: int = 0        # prompt + generated tokens prefilled again after a preemption
    used_blocks: list[int] = field(default_factory=list)    # blocks in use after scheduling each step
    running: list[int] = field(default_factory=list)        # sequences running in each step
    scheduled_tokens: list[int] = field(default_factory=list)   # tokens in each step's batch
    admit_step: list[int] = field(default_factory=list)     # first step each request was scheduled
    finish_step: list[int] = field(default_factory=list)    # step each request produced its last token

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def hit_rate(self) -> float:
        """Fraction of admitted prompt tokens served from the prefix cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def trace_request(request_id: str, prompt: Seq[int], output_len: int, arrival_step: int = 0) -> Request:
    """A request of a trace: greedy, exactly `output_len` tokens (EOS ignored)."""
    request = Request(request_id, None, list(prompt),
                      SamplingParams(temperature=0, max_tokens=int(output_len), ignore_eos=True),
                      RequestMetrics(arrival_time=arrival_step))
    request.new_sequence(0, list(prompt))
    return request


def advance_without_model(scheduler: Scheduler, out) -> list[Sequence]:
    """The step `out` with a runner that has no model: every sequence that samples in it gets token 0.
    Returns the sequences that finished (their requests are removed from the scheduler)."""
    sampled = {seq.seq_id: 0 for seq in scheduler.running if seq.num_pending}
    finished = [seq for seq in scheduler.update_from_output(out, sampled) if seq.finished]
    for seq in finished:
        scheduler.pop_finished_request(seq.request.request_id)
    return finished


def replay(prompts: Seq[Seq[int]], output_lens: Seq[int], num_blocks: int, block_size: int = 16,
           enable_prefix_caching: bool = False, max_running: int | None = None,
           max_num_batched_tokens: int | None = None, watermark: float = 0.01,
           arrival_steps: Seq[int] | None = None, max_steps: int = 10_000_000) -> TraceStats:
    """Run the trace through the engine's scheduler (see the module docstring).

    max_running: the scheduler's max_num_seqs (default: no limit but the blocks);
    max_num_batched_tokens: its token budget per step (default: no limit, so a prompt is
    prefilled in one step); arrival_steps: the step at which each request joins the queue
    (default: all at step 0)."""
    n = len(prompts)
    if len(output_lens) != n:
        raise ValueError(f"need one output length per prompt, got {n} prompts and {len(output_lens)} lengths")
    if arrival_steps is not None and len(arrival_steps) != n:
        raise ValueError(f"need one arrival step per prompt, got {n} prompts and {len(arrival_steps)} steps")
    if any(int(o) < 1 for o in output_lens):
        raise ValueError("output lengths must be >= 1")
    allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
    capacity = num_blocks * block_size
    for i, (p, o) in enumerate(zip(prompts, output_lens)):
        if not p:
            raise ValueError(f"request {i}: empty prompt")
        if len(p) + int(o) - 1 > capacity:        # the last token is sampled, never cached
            raise ValueError(f"request {i} of {len(p)} + {int(o)} tokens needs more than the {num_blocks} "
                             f"blocks x {block_size} of the pool: it could never finish")
    max_running = max_running or max(n, 1)
    budget = max_num_batched_tokens or max(max_running, sum(len(p) + int(o) for p, o in zip(prompts, output_lens)))
    scheduler = Scheduler(allocator, max_running, budget, max_model_len=capacity + 1, watermark=watermark)
    arrivals = sorted(range(n), key=lambda i: (arrival_steps[i] if arrival_steps is not None else 0, i))
    stats = TraceStats(n, admit_step=[-1] * n, finish_step=[-1] * n)
    nxt = 0
    step = 0
    while nxt < n or scheduler.has_unfinished():
        while nxt < n and (arrival_steps is None or arrival_steps[arrivals[nxt]] <= step):
            i = arrivals[nxt]
            scheduler.add(trace_request(str(i), prompts[i], output_lens[i], step))
            nxt += 1
        out = scheduler.schedule()
        for seq_id in out.num_scheduled_tokens:
            i = int(seq_id[0])
            if stats.admit_step[i] < 0:
                stats.admit_step[i] = step
        stats.computed_tokens += out.num_batched_tokens
        stats.used_blocks.append(allocator.num_used_blocks)
        stats.running.append(len(scheduler.running))
        stats.scheduled_tokens.append(out.num_batched_tokens)
        stats.peak_blocks = max(stats.peak_blocks, allocator.num_used_blocks)
        stats.peak_running = max(stats.peak_running, len(scheduler.running))
        for seq in advance_without_model(scheduler, out):
            stats.finish_step[int(seq.request.request_id)] = step
        step += 1
        if step > max_steps:
            raise RuntimeError(f"the trace did not finish in {max_steps} steps")
    stats.steps = step
    stats.preemptions = scheduler.num_preemptions
    stats.prompt_tokens = scheduler.num_admitted_tokens
    stats.cached_tokens = scheduler.num_cached_tokens
    stats.recomputed_tokens = scheduler.num_recomputed_tokens
    return stats
