"""Replaying request traces on the block allocator (no model): memory and prefill saved.

A request is a prompt (token ids) and an output length. `replay` admits requests in
order while the allocator can take them (at most `max_running` at once), grows every
running request by one token a step, and frees a request the step it finishes, so a
waiting one can take its blocks at once. When a running request needs a block and none
is free, the newest request is preempted (freed and queued again, to be recomputed),
as vLLM does. It counts what an engine would see:
blocks in use per step, prompt tokens that needed prefill vs those the prefix cache
supplied, and how many requests ran at once.

`contiguous_capacity` is the "before" picture: how many requests fit when each one
reserves max_seq_len slots up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvlab.paged.block_allocator import BlockAllocator


@dataclass
class TraceStats:
    num_requests: int
    prompt_tokens: int              # prompt tokens admitted (a preempted prompt counts again)
    cached_tokens: int              # prompt tokens whose K/V came from the prefix cache
    steps: int                      # decode steps until every request finished
    peak_blocks: int                # most blocks in use at once
    peak_running: int               # most requests running at once
    preemptions: int = 0            # requests sent back to the queue to free blocks (recomputed later)
    used_blocks: list[int] = field(default_factory=list)    # blocks in use after each step
    running: list[int] = field(default_factory=list)        # requests still running after each step

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens served from the prefix cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def replay(prompts: Sequence[Sequence[int]], output_lens: Sequence[int], num_blocks: int, block_size: int = 16,
           enable_prefix_caching: bool = False, max_running: int | None = None) -> TraceStats:
    """Run the trace through a BlockAllocator, first come first served, no preemption."""
    if len(prompts) != len(output_lens):
        raise ValueError(f"need one output length per prompt, got {len(prompts)} prompts and "
                         f"{len(output_lens)} lengths")
    if any(n < 1 for n in output_lens):
        raise ValueError("output lengths must be >= 1")
    alloc = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
    for p, n in zip(prompts, output_lens):
        if alloc.blocks_needed(len(p) + n) > num_blocks:
            raise ValueError(f"a request of {len(p)} + {n} tokens needs more than the {num_blocks} blocks "
                             f"of the pool")
    max_running = max_running or len(prompts)
    waiting = list(range(len(prompts)))
    remaining: dict[int, int] = {}                      # running request -> output tokens still to come
    stats = TraceStats(len(prompts), 0, 0, 0, 0, 0)
    while waiting or remaining:
        # admit in arrival order while the next prompt fits, leaving a block of headroom per
        # running request (a watermark, as vLLM keeps, so admission rarely forces preemption)
        while (waiting and len(remaining) < max_running and alloc.can_allocate(prompts[waiting[0]])
               and alloc.num_free_blocks - alloc.blocks_needed(len(prompts[waiting[0]])) >= len(remaining)):
            r = waiting.pop(0)
            alloc.allocate_sequence(r, prompts[r])
            stats.prompt_tokens += len(prompts[r])
            stats.cached_tokens += alloc.num_cached_tokens(r)
            remaining[r] = output_lens[r]
        if not remaining:
            raise RuntimeError("no request can be admitted: the pool is too small for the next prompt")
        stats.peak_running = max(stats.peak_running, len(remaining))
        for r in list(remaining):                       # one decode step: each request grows a token
            if r not in remaining:                      # preempted earlier in this step
                continue
            remaining[r] -= 1
            if remaining[r] == 0:
                alloc.free_sequence(r)                   # finished: its blocks are free at once
                del remaining[r]
                continue
            while not alloc.can_append(r):               # out of blocks: preempt the newest request
                victim = list(remaining)[-1]
                alloc.free_sequence(victim)
                del remaining[victim]
                waiting.insert(0, victim)                # it starts over later (recompute)
                stats.preemptions += 1
                if victim == r:
                    break
            if r in remaining:
                alloc.append_token(r, 0)
        stats.steps += 1
        stats.used_blocks.append(alloc.num_used_blocks)
        stats.running.append(len(remaining))
        stats.peak_blocks = max(stats.peak_blocks, alloc.num_used_blocks)
    return stats


def contiguous_capacity(num_blocks: int, block_size: int, max_seq_len: int) -> int:
    """Requests that fit when each reserves max_seq_len slots up front, whatever it uses."""
    return (num_blocks * block_size) // max_seq_len
