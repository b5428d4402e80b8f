"""The HTTP side of `kvlab serve`: a Starlette (ASGI) app around one AsyncEngine.

    POST /v1/completions        prompt (text or token ids) -> text; stream=true: server-sent events
    POST /v1/chat/completions   messages -> the model's chat template -> text; same streaming
    GET  /v1/models             the served model
    GET  /health                200 while the engine loop runs, 503 otherwise
    GET  /metrics               Prometheus text (kvlab.serve.metrics)

A generation request goes: read and check the body (kvlab.serve.protocol) -> tokenize on
the tokenizer thread -> `AsyncEngine.add_request` (the engine core takes it between two
steps, or refuses it) -> an `EngineResponse` that sends the outputs as they arrive. The
response also listens for the client going away: a disconnect before the request finished
aborts it in the engine, which frees its KV blocks at the next step boundary.

Every refusal (bad JSON, bad field, unknown model, prompt too long, queue full, missing API
key, a body that does not arrive in time) is an OpenAI-style error JSON with a status: 400,
401, 404, 408, 413, 431 or 503 (with Retry-After). A refusal touches nothing in the engine, so
running requests never notice. vLLM's server (vllm/entrypoints/openai/api_server.py) is the
same design on FastAPI.

A client may also be slow or hostile. TimedHttpProtocol (uvicorn's httptools protocol with a
header deadline and size limit) and read_json's body deadline close a connection whose request
stalls; a client that leaves while sending its body is no error of the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from kvlab.serve.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from kvlab.serve.metrics import CONTENT_TYPE, ServerMetrics
from kvlab.serve.protocol import (ApiError, GenerateRequest, engine_error, StreamEncoder, final_response, parse_chat,
                                  parse_completion, refusal, to_json)

logger = logging.getLogger("kvlab.serve")

MAX_BODY_BYTES = 32 * 2**20     # 32 MiB: a prompt far longer than any model's context still fits
MAX_HEADER_BYTES = 64 * 2**10   # 64 KiB of request line and headers (h11's default is 16 KiB; cookies run long)
REQUEST_READ_TIMEOUT_S = 30.0   # seconds a client may take to send a request's headers, and again its body
RETRY_AFTER_S = 1               # what a 503 (queue full) tells the client to wait, seconds
REJECT_REASONS = {400: "invalid", 408: "timeout", 413: "too_large"}   # for errors without a code of their own
HTTP10_STREAM = ('"stream": true needs HTTP/1.1: the events of a stream go out with chunked transfer encoding, which '
                 'HTTP/1.0 lacks. Send the request over HTTP/1.1 (curl: without --http1.0; nginx: '
                 '"proxy_http_version 1.1;"), or without "stream"')
try:                                    # what a chat template raises for messages it refuses (transformers
    from jinja2.exceptions import TemplateError     # renders chat templates with jinja2)
except ImportError:                     # pragma: no cover -- no jinja2: apply_chat_template cannot run either
    TemplateError = ValueError


class OpenAIServer:
    """The state behind the routes: the engine, the metrics, the tokenizer."""

    def __init__(self, engine: AsyncEngine, model_name: str, request_read_timeout: float = REQUEST_READ_TIMEOUT_S):
        self.engine = engine
        self.request_read_timeout = request_read_timeout
        self.metrics = ServerMetrics(engine)
        engine.on_finished = self.metrics.observe_finished
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.created = int(time.time())
        # Prompts are tokenized here (the engine core detokenizes), on a thread of their own so
        # that a long prompt does not hold up the event loop. None: the engine takes token ids only.
        self.tokenizer = engine.tokenizer
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvlab-tokenizer")

    # ------------------------------------------------------------------ generation
    async def generate(self, request: Request, parse) -> EngineResponse:
        arrival = time.perf_counter()
        req: GenerateRequest = parse(await read_json(request, timeout=self.request_read_timeout))
        if req.stream and request.scope.get("http_version") == "1.0":
            raise ApiError(400, HTTP10_STREAM, param="stream")
        if req.model != self.model_name:
            raise ApiError(404, f"the model '{req.model}' does not exist on this server; it serves "
                                f"'{self.model_name}' (GET /v1/models)", param="model", code="model_not_found")
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(self.tokenizer_thread, self.prompt_token_ids, req)
        try:
            stream = await self.engine.add_request(req.request_id, prompt, req.params, arrival)
        except QueueFullError as err:
            raise ApiError(503, str(err), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except (ValueError, TypeError) as err:               # the engine names the field at fault first
            raise refusal(err, req.endpoint, req.field_names) from None
        except EngineDeadError as err:
            raise ApiError(503, str(err), code="engine_unavailable") from None
        return EngineResponse(self, req, stream)

    def prompt_token_ids(self, req: GenerateRequest) -> list[int]:
        """Token ids of the prompt: the chat template for chat, the tokenizer for text (as LLM.generate)."""
        if self.tokenizer is None and (req.endpoint == "chat" or isinstance(req.prompt, str)):
            raise ApiError(400, "this server runs without a tokenizer (--skip-tokenizer-init): send the prompt to "
                                "/v1/completions as a list of token ids", param="prompt")
        if req.endpoint == "chat":
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ApiError(400, f"the model '{self.model_name}' has no chat template; use /v1/completions",
                               param="messages")
            try:
                enc = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)
            except TemplateError as err:                  # e.g. "roles must alternate user/assistant"
                raise ApiError(400, f"the chat template of '{self.model_name}' refuses these messages: {err}",
                               param="messages") from None
            return list(enc["input_ids"])
        if isinstance(req.prompt, str):
            return self.tokenizer.encode(req.prompt)
        return list(req.prompt)

    # ------------------------------------------------------------------ other routes
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "kvlab",
            "max_model_len": self.max_model_len}]})

    async def health(self, request: Request) -> Response:
        if self.engine.is_running:
            return Response(status_code=200)
        return error_response(ApiError(503, "the engine loop is not running", code="engine_unavailable"))

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def on_error(self, err: ApiError) -> None:
        self.metrics.rejected.labels(err.code or REJECT_REASONS.get(err.status, str(err.status))).inc()


class EngineResponse:
    """The ASGI response of one engine request: the whole answer, or a stream of events.

    Two tasks race: one sends what the engine produces, one waits for the client to
    disconnect. Whichever ends first cancels the other; if the engine request has not
    finished by then, it is aborted (its blocks are freed at the next step boundary).
    """

    def __init__(self, server: OpenAIServer, req: GenerateRequest, stream: RequestStream):
        self.server, self.req, self.stream = server, req, stream

    async def __call__(self, scope, receive, send) -> None:
        sender = asyncio.ensure_future(self._send_events(send) if self.req.stream else self._send_whole(send))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done():
                sender.result()                             # re-raise what went wrong while sending
        finally:
            sender.cancel()
            watcher.cancel()
            if not self.stream.finished:
                self.server.engine.abort(self.req.request_id)

    async def _send_events(self, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache")]})
        encoder = StreamEncoder(self.req, self.server.model_name)
        try:
            async for outputs in self.stream:
                error = engine_error(outputs)
                data = encoder.error(error) if error is not None else encoder.encode(outputs)
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                if error is not None:
                    break
        except EngineDeadError:                            # shutdown: end every choice with "abort"
            await send({"type": "http.response.body", "body": encoder.abort(range(self.req.params.n)),
                        "more_body": True})
        await send({"type": "http.response.body", "body": encoder.close(), "more_body": False})

    async def _send_whole(self, send) -> None:
        final = None
        try:
            async for outputs in self.stream:
                final = outputs[-1]
        except EngineDeadError as err:
            await _send_json(send, 503, ApiError(503, str(err), code="engine_unavailable").body())
            return
        error = engine_error([final])
        if error is not None:
            await _send_json(send, error.status, error.body())
            return
        await _send_json(send, 200, final_response(self.req, final, self.server.model_name))


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


async def read_json(request: Request, max_bytes: int = MAX_BODY_BYTES, timeout: float = REQUEST_READ_TIMEOUT_S):
    """The request body, parsed. Refused: a body that has not all arrived after `timeout` seconds
    (408: a stalled or slowloris client; uvicorn has no body timeout of its own), one above
    max_bytes (413), one that is not JSON or is nested too deeply for the parser (400). Both 408
    and 413 close the connection: the rest of the body is never read. A client that disconnects
    meanwhile raises starlette's ClientDisconnect."""
    try:
        body = await asyncio.wait_for(_read_body(request, max_bytes), timeout)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--request-read-timeout); "
                            f"send it whole, at once", headers={"Connection": "close"}) from None
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:                                  # [[[[...: Python's parser recurses per level
        raise ApiError(400, "the request body is nested too deeply (arrays or objects inside each other, about "
                            "1,000 levels or more); an OpenAI request needs a handful") from None
    except (ValueError, UnicodeDecodeError) as err:         # JSONDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object, e.g. "
                            f'{{"model": ..., "prompt": ...}}') from None


