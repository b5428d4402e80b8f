"""Asynchronous scheduling (issue 16): the engine plans step N + 1 while step N runs, and nothing a
caller sees changes. Each test runs the same requests with async_scheduling off and on, on the CPU
(where the code path is the same as on a GPU, only nothing overlaps), and compares exactly.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict

import pytest

from kvlab import LLM, SamplingParams
from kvlab.engine import EngineArgs, LLMEngine, RequestOutputKind


def both(lm, prompts, params, **engine_kwargs):
    """generate() with async scheduling off and on: (outputs, llm) for each."""
    runs = []
    for mode in (False, True):
        llm = LLM(model=lm, async_scheduling=mode, **engine_kwargs)
        runs.append((llm.generate(prompts, params, use_tqdm=False), llm))
    return runs


def completions(outs):
    return [[(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def assert_clean(engine: LLMEngine):
    assert not engine.has_unfinished_requests() and not engine.unfinished_request_ids()
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert engine.scheduler.num_seqs_in_use == 0 and not engine.runner.batch.row_of


def test_the_scheduler_plans_the_next_step_before_this_steps_tokens_reach_the_host(tiny_llama):
    """The overlap itself, from the engine's own timestamps: with async scheduling, the call that
    schedules step k + 1 starts before step k's sampled ids are on the host (the host works while
    the device runs); synchronous, it starts only after them."""
    prompts = [[5 + i, 6, 7, 8] for i in range(4)]
    for mode in (False, True):
        llm = LLM(model=tiny_llama, async_scheduling=mode)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        stats = list(llm.engine.stats)
        assert len(stats) == 6 and all(s.async_scheduling == mode for s in stats)
        for this, nxt in zip(stats, stats[1:]):
            planned, collected = nxt.spans["schedule"][0], this.spans["wait"][1]
            assert (planned < collected) == mode, (mode, this.step)
            assert this.spans["launch"][1] <= this.spans["wait"][0]


def test_stops_equal_the_synchronous_engine_and_no_extra_token_leaks(smollm2):
    """EOS, a stop string, a stop token and max_tokens with async on: every output equals the
    synchronous engine's, cumulative and streamed (DELTA) alike. The step after a stop computes one
    more token for that sequence; it is dropped, never returned."""
    chat = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}],
                                                 add_generation_prompt=True)["input_ids"]
    text = "The factory production line optimization requires"
    ids = smollm2.encode(text)
    prompts = [chat, text, text, ids, text]
    params = [SamplingParams(temperature=0, max_tokens=64),                       # EOS
              SamplingParams(temperature=0, max_tokens=32, stop=["approach"]),     # a stop string
              SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[2424]),  # a stop token: " approach"
              SamplingParams(temperature=0, max_tokens=7),                         # max_tokens
              SamplingParams(temperature=0.8, seed=3, max_tokens=20)]              # seeded sampling
    (sync, _), (async_, llm) = both(smollm2, prompts, params)
    assert completions(async_) == completions(sync)
    reasons = [o.outputs[0].finish_reason for o in sync]
    assert reasons == ["stop", "stop", "stop", "length", "length"] and sync[1].outputs[0].stop_reason == "approach"
    assert len(sync[3].outputs[0].token_ids) == 7
    streamed = {}
    for out in llm.stream(prompts, params):
        for c in out.outputs:
            streamed.setdefault(out.request_id, []).extend(c.token_ids)
    assert list(streamed.values()) == [o.outputs[0].token_ids for o in sync]
    assert_clean(llm.engine)


def test_preemption_chunking_prefix_hits_and_n_samples_with_async_scheduling(tiny_llama):
    """A pool small enough to preempt, chunked prefill, prefix-cache hits, scattered blocks and
    n = 3 seeded samples forked from one prompt: the tokens of every request equal the synchronous
    engine's."""
    rng = random.Random(0)
    shared = [rng.randrange(3, 1000) for _ in range(24)]
    prompts = [shared + [rng.randrange(3, 1000) for _ in range(rng.randint(1, 40))] for _ in range(16)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 14), ignore_eos=True) for _ in prompts]
    params[5] = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=9, ignore_eos=True)
    (sync, llm_sync), (async_, llm_async) = both(tiny_llama, prompts, params, num_kv_blocks=36, block_size=4,
                                                 max_num_batched_tokens=40, max_num_seqs=16, block_order_seed=3)
    assert completions(async_) == completions(sync)
    assert llm_async.engine.scheduler.num_preemptions > 0 and llm_async.engine.scheduler.num_cached_tokens > 0
    assert len({tuple(c.token_ids) for c in async_[5].outputs}) == 3
    assert_clean(llm_async.engine)


