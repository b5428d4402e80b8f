"""The engine under hostile input (issue 19): a value that is accepted must be runnable, a request
that fails inside a step fails alone, two callers sharing an engine lose nothing, and settings that
cannot work are refused at start-up with the numbers and the setting's name.

Each test here failed on the engine before issue 19 (top_k = 2**63 or a 64-bit seed + 1 overflowed
inside step() and took the batch with it; generate() with another request pending raised KeyError;
changed SamplingParams were not re-checked; LLM(num_kv_blocks=1) cut max_model_len silently).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvlab import LLM, SamplingParams
from kvlab.engine import EngineArgs, LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def drain(engine: LLMEngine) -> dict:
    """Step until every request is done; the final output of each."""
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return done


def assert_clean(engine: LLMEngine):
    assert not engine.has_unfinished_requests() and not engine.unfinished_request_ids()
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks and not engine.runner.batch.row_of


@pytest.fixture
def engine(tiny_llama):
    return LLMEngine(EngineArgs(model=tiny_llama, block_size=4))


def alone(lm, prompt, params=GREEDY) -> list[int]:
    return LLM(model=lm).generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


# ---------------------------------------------------------------- what crashed the server

@pytest.mark.parametrize("field,value,words", [
    ("top_k", 2**63, "top_k must be an integer in 1..2,147,483,647"), ("top_k", 2**64, "top_k must be"),
    ("seed", 2**64, "seed must be None or an integer in 0..2**64 - 1"), ("seed", -1, "seed must be"),
    ("logprobs", 10**6, "logprobs must be None or an integer in 0..20"), ("logprobs", 49153, "logprobs must be"),
    ("n", 10**9, "n must be an integer in 1..1024"), ("max_tokens", 2**64, "max_tokens must be"),
])
def test_values_the_engine_cannot_run_are_refused_when_the_params_are_made(field, value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        SamplingParams(**{field: value})


def test_the_largest_accepted_values_run(tiny_llama, engine):
    """A 64-bit seed with n = 2 (sample 1 uses (seed + 1) mod 2**64), top_k up to the vocabulary and
    20 logprobs all run to the end; top_k or a stop token past the vocabulary is refused when added."""
    vocab = engine.model.spec.vocab_size
    engine.add_request("seed", [5, 6], SamplingParams(n=2, temperature=1, seed=2**64 - 1, max_tokens=4))
    engine.add_request("topk", [5, 6], SamplingParams(temperature=1, top_k=vocab, max_tokens=4, logprobs=20))
    for params, words in [(SamplingParams(top_k=vocab + 1), "top_k must be at most the vocabulary size"),
                          (SamplingParams(stop_token_ids=[10**9]), "could never be sampled")]:
        with pytest.raises(ValueError, match=words):
            engine.add_request("bad", [5, 6], params)
    done = drain(engine)
    assert [len(c.token_ids) for c in done["seed"].outputs] == [4, 4]
    assert all(len(lp) >= 20 for lp in done["topk"].outputs[0].logprobs)
    assert_clean(engine)


def test_a_request_that_fails_inside_a_step_fails_alone(tiny_llama, engine):
    """The runner cannot build one request's sampler state (simulated: its generator raises): that
    request ends with finish_reason "error" and the message; the others in the same step finish
    with the tokens they get alone; nothing leaks."""
    real = engine.runner.batch.make_generator

    def make_generator(params, index):
        if params.seed == 13:
            raise RuntimeError("simulated failure")
        return real(params, index)

    engine.runner.batch.make_generator = make_generator
    engine.add_request("ok1", [5, 6, 7], GREEDY)
    engine.add_request("bad", [5, 6, 7], SamplingParams(temperature=1, seed=13, max_tokens=5))
    engine.add_request("ok2", [8, 9], GREEDY)
    done = drain(engine)
    assert done["bad"].outputs[0].finish_reason == "error" and "simulated failure" in done["bad"].outputs[0].stop_reason
    assert done["ok1"].outputs[0].token_ids == alone(tiny_llama, [5, 6, 7])
    assert done["ok2"].outputs[0].token_ids == alone(tiny_llama, [8, 9])
    assert_clean(engine)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_step_that_raises_ends_its_requests_and_the_engine_goes_on(tiny_llama, async_scheduling):
    engine = LLMEngine(EngineArgs(model=tiny_llama, block_size=4, async_scheduling=async_scheduling))
    real, calls = engine.runner._run_model, []

    def run_model(step, timing):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated device error")
        return real(step, timing)

    engine.runner._run_model = run_model
    engine.add_request("a", [5, 6, 7], GREEDY)
    engine.add_request("b", [8, 9], GREEDY)
    first = drain(engine)
    assert {o.outputs[0].finish_reason for o in first.values()} == {"error"}
    assert "simulated device error" in first["a"].outputs[0].stop_reason
    engine.add_request("c", [5, 6, 7], GREEDY)
    assert drain(engine)["c"].outputs[0].token_ids == alone(tiny_llama, [5, 6, 7])
    assert_clean(engine)


# ---------------------------------------------------------------- two callers, one engine

def test_generate_with_another_request_pending_keeps_its_output_for_its_owner(tiny_llama):
    llm = LLM(model=tiny_llama)
    llm.engine.add_request("mine", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    outs = llm.generate([[8, 9]], GREEDY, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone(tiny_llama, [8, 9])
    kept = drain(llm.engine)                          # the owner steps the engine: its output is there
    assert kept["mine"].outputs[0].token_ids == alone(tiny_llama, [5, 6, 7],
                                                      SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert_clean(llm.engine)


def test_a_request_added_while_streaming_is_kept_for_its_owner(tiny_llama):
    llm = LLM(model=tiny_llama)
    pieces = []
    for i, out in enumerate(llm.stream([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))):
        pieces += out.outputs[0].token_ids
        if i == 1:
            llm.engine.add_request("side", [8, 9], GREEDY)
    assert pieces == alone(tiny_llama, [5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert drain(llm.engine)["side"].outputs[0].token_ids == alone(tiny_llama, [8, 9])
    assert_clean(llm.engine)


def test_generate_does_not_take_an_id_someone_else_chose(tiny_llama):
    llm = LLM(model=tiny_llama)
    llm.engine.add_request("0", [5, 6], GREEDY)
    assert len(llm.generate([[8, 9]], GREEDY, use_tqdm=False)) == 1
    assert "0" in drain(llm.engine)


@pytest.mark.parametrize("change,words", [
    (dict(max_tokens=-1), "max_tokens must be"), (dict(temperature=float("nan")), "temperature must be"),
    (dict(n=0), "n must be"), (dict(stop=5), "stop must be"), (dict(top_k=2**63), "top_k must be"),
])
def test_params_changed_after_they_were_made_are_checked_again(engine, change, words):
    params = SamplingParams(temperature=0, max_tokens=4)
    for field, value in change.items():
        setattr(params, field, value)
    with pytest.raises((ValueError, TypeError), match=words):
        engine.add_request("r", [5, 6], params)
    assert not engine.has_unfinished_requests()


def test_params_changed_after_the_request_was_added_change_nothing(tiny_llama, engine):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("r", [5, 6], params)
    params.max_tokens = 1
    assert len(drain(engine)["r"].outputs[0].token_ids) == 4


@pytest.mark.parametrize("arrival,error", [("x", TypeError), (math.nan, ValueError), (-1e300, ValueError),
                                           (1e300, ValueError), (True, TypeError)])
def test_arrival_time_must_be_a_past_perf_counter_reading(engine, arrival, error):
    with pytest.raises(error, match="arrival_time must be None or a time.perf_counter"):
        engine.add_request("r", [5, 6], GREEDY, arrival_time=arrival)


# ---------------------------------------------------------------- clear messages for raw input

@pytest.mark.parametrize("call,error,words", [
    (lambda llm: llm.generate(None), TypeError, "prompts must be a str, a list of token ids"),
    (lambda llm: llm.generate(5), TypeError, "prompts must be .*got int 5"),
    (lambda llm: list(llm.stream(None)), TypeError, "prompts must be"),
    (lambda llm: llm.generate({"prompt_token_ids": 5}), TypeError, "'prompt_token_ids' must be a list of token ids"),
    (lambda llm: llm.generate({"prompt": 5}), TypeError, "'prompt' must be a str"),
    (lambda llm: llm.generate("a", {"temperature": 0}), TypeError, "sampling_params must be .*got dict"),
    (lambda llm: llm.generate([[5, True]]), TypeError, "token ids must be integers, got the bool True"),
    (lambda llm: llm.generate("a\ud800b"), ValueError, "not valid Unicode text: character 1"),
    (lambda llm: llm.engine.abort_request(5), TypeError, "request_id must be a str or a list of str, got int 5"),
    (lambda llm: llm.engine.abort_request(None), TypeError, "request_id must be a str or a list of str, got None"),
    (lambda llm: llm.engine.add_request(5, [1]), TypeError, "request_id must be a str, got int 5"),
    (lambda llm: SamplingParams(stop=0), TypeError, "stop must be None, a string or a list of strings, got int 0"),
    (lambda llm: SamplingParams(stop=False), TypeError, "stop must be .*got the bool False"),
    (lambda llm: SamplingParams(stop={" Paris": 1}), TypeError, "stop must be .*got dict"),
    (lambda llm: SamplingParams(stop_token_ids=5), TypeError, "stop_token_ids must be None or a list of token ids"),
    (lambda llm: SamplingParams(ignore_eos=1), TypeError, "ignore_eos must be True or False, got int 1"),
    (lambda llm: LLMEngine({"model": "x"}), TypeError, "LLMEngine takes a kvlab.EngineArgs, got dict"),
    (lambda llm: LLMEngine(None), TypeError, "LLMEngine takes a kvlab.EngineArgs, got None"),
])
def test_raw_input_gets_a_message_that_says_what_is_allowed(tiny_llama, call, error, words):
    llm = LLM(model=tiny_llama)
    with pytest.raises(error, match=words):
        call(llm)
    assert not llm.engine.has_unfinished_requests()


def test_numpy_input_is_taken_as_numbers(tiny_llama):
    llm = LLM(model=tiny_llama)
    ids = np.array([5, 6, 7])
    want = alone(tiny_llama, [5, 6, 7])
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=np.bool_(True), stop_token_ids=np.array([3]))
    assert llm.generate(ids, params, use_tqdm=False)[0].outputs[0].token_ids == want          # one prompt
    assert llm.generate(np.stack([ids, ids]), params, use_tqdm=False)[1].outputs[0].token_ids == want
    assert llm.generate([[np.int64(5), np.int64(6), np.int64(7)]], params, use_tqdm=False)[0].outputs[0].token_ids \
        == want
    llm.engine.add_request("ab", [5], GREEDY)
    llm.engine.abort_request(["ab", "ab"])           # the same id twice: aborted once, no error
    assert not llm.engine.has_request("ab")


# ---------------------------------------------------------------- settings that cannot work

def test_a_pool_smaller_than_max_model_len(tiny_llama, caplog):
    """The model's maximum is lowered to what the pool holds, and the engine says so; a max_model_len
    the user set is refused with the numbers."""
    with caplog.at_level(logging.WARNING, logger="kvlab.engine"):
        llm = LLM(model=tiny_llama, num_kv_blocks=1)
    assert llm.engine.max_model_len == 16 and "max_model_len is lowered to 16" in caplog.text
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 13 and out[0].outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match=r"max_model_len=64 does not fit: the KV pool holds 1 block x 16 tokens"):
        LLM(model=tiny_llama, num_kv_blocks=1, max_model_len=64)


@pytest.mark.parametrize("kwargs,words", [
    (dict(num_kv_blocks=10**12), r"num_kv_blocks=1,000,000,000,000 asks for a KV pool of .* is free"),
    (dict(kv_cache_memory_bytes=10**15), r"kv_cache_memory_bytes=1,000,000,000,000,000 asks for a KV pool"),
    (dict(kv_cache_memory_bytes=100), "kv_cache_memory_bytes=100 is less than one KV block"),
    (dict(block_size=10**6), r"block_size must be an integer in 1..2,048"),
    (dict(max_num_seqs=10**9), r"max_num_seqs must be an integer in 1..65,536"),
    (dict(seed=2**64), r"seed must be an integer in 0..2\*\*64 - 1"),
    (dict(num_kv_blocks=1, block_size=1), r"holds 1 block x 1 tokens = 1 tokens: a sequence needs at least 2"),
])
def test_settings_that_cannot_work_are_refused_before_anything_is_allocated(tiny_llama, kwargs, words):
    with pytest.raises(ValueError, match=words):
        LLM(model=tiny_llama, **kwargs)


def test_bad_engine_arguments_are_refused_before_the_model_loads(monkeypatch):
    from kvlab.model import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for kwargs in (dict(seed=2**64), dict(block_size=0), dict(max_num_seqs=10**9), dict(async_scheduling="yes")):
        with pytest.raises((ValueError, TypeError)):
            LLM(model="smollm2-135m", **kwargs)


# ---------------------------------------------------------------- random input (hypothesis)

numbers = st.one_of(st.integers(-2**65, 2**65), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.none(), st.text(max_size=3), st.integers(0, 60).map(np.int64), st.just([1, 2]))


def mostly(valid):
    """Most draws from the valid values, the rest anything (so that many examples get far)."""
    return st.one_of(*[valid] * 9, numbers)


def sampling_fields(draw=mostly):
    return st.fixed_dictionaries({}, optional={
        "n": draw(st.integers(1, 3)), "temperature": draw(st.floats(0, 2)), "top_p": draw(st.floats(0.01, 1)),
        "top_k": draw(st.integers(-1, 60_000)), "seed": draw(st.integers(0, 2**64 - 1)),
        "max_tokens": draw(st.integers(1, 6)), "logprobs": draw(st.integers(0, 20)),
        "stop": draw(st.lists(st.text(min_size=1, max_size=3), max_size=2)),
        "stop_token_ids": draw(st.lists(st.integers(0, 60_000), max_size=3)), "ignore_eos": draw(st.booleans())})


def accepted(call):
    """call(), or None if it raised a ValueError / TypeError with a message (any other exception fails)."""
    try:
        result = call()
    except (ValueError, TypeError) as err:
        assert str(err).strip()
        event(f"refused: {type(err).__name__}")      # --hypothesis-show-statistics: how often each outcome came
        return None
    event("accepted")
    return result


prompts = st.one_of(st.lists(st.integers(-2, 50_000), max_size=6), st.just({"prompt_token_ids": [1, 2]}))


@settings(max_examples=120, **SETTINGS)
@given(fields=st.one_of(sampling_fields(), sampling_fields(draw=lambda valid: valid)), prompt=mostly(prompts),
       arrival=st.one_of(st.none(), st.none(), numbers))
def test_any_request_is_refused_clearly_or_runs_to_the_end(engine, fields, prompt, arrival):
    """SamplingParams(**random) and add_request(random prompt, params, arrival time): a ValueError or
    TypeError with a message, or a request that runs to completion, with every block free after.
    Half the examples draw every field from its valid range, so that many of them run."""
    params = accepted(lambda: SamplingParams(**fields))
    if params is None:
        return
    params = dataclasses.replace(params, max_tokens=min(params.max_tokens or 4, 4))
    if accepted(lambda: engine.add_request("r", prompt, params, arrival_time=arrival)) is None \
            and not engine.has_request("r"):
        assert_clean(engine)
        return
    done = drain(engine)
    assert done["r"].finished and all(c.finish_reason in ("stop", "length") for c in done["r"].outputs)
    assert_clean(engine)


def engine_fields(draw=mostly):
    return st.fixed_dictionaries({}, optional={
        "block_size": draw(st.sampled_from([1, 4, 16, 64])), "num_kv_blocks": draw(st.integers(1, 256)),
        "max_num_seqs": draw(st.integers(1, 8)), "max_num_batched_tokens": draw(st.integers(8, 512)),
        "max_model_len": draw(st.integers(2, 1024)), "watermark": draw(st.floats(0, 0.5)),
        "seed": draw(st.integers(0, 2**64 - 1)), "async_scheduling": draw(st.booleans()),
        "enable_prefix_caching": draw(st.booleans()), "enable_chunked_prefill": draw(st.booleans()),
        "attention_backend": draw(st.sampled_from(["auto", "torch", "cuda"]))})


@settings(max_examples=60, **SETTINGS)
@given(kwargs=st.one_of(engine_fields(), engine_fields(draw=lambda valid: valid)))
def test_any_engine_arguments_are_refused_clearly_or_serve(tiny_llama, kwargs):
    llm = accepted(lambda: LLM(model=tiny_llama, **kwargs))
    if llm is None:
        return
    out = llm.generate([[5]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)   # fits any engine
    assert out[0].finished and 1 <= len(out[0].outputs[0].token_ids) <= 3
    assert_clean(llm.engine)
    torch.manual_seed(0)
