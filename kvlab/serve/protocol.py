"""The OpenAI protocol as kvlab's server speaks it: request bodies checked, responses built.

A request body is checked field by field before anything reaches the engine, and every
refusal is an `ApiError` that becomes OpenAI's error JSON:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

  * the body is not a JSON object, or a field is missing      -> 400
  * a field OpenAI does not define (a typo: `max_token`)       -> 400, listing the fields allowed
  * an OpenAI field kvlab does not implement (`logit_bias`)    -> 400, unless it has its neutral value
  * a value of the wrong JSON type (`"n": "2"`)                -> 400, saying what is allowed
  * a value out of range (`"temperature": -1`, `"seed": 2**64`) -> 400, from kvlab.SamplingParams, which
                                                                  owns the ranges (one rule, one place)
  * a value the engine refuses for this model (`"n": 1000`)    -> 400 (`refusal`: the engine's message,
                                                                  `param` the field it names first)
  * a string that is not Unicode (a lone surrogate `"\\ud800"`) -> 400: no tokenizer can encode it

Responses follow OpenAI's API reference (platform.openai.com/docs/api-reference: completions,
chat, streaming chunks, usage), with vLLM's extensions where kvlab has the feature (`top_k`,
`ignore_eos`, finish_reason "abort"). A stream is a sequence of server-sent events, one JSON
chunk per `data:` line, ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import numbers
import re
import time
import uuid
from dataclasses import dataclass, field

from kvlab.engine import RequestOutput, RequestOutputKind, SamplingParams
from kvlab.engine.sampling_params import MAX_N, MAX_TOP_K

DONE_EVENT = b"data: [DONE]\n\n"
# One encoder for every event: json.dumps with any non-default option builds a new JSONEncoder
# per call, which costs a streaming server more than the encoding itself.
to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ApiError(Exception):
    """A refusal the client should see: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request fields ------------------------------------------------------------------------------

def _kind(value) -> str:
    """The JSON type of a decoded value: null, bool, int, number, string, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Field:
    kinds: tuple[str, ...]        # JSON types accepted ("number" also takes integers)
    allowed: str                  # what the error message says is allowed
    required: bool = False


# Fields both endpoints take. `null` means "the default", as in OpenAI's API.
SAMPLING_FIELDS = {
    "model": Field(("string",), "the name of a served model (GET /v1/models)", required=True),
    "max_tokens": Field(("int", "null"), "an integer >= 1, or null"),
    "temperature": Field(("number", "null"), "a number >= 0 (0 is greedy)"),
    "top_p": Field(("number", "null"), "a number in (0, 1]"),
    "n": Field(("int", "null"), f"an integer in 1..{MAX_N}"),
    "seed": Field(("int", "null"), "an integer in 0..2**64 - 1, or null"),
    "stop": Field(("string", "array", "null"), "a non-empty string or a list of them"),
    "stream": Field(("bool", "null"), "true or false"),
    "stream_options": Field(("object", "null"), 'an object {"include_usage": true or false}'),
    "user": Field(("string", "null"), "a string (kvlab records it nowhere)"),
    "top_k": Field(("int", "null"), f"an integer in 1..{MAX_TOP_K:,} (at most the vocabulary), or 0 / -1 for no "
                                    f"limit (a vLLM extension)"),
    "ignore_eos": Field(("bool", "null"), "true or false (a vLLM extension: keep going past EOS)"),
    "return_token_ids": Field(("bool", "null"), "true or false (a vLLM extension: each choice also carries "
                                                "its token ids)"),
}
COMPLETION_FIELDS = SAMPLING_FIELDS | {
    "prompt": Field(("string", "array"), "a non-empty string, or a list of token ids", required=True),
}
CHAT_FIELDS = SAMPLING_FIELDS | {
    "messages": Field(("array",), 'a non-empty list of {"role": ..., "content": ...} objects', required=True),
    "max_completion_tokens": Field(("int", "null"), "an integer >= 1, or null (the newer name of max_tokens)"),
}
# OpenAI parameters kvlab does not implement: accepted only with the value that changes nothing.
NOT_IMPLEMENTED = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "logprobs": None,
                   "top_logprobs": None, "echo": False, "best_of": 1, "suffix": None, "tools": None,
                   "tool_choice": None, "response_format": None, "parallel_tool_calls": None, "functions": None,
                   "function_call": None, "store": None, "metadata": None, "service_tier": None}
CHAT_ROLES = ("system", "developer", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "name"}


def _is_neutral(value, neutral) -> bool:
    """null, false, an empty list or object, or the parameter's do-nothing value (0 is not false here)."""
    if value is None or value is False or value in ({}, []):
        return True
    return neutral is not None and _kind(value) in ("int", "number") and value == neutral


