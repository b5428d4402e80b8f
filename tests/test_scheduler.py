"""The engine's scheduler with no model (kvlab.engine.replay): worked examples, and the fast
fragmentation simulator held to the same rules on random traces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvlab import workloads
from kvlab.engine.replay import replay
from kvlab.fragmentation import simulate_allocation, simulate_allocation_reference


def test_replay_matches_brute_force_lengths():
    """A pool large enough for everything: blocks in use at step s are sum(ceil(len / bs)) over the
    requests still running, a request holding prompt + s tokens at step s (the token it samples in
    step s gets its slot in step s + 1), computed here from lengths alone."""
    prompts, outs, bs = [[1] * 5, [2] * 9, [3] * 2], [3, 1, 4], 4
    stats = replay(prompts, outs, num_blocks=64, block_size=bs)
    expected = [sum(-(-(len(p) + s) // bs) for p, o in zip(prompts, outs) if s < o) for s in range(max(outs))]
    assert stats.used_blocks == expected
    assert (stats.steps, stats.peak_running, stats.preemptions, stats.prompt_tokens) == (4, 3, 0, 16)
    assert stats.finish_step == [2, 0, 3] and stats.admit_step == [0, 0, 0]


def test_replay_preempts_the_newest_and_recomputes_it_with_its_generated_tokens():
    """Worked by hand. Pool of 3 blocks of 2 (watermark int(0.01 * 3) = 0). Request 0: prompt 2,
    5 tokens to generate; request 1: prompt 2, 3 tokens.
      step 0: admit both (1 block each: 2 used); each prefills its prompt, samples token 1
      step 1: 0 writes token 1 at position 2: a new block (3 used); 1 needs one too, none is free:
              preempt the newest running, 1 itself (1 block freed, 2 used); nobody is admitted
              in a step that preempted. 0 samples token 2
      step 2: 0 writes position 3 (same block); 1 needs 2 blocks for prompt + token 1, 1 is free:
              it waits. 0 samples token 3
      step 3: 0 writes position 4: a new block (3 used). 0 samples token 4
      step 4: 0 writes position 5, samples token 5 and finishes (its 3 blocks free after the step)
      step 5: 1 is re-admitted with its 3 tokens (2 blocks), all recomputed; samples token 2
      step 6: 1 writes position 3, samples token 3 and finishes."""
    stats = replay([[1] * 2, [2] * 2], [5, 3], num_blocks=3, block_size=2)
    assert (stats.steps, stats.preemptions) == (7, 1)
    assert stats.used_blocks == [2, 2, 2, 3, 3, 2, 2] and stats.running == [2, 1, 1, 1, 1, 1, 1]
    assert (stats.prompt_tokens, stats.recomputed_tokens) == (2 + 2 + 3, 3)
    assert stats.admit_step == [0, 0] and stats.finish_step == [4, 6]


def test_replay_admission_keeps_the_watermark_free_while_anything_runs():
    """Pool of 4 blocks of 2, three requests of prompt 4 (2 blocks), 1 token each. Watermark 0: two
    fit at once (2 + 2 blocks), two steps. Watermark 0.25 (1 block): the second would leave 0 < 1
    free while the first runs, so they run one at a time, three steps; an empty pool ignores it."""
    trace = ([[1] * 4] * 3, [1] * 3)
    assert [(s.steps, s.peak_running) for s in (replay(*trace, num_blocks=4, block_size=2, watermark=w)
                                                for w in (0.0, 0.25))] == [(2, 2), (3, 1)]


def test_replay_prefix_cache_hits_on_a_shared_prefix_once_it_is_computed():
    """Five prompts share 4 full blocks. All admitted in the same step, none can hit: the blocks are
    registered only after the step that computes them. Arriving one step apart, the later four hit."""
    shared = list(range(100, 116))                       # 4 full blocks of 4
    prompts = [shared + [i] for i in range(5)]
    together = replay(prompts, [2] * 5, num_blocks=64, block_size=4, enable_prefix_caching=True)
    assert together.cached_tokens == 0
    apart = replay(prompts, [2] * 5, num_blocks=64, block_size=4, enable_prefix_caching=True,
                   arrival_steps=[0, 1, 2, 3, 4])
    assert apart.cached_tokens == 4 * 16 and apart.hit_rate == 64 / 85


def test_chunked_prefill_runs_the_decodes_first_and_never_stalls_them():
    """Budget of 8 tokens per step. A short request (prompt 2) is decoding when a 40-token prompt
    arrives: every step after that still decodes the short one (1 token) and gives the long prompt
    the 7 tokens left, so its prefill takes ceil(40 / 7) = 6 steps while the short one keeps going."""
    stats = replay([[1] * 2, [2] * 40], [12, 2], num_blocks=64, block_size=4, max_num_batched_tokens=8,
                   arrival_steps=[0, 1])
    assert stats.scheduled_tokens[:8] == [2, 8, 8, 8, 8, 8, 1 + 5, 1 + 1]     # 35 prompt tokens, then the last 5
    assert stats.finish_step == [11, 7]          # the short one never paused: 12 tokens in steps 0..11


def test_replay_bad_input():
    with pytest.raises(ValueError, match="one output length per prompt"):
        replay([[1]], [1, 2], num_blocks=4)
    with pytest.raises(ValueError, match="needs more than the 2 blocks"):
        replay([[1] * 40], [1], num_blocks=2, block_size=16)
    with pytest.raises(ValueError, match="output lengths must be >= 1"):
        replay([[1]], [0], num_blocks=4)


def random_trace(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 25))
    block = int(rng.choice([1, 2, 4, 8, 16]))
    prompt, output = rng.integers(1, 60, n), rng.integers(1, 60, n)
    arrival = np.sort(rng.uniform(0, 40, n)) if seed % 2 else np.zeros(n)
    need = max(math.ceil((p + o) / block) for p, o in zip(prompt, output))
    num_blocks = int(rng.integers(need, need * 4 + 2))    # from "one request at a time" to roomy
    return workloads.from_lengths(prompt, output, arrival_time=arrival), block, num_blocks


def test_fragmentation_simulator_follows_the_engines_scheduler():
    """One policy, one place: kvlab.fragmentation's "paged" policy (fast event-driven engine and
    step-by-step reference) against the engine's own Scheduler (replay, no model) on 150 random
    traces: the same admission and finish step for every request, the same number of preemptions.
    The simulator's request holds the slot of the token it is producing; the engine writes a
    token's K/V the step after it samples it, so the engine's prompts are one token longer."""
    preempted = 0
    for seed in range(150):
        wl, block, num_blocks = random_trace(seed)
        engine = replay([[1] * (int(p) + 1) for p in wl.prompt_len], [int(o) for o in wl.output_len],
                        num_blocks=num_blocks, block_size=block,
                        arrival_steps=[int(math.ceil(a)) for a in wl.arrival_time])
        for simulate in (simulate_allocation, simulate_allocation_reference):
            sim = simulate(wl, "paged", capacity_tokens=num_blocks * block, max_seq_len=10**6, block_size=block)
            assert list(sim.admit_step) == engine.admit_step, seed
            assert list(sim.finish_step) == engine.finish_step, seed
            assert sim.num_preemptions == engine.preemptions, seed
        preempted += engine.preemptions > 0
    assert preempted >= 20          # the comparison covered preemption, not only easy traces
