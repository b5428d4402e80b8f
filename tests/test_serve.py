"""`kvlab serve` under real HTTP clients (httpx), on the tiny random model (milliseconds a step).

Each server runs in a child process on a free 127.0.0.1 port (kvlab.serve.ServerProcess)
and is stopped by its fixture. The reference for every answer is the offline engine
(kvlab.LLM) running the same prompt alone, with greedy decoding, in this process; it is
computed while the server loads. Blocks, aborts and batching are read from /metrics with
prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvlab.engine import LLM, SamplingParams
from kvlab.serve import ServerProcess
from conftest import server_and_offline_answers

MODEL = "tiny-llama-random"
KEY = "kvlab-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS = 16
PROMPTS = [f"Client {i} asks: " + "tell me more about the cache " * (i % 7) for i in range(64)]
TIMEOUT = httpx.Timeout(120.0)
ONE_THREAD = ["--torch-threads", "1"]    # the tiny model is fastest on one core; CI has two to share


@pytest.fixture(scope="module")
def served():
    """(server, references): a server with --api-key and room for 64 sequences, and each prompt's
    answer when it runs alone offline (token-for-token what the server must send back)."""
    with server_and_offline_answers(MODEL, ["--api-key", KEY, "--max-num-seqs", "64", "--max-num-batched-tokens",
                                            "512"], PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                                    max_num_seqs=1, max_num_batched_tokens=512) as served:
        yield served


def metrics(server) -> dict[str, float]:
    """/metrics as {sample name (with labels): value}, parsed by prometheus_client."""
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for_metrics(server, condition, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if condition(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


async def until(condition, timeout: float = 60.0) -> None:
    """Wait (yielding to the other tasks) until condition() holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def stream(client, url, body, headers=AUTH, drop_after: int | None = None, drop: asyncio.Event | None = None,
                 started: asyncio.Event | None = None):
    """POST a streaming completion; returns (text, finish_reason, chunks, done). With drop_after (or
    once `drop` is set), the client closes the connection mid-stream (the request still running).
    `started` is set when the first chunk arrives."""
    text, finish, chunks = "", None, 0
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                             headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return text, finish, chunks, True
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            chunks += 1
            if started is not None:
                started.set()
            if (drop_after is not None and chunks >= drop_after) or (drop is not None and drop.is_set()):
                return text, finish, chunks, False      # leaving `async with` closes the connection
    return text, finish, chunks, False


def greedy_body(prompt, max_tokens=MAX_TOKENS, **extra):
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def test_64_concurrent_streams_each_get_their_own_complete_answer(served):
    server, references = served
    before = metrics(server)

    async def main():
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=128)) as client:
            return await asyncio.gather(*(stream(client, server.url, greedy_body(p)) for p in PROMPTS))

    results = asyncio.run(main())
    assert [r[0] for r in results] == references                  # each equal to its prompt run alone
    assert all(r[1] == "length" and r[3] for r in results)
    after = wait_for_metrics(server, lambda m: m["kvlab:kv_cache_used_blocks"] == 0)
    assert after["kvlab:kv_cache_used_blocks"] == 0 and after["kvlab:num_requests_running"] == 0
    assert after["kvlab:num_requests_waiting"] == 0
    assert after['kvlab:request_success_total{finished_reason="length"}'] - \
        before.get('kvlab:request_success_total{finished_reason="length"}', 0) == 64
    assert after["kvlab:generation_tokens_total"] - before.get("kvlab:generation_tokens_total", 0) == 64 * 16
    # one batch: served one at a time, 64 x 16 tokens would take >= 1024 steps
    steps = after["kvlab:engine_steps_total"] - before["kvlab:engine_steps_total"]
    assert steps < 64 * MAX_TOKENS / 4, steps


