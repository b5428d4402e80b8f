"""`kvlab serve` against careless or hostile HTTP clients (issue 19, the server's part).

Each test sends what once answered 500, killed the engine core or held a connection for ever,
while a greedy stream runs beside it; the request must get a 4xx (or a complete answer), the
stream must end equal to the offline engine's text, and afterwards the server must answer
/health with every KV block free. Raw sockets send what no HTTP library would: a body nested
100,000 levels, half a request and then silence (slowloris), HTTP/1.0, a client that leaves
mid-body. The server runs with --request-read-timeout 2, so stalls end within a test's patience.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from test_serve import TIMEOUT, metrics, stream, wait_for_metrics

from conftest import server_and_offline_answers
from kvlab.engine import SamplingParams

MODEL = "tiny-llama-random"
READ_TIMEOUT = 2.0                 # --request-read-timeout of the server under test, seconds
SLACK = 10.0                       # how much later than READ_TIMEOUT a loaded 2-core machine may answer
BESIDE = {"model": MODEL, "prompt": "Meanwhile, a well-behaved client asks:", "max_tokens": 64, "temperature": 0,
          "ignore_eos": True}


@pytest.fixture(scope="module")
def hostile():
    """(server, reference): a server with --request-read-timeout 2 and room for 16 sequences, and
    the offline engine's greedy answer to BESIDE."""
    params = SamplingParams(temperature=0, max_tokens=BESIDE["max_tokens"], ignore_eos=True)
    with server_and_offline_answers(MODEL, ["--request-read-timeout", str(READ_TIMEOUT), "--max-num-seqs", "16"],
                                    [BESIDE["prompt"]], params, max_num_seqs=1, max_num_batched_tokens=512) as (s, t):
        yield s, t[0]


def beside(hostile, *clients):
    """Run a greedy stream and the hostile `clients` (coroutine functions of the client) at once;
    check the stream's text, that the server still serves and that every block came back. Returns
    what the clients returned."""
    server, reference = hostile

    async def main():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            running = asyncio.create_task(stream(client, server.url, BESIDE, headers={}))
            answers = await asyncio.gather(*(c(client) for c in clients))
            return await running, answers

    (text, finish, _, done), answers = asyncio.run(main())
    assert text == reference and finish == "length" and done          # the stream beside carried on
    assert server.process.poll() is None and server.is_healthy()
    after = wait_for_metrics(server, lambda m: m["kvlab:kv_cache_used_blocks"] == 0)
    assert after["kvlab:kv_cache_used_blocks"] == 0 and after["kvlab:num_requests_running"] == 0
    return answers


def post(url: str, body, **headers):
    """A client coroutine: POST body (JSON text as given, or an object to encode) to url."""
    async def send(client):
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return await client.post(url, content=content, headers={"content-type": "application/json", **headers})
    return send