def test_abort_while_a_step_is_in_flight(tiny_llama):
    """Under async scheduling a step is always on its way when the caller aborts: the aborted
    request's blocks come back at once, its in-flight token is dropped, the others finish with the
    tokens they get alone."""
    engine = LLMEngine(EngineArgs(model=tiny_llama, async_scheduling=True, block_size=4))
    prompts = {str(i): [10 + i, 20, 30, 40 + i] for i in range(4)}
    for rid, p in prompts.items():
        engine.add_request(rid, p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("2")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["0", "1", "3"]
    alone = LLM(model=tiny_llama).generate([prompts[r] for r in sorted(done)],
                                          SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [done[r].outputs[0].token_ids for r in sorted(done)] == [o.outputs[0].token_ids for o in alone]
    assert_clean(engine)


def test_delta_outputs_under_async_scheduling_add_up_to_the_cumulative_ones(tiny_llama):
    engine = LLMEngine(EngineArgs(model=tiny_llama, async_scheduling=True))
    engine.add_request("d", [7, 8, 9], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                      output_kind=RequestOutputKind.DELTA))
    engine.add_request("c", [7, 8, 9], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == "d":
                deltas += o.outputs[0].token_ids
            elif o.finished:
                final = o.outputs[0].token_ids
    assert deltas == final and len(final) == 12


@pytest.mark.parametrize("mode", [False, True])
def test_stream_interval_reports_the_first_token_then_every_k_with_the_same_text(smollm2, mode):
    """EngineArgs.stream_interval = 4 (kvlab serve --stream-interval): a streamed request reports its
    first token at once, then 4 tokens an output, the rest with its end; tokens and text add up to the
    whole answer, with a stop string and with n = 2 samples too. Fewer outputs, the same answer."""
    text = "The factory production line optimization requires"
    params = [SamplingParams(temperature=0, max_tokens=23, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=32, stop=["approach"]),
              SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=10, ignore_eos=True)]
    whole = LLM(model=smollm2, async_scheduling=mode).generate([text] * 3, params, use_tqdm=False)
    engine = LLMEngine(EngineArgs(model=smollm2, async_scheduling=mode, stream_interval=4))
    for i, p in enumerate(params):
        engine.add_request(str(i), text, dataclasses.replace(p, output_kind=RequestOutputKind.DELTA))
    sizes, texts, ids = defaultdict(list), defaultdict(str), defaultdict(list)
    while engine.has_unfinished_requests():
        for o in engine.step():
            for c in o.outputs:
                key = (o.request_id, c.index)
                sizes[key].append(len(c.token_ids))
                texts[key] += c.text
                ids[key] += c.token_ids
    assert whole[1].outputs[0].finish_reason == "stop" and len(sizes) == 4
    for i, out in enumerate(whole):
        for c in out.outputs:
            key = (str(i), c.index)
            assert (ids[key], texts[key]) == (c.token_ids, c.text)
            assert sizes[key][0] == 1 and set(sizes[key][1:-1]) <= {4} and 1 <= sizes[key][-1] <= 4, sizes[key]
    assert_clean(engine)


def test_a_seeded_sample_draws_the_same_stream_however_often_it_is_preempted(tiny_llama):
    """The runner keeps a preempted sequence's random generator until it comes back: seeded text does
    not depend on the pool size (no preemption, or many)."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(8, 30))] for _ in range(10)]
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=12, ignore_eos=True)
              for i in range(10)]
    roomy = LLM(model=tiny_llama).generate(prompts, params, use_tqdm=False)
    for mode in (False, True):
        tight = LLM(model=tiny_llama, num_kv_blocks=24, block_size=4, async_scheduling=mode)
        outs = tight.generate(prompts, params, use_tqdm=False)
        assert tight.engine.scheduler.num_preemptions > 0
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
        assert_clean(tight.engine)
        assert not tight.engine.runner.batch._kept          # nothing kept for sequences that are gone