def _lone_surrogate(body) -> tuple[str, str | None] | None:
    """Where the first string that is not valid Unicode sits in a decoded body, as (path, top-level
    field): ("messages[0].content", "messages"), or None. JSON lets a string hold half a UTF-16
    surrogate pair ("\\ud800"); Python decodes it, but no tokenizer or UTF-8 encoder takes it. The
    path is built of keys already checked, so a message can show it."""
    def bad(s) -> bool:
        if isinstance(s, str) and not s.isascii():
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                return True
        return False

    stack = [(body, "the body", None)]                   # iterative: a body may nest deeply
    while stack:
        value, where, top = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if bad(key):
                    return f"a key of {where}", top
                stack.append((item, f"{where}.{key}" if top else key, top or key))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", top) for i, item in enumerate(value)
                         if isinstance(item, (str, list, dict)))
        elif bad(value):
            return where, top
    return None


def _check_fields(body, fields: dict[str, Field], endpoint: str) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object with the fields of {endpoint}, got a JSON "
                            f"{_kind(body)}")
    surrogate = _lone_surrogate(body)
    if surrogate is not None:
        where, top = surrogate
        raise ApiError(400, f"{where} holds a lone UTF-16 surrogate (an escape such as \\ud800 without its pair): "
                            f"JSON strings must be valid Unicode", param=top)
    for name, value in body.items():
        if name in fields:
            spec = fields[name]
            kind = _kind(value)
            if kind not in spec.kinds and not (kind == "int" and "number" in spec.kinds):
                raise ApiError(400, f"'{name}' must be {spec.allowed}, got {json.dumps(value)[:80]} (a JSON {kind})",
                               param=name)
        elif name in NOT_IMPLEMENTED:
            if not _is_neutral(value, NOT_IMPLEMENTED[name]):
                raise ApiError(400, f"'{name}' is an OpenAI parameter that kvlab does not implement; leave it out "
                                    f"(or set it to {json.dumps(NOT_IMPLEMENTED[name])})", param=name)
        else:
            raise ApiError(400, f"unknown field '{name}'; {endpoint} takes: {', '.join(sorted(fields))}", param=name)
    for name, spec in fields.items():
        if spec.required and name not in body:
            raise ApiError(400, f"'{name}' is required: {spec.allowed}", param=name)
    return {k: v for k, v in body.items() if k in fields and v is not None}


# ---- parsed requests ----------------------------------------------------------------------------

@dataclass
class GenerateRequest:
    """A checked request of either endpoint, ready for the engine."""
    endpoint: str                          # "completion" or "chat"
    model: str
    params: SamplingParams                 # output_kind DELTA when streaming, FINAL_ONLY otherwise
    stream: bool = False
    include_usage: bool = False            # stream_options.include_usage: a last chunk with the token counts
    return_token_ids: bool = False         # each choice (and each chunk) also carries its token ids
    prompt: str | list[int] | None = None  # completions: text or token ids
    messages: list[dict] | None = None     # chat: role/content messages (content as text)
    request_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    field_names: dict[str, str] = field(default_factory=dict)   # SamplingParams field -> the body's name, where
                                                                # they differ (chat's max_completion_tokens)


def parse_completion(body) -> GenerateRequest:
    f = _check_fields(body, COMPLETION_FIELDS, "POST /v1/completions")
    prompt = f["prompt"]
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise ApiError(400, "'prompt' holds several prompts; kvlab's server takes one prompt per request: send "
                                "one request per prompt (the server batches concurrent requests anyway)",
                           param="prompt")
        if not all(_kind(t) == "int" for t in prompt):
            raise ApiError(400, "'prompt' must be a non-empty string, or a list of token ids (integers)",
                           param="prompt")
    req = _generate_request("completion", f, default_max_tokens=16)   # OpenAI's default for completions
    req.prompt = prompt
    req.request_id = f"cmpl-{uuid.uuid4().hex}"
    return req


