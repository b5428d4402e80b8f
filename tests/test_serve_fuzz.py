"""A fuzz test of kvlab serve's HTTP API (issue 19): random bodies, built from OpenAI's request
schema for /v1/completions and /v1/chat/completions, with values out of range and of the wrong
type mixed into valid ones.

Every answer must be 2xx (a whole answer or a complete stream ending in [DONE]) or 4xx with
OpenAI's error body, never 5xx; afterwards the server must still answer /health, give the same
greedy text as the offline engine (kvlab.LLM on the same model) and hold no KV block.

The values a hostile client sends: integers at and past 64 bits (2**63, 2**64), negatives, floats
where integers go, numbers JSON decodes to infinity (1e309; JSON has no NaN), integers of
thousands of digits, strings with lone UTF-16 surrogates, empty strings, nested objects and
lists, unknown fields and OpenAI fields kvlab does not implement. The server is the tiny random
model with --max-model-len 128 and --max-num-seqs 8, so even an accepted request with n=8 and
no max_tokens ends in at most 128 steps; hypothesis stops after MAX_EXAMPLES bodies.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_serve import metrics, wait_for_metrics

from conftest import server_and_offline_answers
from kvlab.engine import SamplingParams

MODEL = "tiny-llama-random"
MAX_MODEL_LEN = 128
MAX_EXAMPLES = 150
BUDGET_S = 90.0                    # past this, the remaining examples are not sent (a loaded machine is slow)
CLIENT = httpx.Timeout(60.0)
GREEDY = {"model": MODEL, "prompt": "The fuzzer has gone home, and", "max_tokens": 24, "temperature": 0,
          "ignore_eos": True}
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def fuzzed():
    """(server, reference): the server under test and the offline engine's answer to GREEDY."""
    params = SamplingParams(temperature=0, max_tokens=GREEDY["max_tokens"], ignore_eos=True)
    with server_and_offline_answers(MODEL, ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8",
                                            "--max-num-batched-tokens", "256"], [GREEDY["prompt"]], params,
                                    **ENGINE) as (server, texts):
        yield server, texts[0]


# ---- bodies -------------------------------------------------------------------------------------------

class Raw(str):
    """A JSON literal sent as written ("1e309"), which json.dumps could not produce."""


def encode(body) -> str:
    """JSON text of `body`, with every Raw value written as its literal."""
    raws: list[Raw] = []

    def mark(value):
        if isinstance(value, Raw):
            raws.append(value)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {mark(k): mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(body))                      # ensure_ascii: a lone surrogate becomes \udXXX
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw)
    return text


HUGE = [2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -2**63, -2**64, 0]
huge_ints = st.one_of(st.sampled_from(HUGE), st.integers(-2**70, 2**70))
raw_numbers = st.sampled_from([Raw("1e309"), Raw("-1e309"), Raw("1e-400"), Raw("-0"), Raw("1E400"),
                               Raw("18446744073709551616"), Raw("9" * 5000), Raw("0.5e1")])
floats = st.floats(allow_nan=False, allow_infinity=False)
odd_strings = st.sampled_from(["", " ", "a\ud800b", "\udfff", "\ud83d\ude00", "\x00", "é😀", "null", "1", "\n",
                               "<|im_end|>", "x" * 3000])
strings = st.one_of(st.text(max_size=20), odd_strings)
scalars = st.one_of(st.none(), st.booleans(), huge_ints, floats, raw_numbers, strings)
nested = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(strings, inner, max_size=3)), max_leaves=6)
hostile = st.one_of(scalars, nested)


# Plausible values of every field; a body is made of these, then a few of its fields are spoiled.
VALID = {
    "max_tokens": st.one_of(st.none(), st.integers(1, 40)),
    "temperature": st.one_of(st.just(0), st.floats(0, 2)),
    "top_p": st.floats(0.01, 1),
    "top_k": st.sampled_from([-1, 0, 1, 5, 49151, 49152]),
    "n": st.integers(1, 3),
    "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    "stop": st.one_of(st.none(), st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3),
                                                                           max_size=3)),
    "stream": st.booleans(),
    "user": st.text(max_size=5),
    "ignore_eos": st.booleans(),
    "return_token_ids": st.booleans(),
    "logprobs": st.none(),                           # OpenAI fields kvlab does not implement: neutral values pass
    "presence_penalty": st.just(0),
    "best_of": st.just(1),
}
OTHER_FIELDS = ["stream_options", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "max_token", "prompt ",
                "\ud800", ""]
SPOILS = st.sampled_from([0, 0, 1, 1, 1, 2, 5])  # fields spoiled per body (0: a valid body)

prompts = st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 49151), min_size=1, max_size=20))
bad_prompts = st.one_of(st.lists(huge_ints, min_size=1, max_size=3), st.just([]), st.just([[1, 2], [3]]),
                        st.just("hello " * 300), st.lists(st.integers(0, 49151), min_size=200, max_size=200), hostile)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                           "content": st.one_of(st.text(max_size=30), st.lists(st.fixed_dictionaries(
                                               {"type": st.just("text"), "text": st.text(max_size=10)}),
                                               min_size=1, max_size=2))}), min_size=1, max_size=3)
bad_message = st.one_of(
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["tool", "robot", ""]), hostile), "content": strings}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(odd_strings, hostile, st.just(
        [{"type": "image_url", "image_url": "x"}]))}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.just("hi"), "tool_calls": st.just([])}), hostile)