def test_clients_that_disconnect_are_aborted_and_free_their_blocks(served):
    server, references = served
    before = metrics(server)
    long = {"model": MODEL, "prompt": "A story that never ends:", "max_tokens": 900, "ignore_eos": True,
            "temperature": 0}

    async def main():
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=64)) as client:
            droppers = [stream(client, server.url, long, drop_after=2) for _ in range(20)]
            keepers = [stream(client, server.url, greedy_body(p)) for p in PROMPTS[:20]]
            return await asyncio.gather(*droppers, *keepers)

    results = asyncio.run(main())
    dropped, kept = results[:20], results[20:]
    assert all(not done and finish is None for _, finish, _, done in dropped)
    assert [r[0] for r in kept] == references[:20] and all(r[3] for r in kept)   # the others unaffected
    after = wait_for_metrics(server, lambda m: m["kvlab:num_requests_aborted_total"]
                             - before["kvlab:num_requests_aborted_total"] == 20
                             and m["kvlab:kv_cache_used_blocks"] == 0)
    assert after["kvlab:num_requests_aborted_total"] - before["kvlab:num_requests_aborted_total"] == 20
    assert after["kvlab:kv_cache_used_blocks"] == 0 and after["kvlab:num_requests_running"] == 0
    # the 20 long requests stopped long before their 900 tokens
    assert after["kvlab:engine_steps_total"] - before["kvlab:engine_steps_total"] < 900


BAD = [  # (what, body as text or JSON, expected status, words in the message)
    ("invalid JSON", '{"model": "tiny-llama-random", "prompt": ', 400, "not valid JSON"),
    ("not an object", "[1, 2, 3]", 400, "JSON object"),
    ("prompt of the wrong type", {"model": MODEL, "prompt": 5}, 400, "'prompt' must be"),
    ("max_tokens of the wrong type", greedy_body("x", max_tokens="ten"), 400, "'max_tokens' must be"),
    ("max_tokens -1", greedy_body("x", max_tokens=-1), 400, "max_tokens must be null or an integer >= 1"),
    ("temperature -1", {**greedy_body("x"), "temperature": -1}, 400, "temperature must be a"),
    ("unknown field", {**greedy_body("x"), "max_token": 3}, 400, "unknown field 'max_token'"),
    ("empty prompt", greedy_body(""), 400, "the prompt is empty"),
    ("token id outside the vocabulary", greedy_body([1, 10**9]), 400, "outside the vocabulary"),
    ("100k-token prompt", greedy_body("hello " * 100_000), 400, "max_model_len is 1024"),
    ("unknown model", {**greedy_body("x"), "model": "gpt-9"}, 404, "'gpt-9' does not exist"),
]


