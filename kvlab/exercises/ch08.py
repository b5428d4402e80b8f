"""Chapter 08 exercises (notebooks/exercises/08_inference_service.ipynb): the client side of a streaming server.

    08.1  stream_text(chunks) -> str
              the text of a server-sent-events stream, read from network chunks cut anywhere
    08.2  stream_latencies(start, lines) -> (ttft, itls)
              time to first token and the inter-token latencies, from the lines' arrival times

The streams are the server's own bytes: kvlab.serve's `StreamEncoder` (what `kvlab serve` writes to
the socket) turns engine outputs into events, completions and chat, with usage chunks, several tokens
merged into one event, tokens that add no text yet (half a UTF-8 character) and text that looks like
the protocol. 08.2's reference is the load generator of `kvlab bench serve` (`kvlab.bench.serve.
send_request`), fed the same lines on a clock that reads their arrival times.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

from kvlab.engine import CompletionOutput, RequestMetrics, RequestOutput, SamplingParams
from kvlab.exercises.harness import Case, Mismatch, Verdict, compare_equal, run_check, show, tol
from kvlab.serve.protocol import GenerateRequest, StreamEncoder

# Each step's new text (one token each); "" is a token that completes no character yet.
PIECES_PLAIN = [" The", " factory", " line", " needs", " data", ",", " people", " and", " time", "."]
PIECES_HARD = [" caf", "é", " →", " ", "", "😀", " \"quoted\"", " back\\slash", "\n", "data: [DONE]", "\n\n", " done",
               " ünï", "cödé", "."]


def make_stream(pieces: list[str], endpoint: str = "completion", include_usage: bool = False,
                return_token_ids: bool = False, group: list[int] | None = None) -> list[bytes]:
    """The events `kvlab serve` sends for a generation whose steps produced `pieces` (one token each):
    `group` says how many steps each event merges (a reader that fell behind gets them merged)."""
    req = GenerateRequest(endpoint, "kvlab", SamplingParams(max_tokens=len(pieces)), stream=True,
                          include_usage=include_usage, return_token_ids=return_token_ids, request_id="req-0",
                          created=0)
    encoder = StreamEncoder(req, "kvlab")
    outputs = [RequestOutput("req-0", None, [1, 2, 3], [CompletionOutput(0, text, [100 + i],
                                                                         finish_reason="length" if i == len(pieces) - 1
                                                                         else None)],
                             finished=i == len(pieces) - 1, metrics=RequestMetrics(0.0))
               for i, text in enumerate(pieces)]
    group = group or [1] * len(pieces)
    events, i = [], 0
    for size in group:
        data = encoder.encode(outputs[i:i + size])
        if data:
            events.append(data)
        i += size
    events.append(encoder.close())
    return events


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


# ---- 08.1 the text of a stream --------------------------------------------------------------------

def _text_cases():
    rng = random.Random(8)
    plain = b"".join(make_stream(PIECES_PLAIN))
    hard = b"".join(make_stream(PIECES_HARD, group=[1, 2, 1, 3, 1, 1, 2, 1, 1, 1, 1]))
    hard_usage = b"".join(make_stream(PIECES_HARD, include_usage=True, return_token_ids=True))
    chat = b"".join(make_stream(PIECES_HARD, endpoint="chat", include_usage=True))
    emoji = hard.index("😀".encode())
    cases = [
        ("the whole stream in one chunk (plain text)", [plain], "".join(PIECES_PLAIN)),
        ("one chunk per event", make_stream(PIECES_PLAIN), "".join(PIECES_PLAIN)),
        ("a usage chunk before [DONE] (stream_options.include_usage), token ids in every chunk",
         [hard_usage], "".join(PIECES_HARD)),
        ("chunks cut in the middle of lines", _cut(plain, [7, 40, 41, 150, 151, 152, 300]), "".join(PIECES_PLAIN)),
        ("a chunk boundary inside a UTF-8 character (the emoji's 4 bytes)", _cut(hard, [emoji + 1, emoji + 3]),
         "".join(PIECES_HARD)),
        ("random cuts, text that contains 'data: [DONE]', quotes, backslashes and newlines",
         _cut(hard, rng.sample(range(len(hard)), 25)), "".join(PIECES_HARD)),
        ("one byte at a time", [bytes([b]) for b in hard_usage], "".join(PIECES_HARD)),
        ("a chat stream (choices[0].delta.content; the first delta has the role, the last none)",
         _cut(chat, rng.sample(range(len(chat)), 12)), "".join(PIECES_HARD)),
    ]
    for i, (what, chunks, text) in enumerate(cases, start=1):
        yield Case(f"case {i}: {what}", (list(chunks),),
                   inputs=f"{len(chunks)} chunk{'s' * (len(chunks) > 1)}; the first: {show(chunks[0], 160)}",
                   expected=text, data={"chunks": chunks})


def _text_on_error(case: Case, err: BaseException) -> str | None:
    if isinstance(err, UnicodeDecodeError):
        return ("A chunk can end in the middle of a UTF-8 character: keep bytes until a whole line (or event) has "
                "arrived, and decode that (or use codecs.getincrementaldecoder('utf-8')).")
    if isinstance(err, json.JSONDecodeError):
        if "[DONE]" in str(err.doc)[:12]:
            return "The last event is `data: [DONE]`, not JSON: stop reading there."
        if len(case.data["chunks"]) == 1:
            return ("Events end at a blank line (b'\\n\\n') and their data follows 'data: '; parse that as JSON, "
                    "except an event whose whole data is [DONE] (the text itself may contain those words, so do not "
                    "search the bytes for them).")
        return ("A chunk can end in the middle of an event: buffer the bytes and parse only complete events (they end "
                "with a blank line, b'\\n\\n'), keeping the rest for the next chunk.")
    if isinstance(err, IndexError):
        return "The usage chunk has no choices (\"choices\": []): skip chunks without choices."
    if isinstance(err, KeyError) and "text" in str(err):
        return "Chat chunks carry the text in choices[0][\"delta\"].get(\"content\"), not choices[0][\"text\"]."
    if isinstance(err, KeyError) and "content" in str(err):
        return "A chat delta may have no \"content\" (the last one only has the finish reason): use .get(\"content\")."
    return None


def _text_diagnose(case: Case, got) -> str | None:
    want = case.reference()
    if not isinstance(got, str):
        return "Return the text as a str."
    cut = want.find("data: [DONE]")
    if cut >= 0 and got == want[:cut]:
        return ("You stopped at the first 'data: [DONE]' anywhere in the bytes, but this text contains those words: "
                "only an event whose whole data is [DONE] ends the stream.")
    if len(got) < len(want):
        return ("Text went missing where a chunk cut an event in two: buffer bytes across chunks and parse only "
                "complete events.")
    return ("Concatenate choices[0]['text'] (completions) or choices[0]['delta'].get('content') (chat) of every "
            "event with choices, in order, up to `data: [DONE]`.")


def check_stream_text(stream_text) -> Verdict:
    """08.1: stream_text(chunks) -> the text of a server-sent-events stream from kvlab's server, whatever the chunk
    boundaries (completions and chat)."""
    return run_check(
        "08.1 stream_text", stream_text, _text_cases(),
        compare=lambda e, g: compare_equal(e, g, name="text"),
        checked=lambda n: (f"{n} streams encoded by kvlab.serve's StreamEncoder give exactly the generated text: one "
                           f"chunk, one event per chunk, chunks cut mid-line and inside a UTF-8 character, one byte "
                           f"at a time, a usage chunk, text that contains 'data: [DONE]', and a chat stream."),
        todo="Write the body of stream_text(chunks), then run this cell again.",
        on_error=_text_on_error, diagnose=_text_diagnose)


# ---- 08.2 TTFT and inter-token latencies ----------------------------------------------------------

def _lines(events: list[bytes]) -> list[bytes]:
    """The stream as an HTTP client's line reader yields it (aiohttp's `async for line in resp.content`)."""
    return [line for event in events for line in event.splitlines(keepends=True)]


def _kvlab_measure(start: float, timed_lines: list[tuple[float, bytes]]):
    """kvlab bench serve's own measurement (send_request) of these lines: a fake session hands them over and a
    fake clock reads each line's arrival time."""
    from kvlab.bench import serve as bench

    clock = SimpleNamespace(now=start)

    class Content:
        def __aiter__(self):
            return self._gen()

        async def _gen(self):
            for t, line in timed_lines:
                clock.now = t
                yield line

    class Response:
        status = 200
        content = Content()

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

    session = SimpleNamespace(post=lambda url, json, headers: Response())
    tokens = sum(len((json.loads(line[6:])["choices"] or [{}])[0].get("token_ids") or ())
                 for _, line in timed_lines if line.startswith(b"data: {"))
    real_time = bench.time
    bench.time = SimpleNamespace(perf_counter=lambda: clock.now)
    try:
        coro = bench.send_request(session, "http://kvlab", "kvlab", bench.BenchRequest([1, 2, 3], tokens), {})
        try:
            coro.send(None)                              # nothing in it waits: it finishes in one send
        except StopIteration as done:
            result = done.value
        else:
            raise RuntimeError("kvlab's client waited on something")
    finally:
        bench.time = real_time
    if result.error:
        raise RuntimeError(f"kvlab's client failed on this stream: {result.error}")
    return result.ttft, list(result.itl)


