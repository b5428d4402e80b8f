"""Solutions to chapter 07's exercises (notebooks/exercises/07_continuous_batching.ipynb)."""

from __future__ import annotations

import heapq

from kvlab.exercises.scheduler_adapter import StepPlan


def static_steps(output_lens: list[int], batch_size: int) -> int:
    """Steps to serve the requests in batches of batch_size, each batch running until its longest is done."""
    return sum(max(output_lens[i:i + batch_size]) for i in range(0, len(output_lens), batch_size))


def continuous_steps(output_lens: list[int], max_running: int) -> int:
    """Steps when a finished request's row is taken by the next in the queue at the very next step."""
    rows = [0] * min(max_running, len(output_lens))          # the step at which each row is free again
    heapq.heapify(rows)
    for n in output_lens:                                     # first come, first served: the earliest free row
        heapq.heappush(rows, heapq.heappop(rows) + n)         # n steps: its prefill samples the first token
    return max(rows)


def schedule_step(running, waiting, free_blocks, limits) -> StepPlan:
    """One step of kvlab's scheduler: decodes first, then prompt chunks, then admissions."""
    bs, budget = limits.block_size, limits.token_budget
    blocks = lambda n: -(-n // bs)
    running, waiting = list(running), list(waiting)
    plan = StepPlan()

    # 1. decodes, oldest first; when a decode needs a block and none is free, preempt the newest
    for seq in list(running):
        if seq not in running or seq.num_slots > seq.num_computed:
            continue                                          # preempted in this step, or still prefilling
        if budget == 0:
            break
        needs_block = seq.num_slots % bs == 0                 # its last block is full
        while needs_block and free_blocks == 0:
            victim = running.pop()                            # the newest running sequence
            free_blocks += blocks(victim.num_slots)
            plan.preempted.append(victim.request_id)
            if victim is seq:
                break
        if seq not in running:
            continue
        free_blocks -= needs_block
        plan.scheduled[seq.request_id] = 1
        budget -= 1

    # 2. prompt chunks of sequences admitted in earlier steps
    for seq in running:
        if budget == 0:
            break
        left = seq.num_slots - seq.num_computed
        if left > 0 and seq.request_id not in plan.scheduled:
            plan.scheduled[seq.request_id] = min(left, budget)
            budget -= plan.scheduled[seq.request_id]

    # 3. admissions, first come first served, only in a step that preempted nobody
    while not plan.preempted and waiting and budget > 0:
        head = waiting[0]
        if len(running) + 1 > limits.max_running:
            break
        if blocks(head.num_tokens) > free_blocks - (limits.watermark_blocks if running else 0):
            break
        waiting.pop(0)
        free_blocks -= blocks(head.num_tokens)
        running.append(head)
        plan.scheduled[head.request_id] = min(head.num_tokens, budget)    # a long prompt: its first chunk
        budget -= plan.scheduled[head.request_id]
    return plan