def parse_chat(body) -> GenerateRequest:
    f = _check_fields(body, CHAT_FIELDS, "POST /v1/chat/completions")
    messages = []
    if not f["messages"]:
        raise ApiError(400, "'messages' is empty; it needs at least one message", param="messages")
    for i, m in enumerate(f["messages"]):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) - MESSAGE_KEYS or "role" not in m:
            raise ApiError(400, f"{where} must be an object with 'role' and 'content' (and optionally 'name'), got "
                                f"{json.dumps(m)[:80]}", param=where)
        if m["role"] not in CHAT_ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(m['role'])}",
                           param=where)
        messages.append({"role": "system" if m["role"] == "developer" else m["role"],
                         "content": _message_text(m.get("content"), where)})
    names = {}
    if "max_completion_tokens" in f:                     # OpenAI's newer name; max_tokens is deprecated for chat
        if f.get("max_tokens", f["max_completion_tokens"]) != f["max_completion_tokens"]:
            raise ApiError(400, f"'max_completion_tokens' ({f['max_completion_tokens']}) and 'max_tokens' "
                                f"({f['max_tokens']}) disagree; send one of them", param="max_completion_tokens")
        f["max_tokens"] = f.pop("max_completion_tokens")
        names["max_tokens"] = "max_completion_tokens"
    req = _generate_request("chat", f, default_max_tokens=None, field_names=names)   # chat: until EOS or max length
    req.messages = messages
    req.request_id = f"chatcmpl-{uuid.uuid4().hex}"
    return req


def _message_text(content, where: str) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts "
                        f'{{"type": "text", "text": ...}} (kvlab serves text models only)', param=where)


def _generate_request(endpoint: str, f: dict, default_max_tokens: int | None,
                      field_names: dict[str, str] | None = None) -> GenerateRequest:
    stream = f.get("stream", False)
    options = f.get("stream_options", {})
    if options and not stream:
        raise ApiError(400, "'stream_options' is only allowed with \"stream\": true", param="stream_options")
    if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, f"'stream_options' must be {SAMPLING_FIELDS['stream_options'].allowed}, got "
                            f"{json.dumps(options)[:80]}", param="stream_options")
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    try:
        params = SamplingParams(n=f.get("n", 1), temperature=f.get("temperature", 1.0), top_p=f.get("top_p", 1.0),
                                top_k=f.get("top_k", 0), seed=f.get("seed"),
                                max_tokens=f.get("max_tokens", default_max_tokens), stop=f.get("stop"),
                                ignore_eos=f.get("ignore_eos", False), output_kind=kind)
    except (ValueError, TypeError) as err:                 # SamplingParams names the field first
        raise refusal(err, endpoint, field_names) from None
    return GenerateRequest(endpoint, f["model"], params, stream=stream,
                           include_usage=options.get("include_usage", False),
                           return_token_ids=f.get("return_token_ids", False), field_names=field_names or {})


# The fields of SamplingParams a body sets under the same name.
BODY_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "ignore_eos")
_ENGINE_PREFIX = re.compile(r"request '[^']*': ")         # LLMEngine.add_request names the request first


def refusal(err: Exception, endpoint: str, field_names: dict[str, str] | None = None) -> ApiError:
    """The 400 for a request that SamplingParams or the engine refused (a ValueError or TypeError).

    Their messages start with the field at fault ("seed must be ..., got ...", "request 'cmpl-1':
    n=300 samples, but ..."): `param` names that field as the body spelled it (chat's
    max_completion_tokens for max_tokens) and the message does too. Any other message is about
    the prompt (completions) or the messages (chat). The server's request id is left out: the
    client never saw it."""
    message = _ENGINE_PREFIX.sub("", str(err), count=1).replace("None or", "null or")   # Python's None: JSON's null
    word = re.match(r"[a-z_]+", message)
    name = word.group() if word else ""
    if name in BODY_SAMPLING_FIELDS:
        body_name = (field_names or {}).get(name, name)
        return ApiError(400, body_name + message[len(name):], param=body_name)
    return ApiError(400, message, param="prompt" if endpoint == "completion" else "messages")