async def _read_body(request: Request, max_bytes: int) -> bytearray:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"the request body is larger than {max_bytes} bytes", headers={"Connection": "close"})
    return body


def error_response(err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class ApiKeyAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <key>` (as vLLM's --api-key); /health and
    /metrics stay open. The key is compared by its SHA-256 digest with hmac.compare_digest, so
    the time taken depends neither on where a guess first differs nor on its length."""

    def __init__(self, app, api_key: str, on_reject=None):
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest()
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self._authorized(scope):
            err = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                                "the key the server was started with (--api-key)", code="invalid_api_key")
            if self.on_reject is not None:
                self.on_reject(err)
            await _send_json(send, 401, err.body(), {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        same = hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.digest)
        return same and scheme.lower() == b"bearer"


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (its fast C parser), with the limits uvicorn leaves out.

    uvicorn times out only an idle keep-alive connection, after a response; a client that opens a
    connection and sends nothing, or half its headers (slowloris), holds it for ever, and its
    header size limit (h11_max_incomplete_event_size) applies to the h11 parser only. Here a
    request's line and headers must arrive within `header_timeout` seconds of the connection or of
    the request's first byte, and within `max_header_bytes`; else the client gets 408 or 431 and
    the connection closes. The body has its own deadline, in read_json. Make one with
    `TimedHttpProtocol.with_limits(...)` and pass it as uvicorn.Config(http=...).
    """
    header_timeout: float = REQUEST_READ_TIMEOUT_S
    max_header_bytes: int = MAX_HEADER_BYTES

    @classmethod
    def with_limits(cls, header_timeout: float, max_header_bytes: int = MAX_HEADER_BYTES) -> type:
        return type(cls.__name__, (cls,), {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes})

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_bytes = 0                 # bytes received while the current request's headers were incomplete
        self._head_timer = None
        self._wait_for_head()

    def on_message_begin(self) -> None:      # the parser saw a request's first byte
        super().on_message_begin()
        self._wait_for_head()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, f"the request line and headers are larger than {self.max_header_bytes} bytes")

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _wait_for_head(self) -> None:
        self._cancel_head_timer()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a response is still going out (a pipelined request waits behind it): look again later
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
            return
        if self._head_bytes == 0 and self.cycle is None:
            self.transport.close()           # a connection that never sent anything: no one to answer
        else:
            self._refuse(408, f"the request's headers did not arrive within {self.header_timeout:g} s "
                              f"(--request-read-timeout)")

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with OpenAI's error JSON, outside any request cycle, and close."""
        self._cancel_head_timer()
        body = to_json(ApiError(status, message).body()).encode()
        self.transport.write(STATUS_LINE[status] + b"content-type: application/json\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()


def build_app(engine: AsyncEngine, model_name: str, *, api_key: str | None = None,
              request_read_timeout: float = REQUEST_READ_TIMEOUT_S) -> Starlette:
    """The ASGI app serving `engine` (AsyncEngine.launch) as `model_name`. The app's start starts
    the threads that talk to the engine core; its end stops the core: requests still in the
    engine are then aborted. request_read_timeout: seconds a request's body may take to arrive
    (read_json). How often a stream gets tokens is the engine's (EngineArgs.stream_interval)."""
    server = OpenAIServer(engine, model_name, request_read_timeout)

    async def completions(request: Request):
        return await server.generate(request, parse_completion)

    async def chat(request: Request):
        return await server.generate(request, parse_chat)

    async def on_api_error(request: Request, err: ApiError):
        server.on_error(err)
        return error_response(err)

    async def on_http_error(request: Request, err: HTTPException):
        return error_response(ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                       code="not_found" if err.status_code == 404 else None))

    async def on_client_gone(request: Request, err: ClientDisconnect):
        logger.debug("%s %s: the client disconnected before its request arrived", request.method, request.url.path)
        return Response(status_code=499)           # nginx's "client closed request"; no one reads it

    async def on_crash(request: Request, err: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(ApiError(500, f"internal server error: {type(err).__name__}: {err}"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            await server.engine.shutdown()
            server.tokenizer_thread.shutdown(wait=False)

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_page, methods=["GET"]),
    ], exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, ClientDisconnect: on_client_gone,
                           Exception: on_crash},
        lifespan=lifespan)
    app.state.server = server
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key, on_reject=server.on_error)
    return app