def assert_error(r, status: int, param, *words) -> dict:
    """An OpenAI-style error with this status and param, whose message holds every word."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert all(w in error["message"] for w in words), error
    return error


# ---- raw sockets ------------------------------------------------------------------------------------

def request_bytes(body: bytes, version: str = "1.1", path: str = "/v1/completions", length: int | None = None) -> bytes:
    head = (f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def exchange(port: int, data: bytes, *, drip: bytes = b"", drip_every: float = 0.25,
                   timeout: float = 40.0) -> tuple[bytes, float]:
    """Open a connection, send `data`, then (if given) one byte of `drip` every drip_every seconds,
    and read until the server closes the connection. Returns (what came back, seconds from the
    connection opening to its close); pytest fails if the server keeps it open `timeout` s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()

    async def dripping():
        for i in range(len(drip)):
            await asyncio.sleep(drip_every)
            try:
                writer.write(drip[i:i + 1])
                await writer.drain()
            except OSError:                          # the server hung up: stop
                return

    try:
        writer.write(data)
        await writer.drain()
        dripper = asyncio.create_task(dripping())
        try:
            got = await asyncio.wait_for(reader.read(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"the server kept the connection open for {timeout} s after {data[:60]!r}")
        finally:
            dripper.cancel()
        return got, time.monotonic() - t0
    finally:
        writer.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one raw HTTP/1.x response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def raw_client(port: int, data: bytes, **kw):
    async def send(client):
        return await exchange(port, data, **kw)
    return send


# ---- the tests --------------------------------------------------------------------------------------

def test_a_body_nested_100000_levels_deep_gets_400_not_500(hostile):
    server, _ = hostile
    deep_array = "[" * 100_000 + "]" * 100_000
    deep_object = '{"model": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}"
    answers = beside(hostile, *(post(server.url + "/v1/completions", b) for b in (deep_array, deep_object)),
                     post(server.url + "/v1/chat/completions", deep_array))
    for r in answers:
        assert_error(r, 400, None, "nested too deeply")


def test_a_lone_surrogate_gets_400_not_500(hostile):
    """JSON may escape half a UTF-16 pair ("\\ud800"); the tokenizer then raised TypeError (500)."""
    server, _ = hostile
    url = server.url
    completion = '{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 4}' % MODEL
    chat = '{"model": "%s", "messages": [{"role": "user", "content": "hi \\udfff"}]}' % MODEL
    stop = '{"model": "%s", "prompt": "hi", "stop": ["\\ud83d"]}' % MODEL
    model = '{"model": "x\\udc00", "prompt": "hi"}'
    pair = '{"model": "%s", "prompt": "a\\ud83d\\ude00b", "max_tokens": 2}' % MODEL     # a pair: one character
    r1, r2, r3, r4, ok = beside(hostile, post(url + "/v1/completions", completion),
                                post(url + "/v1/chat/completions", chat), post(url + "/v1/completions", stop),
                                post(url + "/v1/completions", model), post(url + "/v1/completions", pair))
    assert_error(r1, 400, "prompt", "prompt holds a lone UTF-16 surrogate")
    assert_error(r2, 400, "messages", "messages[0].content holds a lone UTF-16 surrogate")
    assert_error(r3, 400, "stop", "stop[0] holds a lone UTF-16 surrogate")
    assert_error(r4, 400, "model", "model holds a lone")
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_values_the_engine_cannot_run_are_refused_naming_their_field(hostile):
    """top_k=2**63 or 2**64 killed the engine core (every stream aborted, the server exited);
    {"seed": 2**64} was refused as a fault of the `prompt`; chat's max_completion_tokens=-1 was
    reported as `max_tokens`; n above --max-num-seqs was blamed on the prompt."""
    server, _ = hostile
    url = server.url
    cmpl = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 1}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 1}
    refused = [  # (path, body, param, words)
        ("/v1/completions", {**cmpl, "top_k": 2**64}, "top_k", "top_k must be"),
        ("/v1/completions", {**cmpl, "top_k": 2**63}, "top_k", "top_k must be"),
        ("/v1/chat/completions", {**chat, "top_k": 2**64}, "top_k", "top_k must be"),
        ("/v1/completions", {**cmpl, "seed": 2**64}, "seed", "seed must be"),
        ("/v1/completions", {**cmpl, "n": 10**6}, "n", "n must be"),
        ("/v1/completions", {**cmpl, "n": 64}, "n", "n=64", "max_num_seqs=16"),         # the engine's refusal
        ("/v1/chat/completions", {k: v for k, v in chat.items() if k != "max_tokens"} | {"max_completion_tokens": -1},
         "max_completion_tokens", "max_completion_tokens must be"),
    ]
    runs = [  # must complete: the largest seed, with a second sample at seed + 1 (mod 2**64)
        ("/v1/completions", {**cmpl, "seed": 2**64 - 1, "n": 2}),
        ("/v1/chat/completions", {**chat, "seed": 2**64 - 1, "n": 2}),
    ]
    answers = beside(hostile, *(post(url + p, b) for p, b, *_ in refused), *(post(url + p, b) for p, b in runs))
    for (path, body, param, *words), r in zip(refused, answers):
        error = assert_error(r, 400, param, *words)
        assert "request '" not in error["message"]                  # the server's request id means nothing here
    for r in answers[len(refused):]:
        assert r.status_code == 200, r.text
        assert [c["index"] for c in r.json()["choices"]] == [0, 1]