# ---- responses ----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def engine_error(outputs: list[RequestOutput]) -> ApiError | None:
    """The 500 of a request the engine accepted and then could not run (finish_reason "error": its
    step failed; the engine went on serving the others), or None."""
    for out in outputs:
        for o in out.outputs:
            if o.finish_reason == "error":
                return ApiError(500, f"the engine could not finish this request: {o.stop_reason}",
                                code="engine_error")
    return None


def final_response(req: GenerateRequest, out: RequestOutput, model: str) -> dict:
    """The whole answer of a non-streaming request (out: the engine's final output)."""
    choices = []
    for o in out.outputs:
        if req.endpoint == "chat":
            choice = {"index": o.index, "message": {"role": "assistant", "content": o.text},
                      "logprobs": None, "finish_reason": o.finish_reason}
        else:
            choice = {"index": o.index, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
        if req.return_token_ids:
            choice["token_ids"] = list(o.token_ids)
        choices.append(choice)
    completion_tokens = sum(len(o.token_ids) for o in out.outputs)
    return {"id": req.request_id, "object": "chat.completion" if req.endpoint == "chat" else "text_completion",
            "created": req.created, "model": model, "choices": choices,
            "usage": usage(len(out.prompt_token_ids), completion_tokens)}


class StreamEncoder:
    """Turns a streaming request's engine outputs (DELTA) into server-sent events.

    `encode(outputs)` takes every output that arrived since the last call (one per engine
    step; several when the client or the event loop fell behind) and returns one event per
    choice that has something new: the deltas are merged, so a slow reader gets fewer,
    larger chunks instead of a growing backlog. `close()` returns the usage chunk (if asked)
    and `[DONE]`.
    """

    def __init__(self, req: GenerateRequest, model: str):
        self.req = req
        self.model = model
        self.object = "chat.completion.chunk" if req.endpoint == "chat" else "text_completion"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.role_sent: set[int] = set()
        # Every chunk of the stream has the same id, object, created and model: encoded once.
        head = to_json({"id": req.request_id, "object": self.object, "created": req.created, "model": model})
        self._head = ("data: " + head[:-1] + ',"choices":').encode()
        self._tail = b',"usage":null}\n\n' if req.include_usage else b"}\n\n"   # null but on the last (OpenAI's way)

    def encode(self, outputs: list[RequestOutput]) -> bytes:
        merged: dict[int, list] = {}                  # choice index -> [text, finish_reason, token ids]
        for out in outputs:
            self.prompt_tokens = len(out.prompt_token_ids)
            for o in out.outputs:
                self.completion_tokens += len(o.token_ids)
                m = merged.setdefault(o.index, ["", None, []])
                m[0] += o.text
                m[1] = o.finish_reason or m[1]
                m[2] += o.token_ids
        events = []
        for index in sorted(merged):
            text, finish, ids = merged[index]
            news = text or (ids and self.req.return_token_ids) or finish is not None
            if not news and (self.req.endpoint != "chat" or index in self.role_sent):
                continue                              # a token that added no text yet (a partial character)
            choice = self._choice(index, text, finish)
            if self.req.return_token_ids:
                choice["token_ids"] = ids
            events.append(self.event(choice))
        return b"".join(events)

    def error(self, err: ApiError) -> bytes:
        """The event that ends a stream the server could not finish: OpenAI's error body, as vLLM sends it."""
        return b"data: " + to_json(err.body()).encode() + b"\n\n"

    def abort(self, indices: range) -> bytes:
        """Chunks that end every choice with finish_reason "abort" (the server is shutting down)."""
        return b"".join(self.event(self._choice(i, "", "abort")) for i in indices)

    def close(self) -> bytes:
        tail = b""
        if self.req.include_usage:
            tail = self.event([], usage(self.prompt_tokens, self.completion_tokens))
        return tail + DONE_EVENT

    def _choice(self, index: int, text: str, finish: str | None) -> dict:
        if self.req.endpoint == "chat":
            delta = {"content": text} if text or finish is None else {}
            if index not in self.role_sent:
                self.role_sent.add(index)
                delta = {"role": "assistant", **delta, "content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def event(self, choices, usage_: dict | None = None) -> bytes:
        """One server-sent event: `data: {"id": ..., "choices": [...], "usage": ...}`."""
        if isinstance(choices, dict):
            choices = [choices]
        tail = self._tail if usage_ is None else b',"usage":' + to_json(usage_).encode() + b"}\n\n"
        return self._head + to_json(choices).encode() + tail
