"""Replaying request traces on the block allocator (no model): memory and prefill saved.

A request is a prompt (token ids) and an output length. `replay` steps a decode loop:

  1. admission, first come first served, while the request at the head of the queue fits
     (at most `max_running` at once). Admission is the prefill: the request is allocated
     its prompt, plus the tokens it had generated if it was preempted before (recomputed).
     As in vLLM (and kvlab.fragmentation's paged policy), an admission must leave a
     watermark of 1% of the blocks free while anything runs, so that the newcomer is not
     preempted at once;
  2. every running request produces one token: the one that produces its last token
     finishes and frees its blocks at once (a waiting request can take them next step);
     the others append it, taking a block when their last one is full. When a request needs
     a block and none is free, the newest running request is preempted: its blocks are freed
     and it goes back to the head of the queue keeping its generated tokens, to be prefilled
     again (prompt + generated) when re-admitted. This is vLLM's recompute preemption, the
     rule kvlab.fragmentation simulates too.

It counts what an engine would see: blocks in use per step, tokens prefilled vs those the
prefix cache supplied, how many requests ran at once, preemptions and recomputed tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvlab.paged.block_allocator import BlockAllocator


WATERMARK = 0.01       # share of the blocks admission keeps free while anything runs (vLLM's default)


@dataclass
class TraceStats:
    num_requests: int
    prompt_tokens: int              # tokens admitted to prefill: prompts, plus generated tokens recomputed
    cached_tokens: int              # of those, tokens whose K/V came from the prefix cache
    steps: int                      # decode steps until every request finished
    peak_blocks: int                # most blocks in use at once
    peak_running: int               # most requests running at once
    preemptions: int = 0            # requests sent back to the queue to free blocks
    recomputed_tokens: int = 0      # prompt + generated tokens prefilled again after a preemption
    used_blocks: list[int] = field(default_factory=list)    # blocks in use after each step
    running: list[int] = field(default_factory=list)        # requests still running after each step
    appended: list[int] = field(default_factory=list)       # tokens each request appended while decoding

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def hit_rate(self) -> float:
        """Fraction of prefilled tokens served from the prefix cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def replay(prompts: Sequence[Sequence[int]], output_lens: Sequence[int], num_blocks: int, block_size: int = 16,
           enable_prefix_caching: bool = False, max_running: int | None = None,
           watermark: float = WATERMARK) -> TraceStats:
    """Run the trace through a BlockAllocator, first come first served, with recompute
    preemption of the newest request when the pool runs dry (see the module docstring).
    Generated tokens get token id 0 (they matter only to the prefix cache)."""
    if len(prompts) != len(output_lens):
        raise ValueError(f"need one output length per prompt, got {len(prompts)} prompts and "
                         f"{len(output_lens)} lengths")
    if any(n < 1 for n in output_lens):
        raise ValueError("output lengths must be >= 1")
    if not 0 <= watermark < 1:
        raise ValueError(f"watermark must be a fraction in [0, 1), got {watermark!r}")
    alloc = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
    for p, n in zip(prompts, output_lens):
        if alloc.blocks_needed(len(p) + n) > num_blocks:
            raise ValueError(f"a request of {len(p)} + {n} tokens needs more than the {num_blocks} blocks "
                             f"of the pool")
    max_running = max_running or len(prompts)
    headroom = int(watermark * num_blocks)              # blocks kept free by admission while anything runs
    waiting = list(range(len(prompts)))                 # queue, head first
    running: list[int] = []                             # oldest admission first: the last is preempted first
    generated = [0] * len(prompts)                      # output tokens produced so far (kept across preemption)
    stats = TraceStats(len(prompts), 0, 0, 0, 0, 0, appended=[0] * len(prompts))
    while waiting or running:
        # 1. admit in queue order while the head fits, leaving the watermark free if anything runs
        while waiting and len(running) < max_running:
            r = waiting[0]
            tokens = list(prompts[r]) + [0] * generated[r]            # prompt + generated: recomputed
            if alloc.free_blocks_needed(tokens) > alloc.num_free_blocks - (headroom if running else 0):
                break
            waiting.pop(0)
            alloc.allocate_sequence(r, tokens)
            stats.prompt_tokens += len(tokens)
            stats.cached_tokens += alloc.num_cached_tokens(r)
            if generated[r]:
                stats.recomputed_tokens += len(tokens)
            running.append(r)
        if not running:
            raise RuntimeError("no request can be admitted: the pool is too small for the next prompt")
        stats.peak_running = max(stats.peak_running, len(running))
        # 2. one decode step: each running request produces a token
        for r in list(running):
            if r not in running:                        # preempted earlier in this step
                continue
            generated[r] += 1
            if generated[r] == output_lens[r]:
                alloc.free_sequence(r)                  # finished: its blocks are free at once
                running.remove(r)
                continue
            while not alloc.can_append(r):              # out of blocks: preempt the newest request
                victim = running.pop()
                alloc.free_sequence(victim)
                waiting.insert(0, victim)               # head of the queue, keeps its generated tokens
                stats.preemptions += 1
                if victim == r:
                    break
            if r in running:
                alloc.append_token(r, 0)
                stats.appended[r] += 1
        stats.steps += 1
        stats.used_blocks.append(alloc.num_used_blocks)
        stats.running.append(len(running))
        stats.peak_blocks = max(stats.peak_blocks, alloc.num_used_blocks)
    return stats