def test_a_top_k_above_the_vocabulary_is_refused_by_the_engine_naming_top_k(hostile):
    """SamplingParams takes top_k up to 2**31 - 1; the engine knows the vocabulary (49,152 here)."""
    server, _ = hostile
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 1, "top_k": 10**6}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "temperature": 1, "top_k": 49153}
    ok = {**body, "top_k": 49152}
    r, rc, fine = beside(hostile, post(server.url + "/v1/completions", body),
                         post(server.url + "/v1/chat/completions", chat), post(server.url + "/v1/completions", ok))
    assert_error(r, 400, "top_k", "top_k must be at most the vocabulary size (49152)", "got 1000000")
    assert_error(rc, 400, "top_k", "got 49153")
    assert fine.status_code == 200


def test_streaming_over_http10_is_refused_and_a_whole_answer_is_sent_with_a_length(hostile):
    """HTTP/1.0 has no chunked transfer encoding, and uvicorn's parser sent it to an HTTP/1.0 client."""
    server, reference = hostile
    streamed = request_bytes(json.dumps({**BESIDE, "stream": True}).encode(), version="1.0")
    whole = request_bytes(json.dumps(BESIDE).encode(), version="1.0")
    (raw_streamed, _), (raw_whole, _) = beside(hostile, raw_client(server.port, streamed),
                                               raw_client(server.port, whole))
    status, headers, body = parse_response(raw_streamed)
    assert "transfer-encoding" not in headers and int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "stream" and "needs HTTP/1.1" in error["message"]
    status, headers, body = parse_response(raw_whole)
    assert status == 200 and "transfer-encoding" not in headers and int(headers["content-length"]) == len(body)
    assert json.loads(body)["choices"][0]["text"] == reference


def test_a_client_that_leaves_while_sending_its_body_is_not_logged_as_a_server_error(hostile):
    server, _ = hostile

    async def leave(client):
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request_bytes(b'{"model": "tiny', length=200))        # 185 bytes promised, never sent
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
        await asyncio.sleep(0.5)                                               # the server notices

    before = server.log()
    beside(hostile, leave)
    log = server.log()[len(before):]
    assert "Traceback" not in log and "unhandled error" not in log and "ClientDisconnect" not in log, log


def test_stalled_requests_time_out_while_a_stream_beside_them_completes(hostile):
    """A connection that sends nothing, half its headers, half its body, a body one byte at a time
    (slowloris) or headers without end is closed within --request-read-timeout (2 s here) with 408
    (431 for the headers), and the stream beside them completes meanwhile. uvicorn timed out none
    of them: each held its connection for ever."""
    server, _ = hostile
    port = server.port
    half_head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"
    half_body = request_bytes(b'{"model": "tiny-llama', length=100)
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    slowloris = request_bytes(b"", length=len(body))
    endless_head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: " + b"a" * 70_000
    (idle, t_idle), (head, t_head), (half, t_half), (slow, t_slow), (big, t_big) = beside(
        hostile, raw_client(port, b""), raw_client(port, half_head), raw_client(port, half_body),
        raw_client(port, slowloris, drip=body, drip_every=0.25), raw_client(port, endless_head))
    assert idle == b"" and READ_TIMEOUT - 0.5 < t_idle < READ_TIMEOUT + SLACK      # closed, nothing to answer
    for raw, seconds, what in ((head, t_head, "headers"), (half, t_half, "body"), (slow, t_slow, "body")):
        status, headers, content = parse_response(raw)
        error = json.loads(content)["error"]
        assert status == 408 and headers["connection"] == "close", raw
        assert f"did not arrive within {READ_TIMEOUT:g} s" in error["message"] and what in error["message"]
        assert READ_TIMEOUT - 0.5 < seconds < READ_TIMEOUT + SLACK, (what, seconds)
    assert t_slow < 0.25 * len(body)                     # cut off before the last byte would have come
    status, headers, content = parse_response(big)
    assert status == 431 and "larger than 65536 bytes" in json.loads(content)["error"]["message"]
    assert t_big < READ_TIMEOUT                          # at once, not at the timeout
    m = metrics(server)
    assert m['kvlab:requests_rejected_total{reason="timeout"}'] >= 2      # the two body timeouts, counted


@pytest.mark.parametrize("argv, words", [
    (["--request-read-timeout", "0"], "--request-read-timeout 0.0: must be a positive number of seconds"),
    (["--timeout-keep-alive", "inf"], "--timeout-keep-alive inf: must be a positive number of seconds"),
])
def test_bad_timeout_flags_are_usage_errors(argv, words, capsys):
    from kvlab.serve.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and words in capsys.readouterr().err