def _latency_cases():
    rng = random.Random(9)
    setups = [
        ("one token per event, steady 20 ms gaps", PIECES_PLAIN, None, "steady"),
        ("several tokens merged in some events (a reader that fell behind)", PIECES_PLAIN, [2, 1, 3, 1, 1, 2], "jitter"),
        ("the first event carries 3 tokens", PIECES_HARD, [3, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1], "jitter"),
        ("a token that adds no text yet (half a character) still counts", PIECES_HARD, None, "jitter"),
        ("a slow first token (queueing and prefill), then fast decodes", PIECES_PLAIN, [1, 1, 1, 1, 2, 1, 1, 1, 1],
         "slow-first"),
    ]
    for i, (what, pieces, group, timing) in enumerate(setups, start=1):
        events = make_stream(pieces, include_usage=True, return_token_ids=True, group=group)
        start, t, timed = 1000.0, 1000.0, []
        for j, event in enumerate(events):
            gap = 0.02 if timing == "steady" else rng.choice([0.005, 0.0125, 0.03125, 0.05])
            if timing == "slow-first" and j == 0:
                gap = 0.75
            t += gap
            timed += [(t, line) for line in _lines([event])]
        yield Case(f"case {i}: {what}", (start, timed),
                   inputs=f"start {start}; {len(timed)} lines with their arrival times, the first: "
                          f"{show(timed[0], 200)}",
                   expected=(lambda s=start, tl=timed: _kvlab_measure(s, tl)), data={"start": start, "timed": timed})