def test_bad_input_gets_4xx_with_a_message_and_running_requests_carry_on(served):
    server, references = served
    before = metrics(server)

    async def main():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            running = asyncio.create_task(stream(client, server.url, greedy_body(PROMPTS[5])))

            async def bad(body):
                content = body if isinstance(body, str) else json.dumps(body)
                return await client.post(server.url + "/v1/completions", content=content,
                                         headers={**AUTH, "content-type": "application/json"})

            answers = await asyncio.gather(*(bad(body) for _, body, _, _ in BAD))
            chat = await client.post(server.url + "/v1/chat/completions", headers=AUTH,
                                     json={"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]})
            nowhere = await client.post(server.url + "/v1/embeddings", headers=AUTH, json={})
            return await running, answers, chat, nowhere

    running, answers, chat, nowhere = asyncio.run(main())
    for (what, _, status, words), r in zip(BAD, answers):
        assert r.status_code == status, (what, r.text)
        error = r.json()["error"]
        assert words in error["message"], (what, error)
        assert error["type"] == "invalid_request_error"
    assert chat.status_code == 400 and "role must be one of" in chat.json()["error"]["message"]
    assert nowhere.status_code == 404 and "error" in nowhere.json()
    assert running[0] == references[5] and running[3]               # the request in flight carried on
    ok = httpx.post(server.url + "/v1/completions", json=greedy_body(PROMPTS[3]), headers=AUTH, timeout=TIMEOUT)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == references[3]   # still serving
    after = wait_for_metrics(server, lambda m: m["kvlab:kv_cache_used_blocks"] == 0)
    assert after["kvlab:kv_cache_used_blocks"] == 0
    rejected = sum(v for k, v in after.items() if k.startswith("kvlab:requests_rejected_total")) - \
        sum(v for k, v in before.items() if k.startswith("kvlab:requests_rejected_total"))
    assert rejected == len(BAD) + 1                                 # every refusal counted (404 route aside)


def test_api_key(served):
    server, references = served
    url = server.url + "/v1/completions"
    body = greedy_body(PROMPTS[1])
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer"}):
        r = httpx.post(url, json=body, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key" and "Authorization: Bearer" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models", timeout=TIMEOUT).status_code == 401
    r = httpx.post(url, json=body, headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == references[1]
    models = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 1024
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200     # open, as in vLLM
    assert httpx.get(server.url + "/metrics", timeout=TIMEOUT).status_code == 200


@pytest.fixture
def small_server():
    """One running sequence at a time, one waiting at most; 60 s for running requests on SIGTERM."""
    with ServerProcess(["--model", MODEL, "--max-num-seqs", "1", "--max-num-batched-tokens", "64",
                        "--max-waiting-requests", "1", "--shutdown-timeout", "60", *ONE_THREAD]) as server:
        yield server


def test_full_queue_gets_503_with_retry_after_and_sigterm_finishes_running_requests(small_server):
    server = small_server
    url = server.url

    async def main():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            long = {"model": MODEL, "prompt": "Go on:", "max_tokens": 900, "ignore_eos": True, "temperature": 0}
            drop = asyncio.Event()
            running = asyncio.create_task(stream(client, url, long, headers={}, drop=drop))
            await until(lambda: metrics(server)["kvlab:num_requests_running"] == 1)
            waiting = asyncio.create_task(stream(client, url, greedy_body("Next:", max_tokens=8), headers={}))
            await until(lambda: metrics(server)["kvlab:num_requests_waiting"] == 1)
            full = await client.post(url + "/v1/completions", json=greedy_body("One more:"))
            drop.set()
            dropped = await running                     # dropping the long one lets the waiting one in
            return full, dropped, await waiting

    full, dropped, waited = asyncio.run(main())
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "queue_full" and "--max-waiting-requests 1" in full.json()["error"]["message"]
    assert not dropped[3] and waited[1] == "length" and waited[3]

    async def shutdown():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            body = greedy_body("Last words:", max_tokens=100, ignore_eos=True)
            started = asyncio.Event()
            in_flight = asyncio.create_task(stream(client, url, body, headers={}, started=started))
            await asyncio.wait_for(started.wait(), 60)
            server.process.send_signal(signal.SIGTERM)
            return await in_flight

    text, finish, chunks, done = asyncio.run(shutdown())
    assert finish == "length" and done and chunks > 1                     # the running request finished after SIGTERM
    assert server.stop(timeout=60) == 0                    # and the server exited cleanly
    assert "kvlab serve: stopped (requests aborted since start: 1)" in server.log()   # only the dropped one
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def interrupt_a_long_stream(server, interrupt):
    """Start a 1,000-token stream, call interrupt() once its first chunk has arrived, and return what
    the stream ended with: stream()'s (text, finish, chunks, done), or the httpx error if the
    connection closed mid-stream."""
    async def main():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            body = {"model": MODEL, "prompt": "Forever:", "max_tokens": 1000, "ignore_eos": True}
            started = asyncio.Event()
            in_flight = asyncio.create_task(stream(client, server.url, body, headers={}, started=started))
            await asyncio.wait_for(started.wait(), 60)
            interrupt()
            try:
                return await in_flight
            except httpx.HTTPError as err:
                return err
    return asyncio.run(main())


def test_sigterm_aborts_what_cannot_finish_in_the_shutdown_timeout():
    with ServerProcess(["--model", MODEL, "--shutdown-timeout", "0", *ONE_THREAD]) as server:
        t0 = time.monotonic()
        cut = interrupt_a_long_stream(server, lambda: server.process.send_signal(signal.SIGTERM))
        assert isinstance(cut, httpx.HTTPError) or not cut[3]
        assert server.stop(timeout=60) == 0
        assert time.monotonic() - t0 < 30
        assert "kvlab serve: stopped (requests aborted since start: 1)" in server.log()


def engine_core_pid(server_pid: int) -> int:
    """The engine core: the server's child started by multiprocessing's spawn (not its resource tracker)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    cores = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(cores) == 1, children
    return cores[0]


def test_a_dead_engine_core_ends_the_streams_and_the_server_exits_with_status_1():
    """The engine core is killed (as the OOM killer would) while a request streams: the stream ends
    with finish_reason "abort" instead of hanging, and the server exits 1 for a supervisor to restart."""
    with ServerProcess(["--model", MODEL, *ONE_THREAD]) as server:
        ended = interrupt_a_long_stream(server, lambda: os.kill(engine_core_pid(server.process.pid), signal.SIGKILL))
        assert not isinstance(ended, httpx.HTTPError), ended
        text, finish, chunks, done = ended
        assert finish == "abort" and done
        server.process.wait(timeout=60)
        assert server.stop() == 1
        assert "stopped because the engine failed: the engine core exited" in server.log()


def test_without_a_tokenizer_the_server_takes_and_returns_token_ids():
    """--skip-tokenizer-init (automatic for a model without tokenizer files, as smollm2-135m-random on
    the GPU machine): token-id prompts only, answers as token ids (return_token_ids), equal offline."""
    prompt = [5, 60, 700, 8000]
    llm = LLM(model=MODEL, skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=64)
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    with ServerProcess(["--model", MODEL, "--skip-tokenizer-init", *ONE_THREAD]) as server:
        assert "no tokenizer: prompts are token ids" in server.log()
        url = server.url + "/v1/completions"
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        done = httpx.post(url, json=body, timeout=TIMEOUT).json()
        assert done["choices"][0]["token_ids"] == ref and done["choices"][0]["text"] == ""
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=TIMEOUT) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ref
        for refused in ({**body, "prompt": "text"}, {**body, "stop": ["x"]}):
            r = httpx.post(url, json=refused, timeout=TIMEOUT)
            assert r.status_code == 400 and ("token ids" in r.json()["error"]["message"]
                                             or "stop strings need a tokenizer" in r.json()["error"]["message"])
        chat = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "without a tokenizer" in chat.json()["error"]["message"]


def test_stream_interval_sends_fewer_larger_events_with_the_same_tokens():
    """--stream-interval 5: the first token alone (TTFT is not delayed), then events of at least 5
    tokens, the rest with the end; the tokens are those of the non-streamed answer, equal offline."""
    prompt = [5, 60, 700, 8000]
    llm = LLM(model=MODEL, skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=64)
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=23, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    with ServerProcess(["--model", MODEL, "--skip-tokenizer-init", "--stream-interval", "5", *ONE_THREAD]) as server:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 23, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    sizes = [len(c["choices"][0]["token_ids"]) for c in chunks]
    assert sizes[0] == 1 and all(k >= 5 for k in sizes[1:-1]) and sum(sizes) == 23 and len(sizes) <= 6
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ref
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("argv, words", [
    (["--port", "70000"], "--port 70000: a port is 0..65535"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be an integer in 1..65,536, got 0"),
    (["--async-scheduling", "--seed", "-1"], "--seed must be an integer in 0..2**64 - 1"),
    (["--max-waiting-requests", "0"], "--max-waiting-requests 0: must be >= 1"),
    (["--torch-threads", "0"], "--torch-threads 0: must be >= 1"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout -1.0: must be >= 0"),
    (["--stream-interval", "0"], "--stream-interval must be an integer in 1..1,048,576, got 0"),
    (["--gpu-memory-utilization", "2"], "--gpu-memory-utilization must be a fraction in (0, 1]"),
])
def test_bad_flags_are_usage_errors_before_anything_loads(argv, words, capsys):
    from kvlab.serve.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and words in capsys.readouterr().err
