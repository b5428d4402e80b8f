"""kvlab.serve.protocol without a server: what a request body may hold, and how outputs become events.

The HTTP tests (test_serve.py) send these bodies to a real server; here each rule is checked
on its own, fast, including the ones a client library would never send.
"""

import json

import pytest

from kvlab.engine import CompletionOutput, RequestMetrics, RequestOutput, RequestOutputKind
from kvlab.serve.protocol import (DONE_EVENT, ApiError, StreamEncoder, engine_error, final_response, parse_chat, parse_completion,
                                  refusal)

OK = {"model": "m", "prompt": "Hello"}


def refusal_of(parse, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


def test_defaults_follow_openai():
    req = parse_completion(OK)
    p = req.params
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.seed, p.stop_strings) == (1, 1.0, 1.0, 16, None, ())
    assert p.output_kind == RequestOutputKind.FINAL_ONLY and not req.stream
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.params.max_tokens is None                      # chat: until EOS or the model's limit
    assert req.request_id.startswith("cmpl-") and chat.request_id.startswith("chatcmpl-")


def test_fields_reach_sampling_params():
    req = parse_completion({**OK, "n": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 3, "max_tokens": 7,
                            "stop": ["\n", "."], "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}, "user": "u", "presence_penalty": 0})
    p = req.params
    assert (p.n, p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (2, 0.5, 0.9, 5, 3, 7)
    assert p.stop_strings == ("\n", ".") and p.ignore_eos and req.include_usage
    assert p.output_kind == RequestOutputKind.DELTA
    assert parse_completion({**OK, "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert parse_completion({**OK, "temperature": None}).params.temperature == 1.0     # null: the default
    chat = parse_chat({"model": "m", "max_completion_tokens": 9, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]}]})
    assert chat.params.max_tokens == 9 and chat.messages == [{"role": "system", "content": "Be brief"}]


@pytest.mark.parametrize("body, param, words", [
    ([1, 2], None, "JSON object"),
    ({"prompt": "x"}, "model", "'model' is required"),
    ({"model": "m"}, "prompt", "'prompt' is required"),
    ({**OK, "max_token": 5}, "max_token", "unknown field 'max_token'"),
    ({**OK, "n": "2"}, "n", "'n' must be an integer in 1..1024"),
    ({**OK, "n": True}, "n", "a JSON bool"),
    ({**OK, "max_tokens": 2.5}, "max_tokens", "a JSON number"),
    ({**OK, "max_tokens": -1}, "max_tokens", "max_tokens must be null or an integer >= 1, got -1"),
    ({**OK, "max_tokens": 0}, "max_tokens", "got 0"),
    ({**OK, "temperature": -1}, "temperature", "temperature must be a"),
    ({**OK, "temperature": "hot"}, "temperature", "a JSON string"),
    ({**OK, "top_p": 0}, "top_p", "(0, 1]"),
    ({**OK, "top_p": 1.5}, "top_p", "(0, 1]"),
    ({**OK, "n": 0}, "n", "n must be an integer in 1..1024"),
    ({**OK, "seed": -3}, "seed", "seed must be null or an integer in 0..2**64 - 1"),
    ({**OK, "stop": ""}, "stop", "non-empty string"),
    ({**OK, "stop": [1]}, "stop", "non-empty string"),
    ({**OK, "stream": "yes"}, "stream", "true or false"),
    ({**OK, "stream_options": {"include_usage": True}}, "stream_options", 'only allowed with "stream": true'),
    ({**OK, "stream": True, "stream_options": {"usage": True}}, "stream_options", "include_usage"),
    ({**OK, "logit_bias": {"5": 10}}, "logit_bias", "does not implement"),
    ({**OK, "logprobs": 0}, "logprobs", "does not implement"),
    ({**OK, "presence_penalty": 0.5}, "presence_penalty", "does not implement"),
    ({**OK, "prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({**OK, "prompt": [1, "a"]}, "prompt", "list of token ids"),
    ({**OK, "prompt": [1, 2.0]}, "prompt", "list of token ids"),
    ({**OK, "prompt": {"text": "x"}}, "prompt", "a JSON object"),
])
def test_bad_completion_bodies_say_what_is_allowed(body, param, words):
    err = refusal_of(parse_completion, body)
    assert words in err.message and err.param == param
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error", "param": param,
                                    "code": None}}


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("parse, body, param, words", [
    # issue 19: values the engine could not run once took the engine core down (2**63, 2**64), or
    # were refused naming the wrong field ("prompt" for the seed)
    (parse_completion, {**OK, "seed": 2**64}, "seed", "seed must be null or an integer in 0..2**64 - 1"),
    (parse_completion, {**OK, "top_k": 2**63}, "top_k", "top_k must be an integer in 1..2,147,483,647"),
    (parse_chat, {**CHAT, "top_k": 2**64}, "top_k", "top_k must be"),
    (parse_completion, {**OK, "n": 10**6}, "n", "n must be an integer in 1..1024"),
    (parse_completion, {**OK, "max_tokens": 2**64}, "max_tokens", "max_tokens must be"),
    # chat's max_completion_tokens is named as the client spelled it, not as SamplingParams' max_tokens
    (parse_chat, {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens",
     "max_completion_tokens must be null or an integer >= 1, got -1"),
    (parse_chat, {**CHAT, "max_completion_tokens": 5, "max_tokens": 6}, "max_completion_tokens", "disagree"),
    # a lone UTF-16 surrogate decodes to a Python str that no tokenizer (or UTF-8) takes
    (parse_completion, {**OK, "prompt": "a\ud800b"}, "prompt", "prompt holds a lone UTF-16 surrogate"),
    (parse_completion, {**OK, "stop": ["ok", "\udfff"]}, "stop", "stop[1] holds a lone UTF-16 surrogate"),
    (parse_chat, {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
     "messages", "messages[0].content[0].text holds a lone"),
    (parse_completion, {**OK, "\ud800": 1}, None, "a key of the body holds a lone"),
    (parse_completion, {**OK, "model": "x\udc00"}, "model", "model holds a lone"),
])
def test_values_out_of_range_or_not_unicode_are_refused_naming_the_field(parse, body, param, words):
    err = refusal_of(parse, body)
    assert words in err.message and err.param == param, err.body()
    json.dumps(err.body(), ensure_ascii=False).encode()          # the error itself can be sent


def test_values_at_the_edge_of_the_ranges_are_accepted():
    p = parse_completion({**OK, "seed": 2**64 - 1, "n": 2, "top_k": 2**31 - 1, "prompt": json.loads(r'"a\ud83d\ude00b"')}).params
    assert (p.seed, p.n, p.top_k) == (2**64 - 1, 2, 2**31 - 1)         # JSON's surrogate pair: one character
    assert parse_chat({**CHAT, "max_completion_tokens": 7, "max_tokens": 7}).params.max_tokens == 7


@pytest.mark.parametrize("message, endpoint, param, text", [
    ("request 'cmpl-1': n=300 samples, but at most max_num_seqs=8 sequences run at once", "completion", "n",
     "n=300 samples, but at most max_num_seqs=8 sequences run at once"),
    ("request 'chatcmpl-2': stop strings need a tokenizer", "chat", "stop", "stop strings need a tokenizer"),
    ("request 'cmpl-3': top_k=60000 is more than the vocabulary", "completion", "top_k",
     "top_k=60000 is more than the vocabulary"),
    ("request 'chatcmpl-4': max_tokens=9 is ...", "chat", "max_completion_tokens", "max_completion_tokens=9 is ..."),
    ("request 'cmpl-5': the prompt has 5000 tokens", "completion", "prompt", "the prompt has 5000 tokens"),
    ("request 'chatcmpl-6': token id 7 is outside the vocabulary", "chat", "messages", "token id 7 is outside the vocabulary"),
    ("seed must be None or an integer", "completion", "seed", "seed must be null or an integer"),
])
def test_engine_refusals_name_the_body_field_they_start_with(message, endpoint, param, text):
    names = {"max_tokens": "max_completion_tokens"} if "chatcmpl-4" in message else {}
    err = refusal(ValueError(message), endpoint, names)
    assert (err.status, err.param, err.message) == (400, param, text)


@pytest.mark.parametrize("messages, words", [
    ([], "'messages' is empty"),
    ("Hi", "'messages' must be a non-empty list"),
    ([{"content": "Hi"}], "messages[0] must be an object with 'role'"),
    ([{"role": "user", "content": "Hi", "tool_calls": []}], "messages[0] must be an object"),
    ([{"role": "robot", "content": "Hi"}], "messages[0].role must be one of system, developer, user, assistant"),
    ([{"role": "user", "content": 5}], "messages[0].content must be a string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text parts"),
])
def test_bad_chat_messages(messages, words):
    assert words in refusal_of(parse_chat, {"model": "m", "messages": messages}).message


def _out(index_texts, finished=False, reason=None, prompt=(5, 6, 7)):
    """A DELTA RequestOutput with one CompletionOutput per (index, text, token_ids)."""
    outs = [CompletionOutput(i, text, list(ids), finish_reason=reason) for i, text, ids in index_texts]
    return RequestOutput("r", None, list(prompt), outs, finished, RequestMetrics(arrival_time=0.0))


def _events(data: bytes) -> list:
    assert data.endswith(b"\n\n")
    lines = [line for line in data.decode().split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]) for line in lines]


def test_stream_encoder_merges_what_arrived_and_counts_usage():
    req = parse_completion({**OK, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    enc = StreamEncoder(req, "m")
    # two engine steps arrived before the client was served: one event per choice, texts joined
    events = _events(enc.encode([_out([(0, "Hel", [1]), (1, "A", [2])]), _out([(0, "lo", [3]), (1, "", [4])])]))
    assert [(e["choices"][0]["index"], e["choices"][0]["text"]) for e in events] == [(0, "Hello"), (1, "A")]
    assert all(e["usage"] is None and e["object"] == "text_completion" and e["id"] == req.request_id
               for e in events)
    assert enc.encode([_out([(0, "", [9])])]) == b""          # a token with no text yet: nothing to send
    last = _events(enc.encode([_out([(0, "!", [5]), (1, "B", [6])], finished=True, reason="length")]))
    assert [c["choices"][0]["finish_reason"] for c in last] == ["length", "length"]
    tail = _events(enc.close())
    assert tail[-1] == "[DONE]" and tail[0]["choices"] == []
    assert tail[0]["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}


def test_chat_stream_sends_the_role_first_then_content():
    req = parse_chat({"model": "m", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    enc = StreamEncoder(req, "m")
    first = _events(enc.encode([_out([(0, "", [1])])]))       # no text yet, but the role goes out
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first[0]["object"] == "chat.completion.chunk" and "usage" not in first[0]
    second = _events(enc.encode([_out([(0, "Hey", [2])], finished=True, reason="stop")]))
    assert second[0]["choices"][0] == {"index": 0, "delta": {"content": "Hey"}, "logprobs": None,
                                       "finish_reason": "stop"}
    assert enc.close() == DONE_EVENT


def test_final_response_shapes():
    out = _out([(0, "Hi there", [1, 2]), (1, "Yo", [3])], finished=True, reason="length")
    done = final_response(parse_completion(OK), out, "m")
    assert done["object"] == "text_completion" and [c["text"] for c in done["choices"]] == ["Hi there", "Yo"]
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    chat = final_response(parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}), out, "m")
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hi there"}


def test_a_request_the_engine_could_not_finish_is_a_server_error_not_a_choice():
    """finish_reason "error" (the engine's step failed for this request; the engine went on) never
    reaches a client as a finish reason: a 500 with OpenAI's error body, or that body as the stream's
    last event."""
    ok = _out([(0, "Hi", [1])], finished=True, reason="stop")
    failed = _out([(0, "Hi", [1])], finished=True, reason="error")
    failed.outputs[0].stop_reason = "the engine step failed: RuntimeError: CUDA error"
    assert engine_error([ok]) is None
    err = engine_error([ok, failed])
    assert (err.status, err.code, err.type) == (500, "engine_error", "server_error")
    assert err.message == "the engine could not finish this request: the engine step failed: RuntimeError: CUDA error"
    enc = StreamEncoder(parse_completion({**OK, "stream": True}), "m")
    (event,) = _events(enc.error(err))
    assert event == err.body()