def _latency_compare(expected, got) -> Mismatch | None:
    ttft, itls = expected
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        return Mismatch("return a pair (ttft, itls)", _show_latency(expected), show(got, 200))
    g_ttft, g_itls = got
    try:
        g_ttft, g_itls = float(g_ttft), [float(x) for x in g_itls]
    except (TypeError, ValueError):
        return Mismatch("ttft must be a number and itls a list of numbers", _show_latency(expected), show(got, 200))
    if abs(g_ttft - ttft) > 1e-9:
        return Mismatch(f"wrong TTFT (tolerance {tol(1e-9)} s)", _show_latency(expected), _show_latency((g_ttft, g_itls)))
    if len(g_itls) != len(itls) or any(abs(a - b) > 1e-9 for a, b in zip(g_itls, itls)):
        return Mismatch(f"wrong inter-token latencies ({len(itls)} expected, one per token after the first event's; "
                        f"tolerance {tol(1e-9)} s)", _show_latency(expected), _show_latency((g_ttft, g_itls)))
    return None


def _show_latency(value) -> str:
    ttft, itls = value
    return f"ttft {ttft * 1e3:.4g} ms, itls (ms) {[round(x * 1e3, 4) for x in itls]}"


def _latency_diagnose(case: Case, got) -> str | None:
    start, timed = case.data["start"], case.data["timed"]
    events = []                                          # (time, tokens) of every data line
    for t, line in timed:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            k = len(chunk["choices"][0].get("token_ids") or ()) if chunk["choices"] else 0
            events.append((t, k))
    token_events = [(t, k) for t, k in events if k]
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        return "Return (ttft, itls): a number of seconds and a list of seconds."
    itls = list(got[1])                       # got[0] (the TTFT) is checked elsewhere
    per_event = [b[0] - a[0] for a, b in zip(token_events, token_events[1:])]
    if _close(itls, per_event):
        return ("An event can carry several tokens (k of them): it adds k inter-token latencies of (its time - the "
                "previous event's time) / k each, as kvlab bench serve counts them.")
    with_usage = per_event + [events[-1][0] - token_events[-1][0]]
    if len(itls) > 0 and len(itls) >= len(per_event) + 1 and _close(itls[-1:], with_usage[-1:]):
        return "The usage chunk (\"choices\": []) carries no token: skip it."
    from_start = [t - start for t, _ in token_events[1:]]
    if _close(itls[: len(from_start)], from_start):
        return "An inter-token latency is measured from the previous token event, not from the request's start."
    return ("TTFT = arrival of the first event with tokens - start; each later event with k tokens adds k values "
            "of (its time - the previous token event's time) / k.")


def _close(a, b) -> bool:
    try:
        return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-9 for x, y in zip(a, b))
    except (TypeError, ValueError):
        return False


def check_stream_latencies(stream_latencies) -> Verdict:
    """08.2: stream_latencies(start, lines) -> (ttft, itls) from (arrival time, line) pairs of a stream: equal to
    what kvlab bench serve's client measures on the same lines."""
    return run_check(
        "08.2 stream_latencies", stream_latencies, _latency_cases(),
        compare=_latency_compare,
        checked=lambda n: (f"{n} timed streams from kvlab.serve's StreamEncoder give the TTFT and inter-token "
                           f"latencies kvlab bench serve measures (within {tol(1e-9)} s): events of one and several "
                           f"tokens, a first event with several, a token without text, the usage chunk, a slow first "
                           f"token."),
        todo="Write the body of stream_latencies(start, lines), then run this cell again.",
        diagnose=_latency_diagnose)