bad_messages = st.one_of(st.just([]), hostile, st.lists(bad_message, min_size=1, max_size=2),
                         messages.flatmap(lambda ms: bad_message.map(lambda m: ms + [m])))


@st.composite
def bodies(draw, required: dict, bad_required: dict, extra: dict):
    """A valid body of one endpoint, then SPOILS of its fields replaced by hostile values, left out, or
    added (fields OpenAI does not define, or kvlab does not implement)."""
    body = draw(st.fixed_dictionaries({"model": st.just(MODEL), **required}, optional={**VALID, **extra}))
    names = ["model", *required, *VALID, *extra, *OTHER_FIELDS]
    for _ in range(draw(SPOILS)):
        name = draw(st.sampled_from(names))
        if draw(st.integers(0, 5)) == 0:
            body.pop(name, None)
        elif name in bad_required:
            body[name] = draw(bad_required[name])
        elif name == "model":
            body[name] = draw(st.one_of(st.sampled_from(["gpt-4", "", MODEL.upper()]), hostile))
        else:
            body[name] = draw(hostile)
    return body


requests = st.one_of(
    st.tuples(st.just("/v1/completions"), bodies({"prompt": prompts}, {"prompt": bad_prompts}, {})),
    st.tuples(st.just("/v1/chat/completions"),
              bodies({"messages": messages}, {"messages": bad_messages}, {"max_completion_tokens": st.integers(1, 40)})),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
              st.one_of(hostile, st.sampled_from([Raw('{"model": '), Raw("[" * 5000 + "]" * 5000), Raw("{}" * 3),
                                                  Raw('{"model": "%s", "prompt": "x", "n": 2} garbage' % MODEL)]))),
)


# ---- answers ------------------------------------------------------------------------------------------

def check_error(r) -> None:
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip()
    assert error["type"] == "invalid_request_error" and (error["param"] is None or isinstance(error["param"], str))


def check_answer(r, body: dict, path: str) -> None:
    """A 200: a whole answer with n choices, or a stream of chunks ending in [DONE] that ends every choice."""
    n = body.get("n") or 1
    if r.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in r.text.split("\n\n") if line]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        finished = set()
        for line in lines[:-1]:
            assert line.startswith("data: ")
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                if c["finish_reason"] is not None:
                    finished.add(c["index"])
        assert finished == set(range(n)), (finished, n)
        return
    answer = r.json()
    assert [c["index"] for c in answer["choices"]] == list(range(n))
    assert all(c["finish_reason"] in ("stop", "length") for c in answer["choices"])
    assert answer["usage"]["completion_tokens"] <= n * MAX_MODEL_LEN


def test_random_bodies_get_2xx_or_4xx_and_leave_the_server_serving_with_every_block_free(fuzzed):
    server, reference = fuzzed
    statuses: Counter = Counter()
    client = httpx.Client(timeout=CLIENT)
    t0 = time.monotonic()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(request=requests)
    @example(request=("/v1/completions", {"model": MODEL, "prompt": "Hi", "top_k": 2**64, "temperature": 1}))
    @example(request=("/v1/completions", {"model": MODEL, "prompt": "Hi", "top_k": 2**63, "temperature": 1}))
    @example(request=("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                               "top_k": 2**63, "temperature": 1}))
    @example(request=("/v1/completions", {"model": MODEL, "prompt": "Hi", "seed": 2**64 - 1, "n": 2, "temperature": 1}))
    @example(request=("/v1/completions", {"model": MODEL, "prompt": "Hi", "seed": 2**64}))
    @example(request=("/v1/completions", {"model": MODEL, "prompt": "Hi", "logprobs": 10**6}))
    @example(request=("/v1/completions", Raw("[" * 100_000 + "]" * 100_000)))
    @example(request=("/v1/completions", {"model": MODEL, "prompt": "a\ud800b"}))
    def one(request):      # the examples: what crashed the engine core or answered 500 in issue 19
        if time.monotonic() - t0 > BUDGET_S:
            statuses["not sent: over the time budget"] += 1
            return
        path, body = request
        r = client.post(server.url + path, content=encode(body), headers={"content-type": "application/json"})
        statuses[r.status_code] += 1
        event(f"HTTP {r.status_code}")
        assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (path, encode(body)[:300], r.text[:500])
        assert server.process.poll() is None, f"the server exited after {encode(body)[:300]}"
        if r.status_code >= 400:
            check_error(r)
        else:
            check_answer(r, body, path)

    try:
        one()
    finally:
        client.close()
    seconds = time.monotonic() - t0
    print(f"fuzz: {sum(statuses.values())} bodies in {seconds:.0f} s: {dict(statuses)}")
    assert statuses[200] >= 10 and sum(v for k, v in statuses.items() if k != 200) >= 50    # both kinds tried

    assert server.is_healthy()
    r = httpx.post(server.url + "/v1/completions", json=GREEDY, timeout=CLIENT)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference
    after = wait_for_metrics(server, lambda m: m["kvlab:kv_cache_used_blocks"] == 0)
    assert after["kvlab:kv_cache_used_blocks"] == 0 and after["kvlab:num_requests_running"] == 0
    assert after["kvlab:num_requests_waiting"] == 0
    assert metrics(server)["kvlab:kv_cache_total_blocks"] > 0
