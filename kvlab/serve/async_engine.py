"""AsyncEngine: one engine loop on its own thread, shared by every HTTP connection.

The engine is not thread-safe, and it should not be: a step is one batch of every running
request, so there is exactly one place that steps it. The server's event loop (asyncio,
one thread) handles the connections; the engine thread runs this loop:

    while True:
        take every command waiting in the inbox:    add a request / abort one / stop
        if anything is running or waiting:
            outputs = engine.step()                  # one forward pass for the whole batch
            hand the outputs to the event loop       # one wake-up per step, not per request

Requests therefore join the running batch at the next step after they arrive: continuous
batching across HTTP clients. The two sides talk only through two queues: the inbox (a
thread-safe queue the engine thread drains between steps) and `loop.call_soon_threadsafe`
(the event loop runs `_dispatch`, which puts each output in its request's `RequestStream`).
An add waits for the engine thread, so that a prompt the engine refuses (too long, empty,
queue full) is refused before the HTTP response starts. An abort is fire-and-forget: the
engine frees the request's blocks at its next step boundary.

vLLM's `AsyncLLM` has the same shape, with the engine core in a separate *process*
(so that HTTP work and the engine do not share one Python interpreter lock).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from kvlab.engine import LLMEngine, RequestOutput, SamplingParams

logger = logging.getLogger("kvlab.serve")


class QueueFullError(Exception):
    """The waiting queue is at its limit: the client should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or a step raised): no request can be served."""


@dataclass(frozen=True)
class EngineStats:
    """The engine's live state, published by the engine thread after every step (read by /metrics)."""
    num_requests_running: int = 0      # requests with a sequence in the running batch
    num_requests_waiting: int = 0      # requests waiting for admission (or re-admission after preemption)
    num_used_blocks: int = 0           # KV blocks held by live sequences
    num_blocks: int = 0                # KV blocks in the pool
    num_preemptions: int = 0           # sequences preempted since start
    num_aborted: int = 0               # requests aborted since start (disconnects, shutdown)
    num_steps: int = 0                 # engine steps since start


class RequestStream:
    """One request's outputs as they arrive from the engine (event-loop side only).

        async for outputs in stream:      # every output since the last iteration (>= 1)
            ...

    Iteration ends after the output marked finished; it raises EngineDeadError if the
    engine stopped first.
    """

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.finished = False
        self._pending: list[RequestOutput] = []
        self._ready = asyncio.Event()
        self._error: BaseException | None = None

    def put(self, output: RequestOutput) -> None:
        self._pending.append(output)
        self.finished = self.finished or output.finished
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def __aiter__(self):
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._pending = self._pending, []
            if batch:
                yield batch
            if self.finished and not self._pending:
                return
            if self._error is not None and not self._pending:
                raise self._error


@dataclass
class _Add:
    request_id: str
    prompt: object
    params: SamplingParams
    arrival_time: float
    done: asyncio.Future


_STOP = object()


class AsyncEngine:
    """Runs `engine` on one background thread; coroutines add, stream and abort requests.

        ae = AsyncEngine(engine, max_waiting_requests=1000)
        ae.start()                                            # inside the running event loop
        stream = await ae.add_request("r1", [1, 2, 3], SamplingParams(...))   # raises on refusal
        async for outputs in stream: ...
        ae.abort("r1")                                        # if the client went away
        await ae.shutdown()                                   # aborts what is left, joins the thread
    """

    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 1000):
        if not isinstance(max_waiting_requests, int) or max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be an integer >= 1, got {max_waiting_requests!r}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.stats = EngineStats(num_blocks=engine.allocator.num_blocks)
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}          # event-loop side only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._num_aborted = 0                                 # engine-thread side only
        self.on_finished = None                               # callback(RequestOutput) for metrics

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvlab-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    async def add_request(self, request_id: str, prompt, params: SamplingParams,
                          arrival_time: float | None = None) -> RequestStream:
        """Queue a request for the engine thread; returns its stream once the engine took it.
        Raises what `LLMEngine.add_request` raises (ValueError, TypeError), QueueFullError, or
        EngineDeadError; then nothing of the request is left in the engine."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running (shutting down, or it failed)")
        stream = RequestStream(request_id)
        self._streams[request_id] = stream                   # before the add: no output can be missed
        done = self._loop.create_future()
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        self._inbox.put(_Add(request_id, prompt, params, arrival, done))
        try:
            await done
        except asyncio.CancelledError:                      # the client left while we waited
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (if it is still in the engine) and forget its stream."""
        self._streams.pop(request_id, None)
        self._inbox.put(("abort", request_id))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine loop: requests still in the engine are aborted, their blocks freed."""
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join, timeout)
        for stream in list(self._streams.values()):
            stream.fail(EngineDeadError("the server shut down before the request finished"))
        self._streams.clear()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
                if self.on_finished is not None:
                    self.on_finished(out)
            if stream is not None:
                stream.put(out)

    def _resolve(self, results: list[tuple[asyncio.Future, BaseException | None]]) -> None:
        for done, error in results:
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.fail(EngineDeadError(f"the engine loop failed: {error!r}"))
        self._streams.clear()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while self._take_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._publish()
                    if outputs:
                        self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as err:                         # a step raised: the engine is unusable
            logger.exception("kvlab engine loop failed")
            self.error = err
            self._loop.call_soon_threadsafe(self._fail_all, err)
        finally:
            self._abort_all()

    def _take_commands(self, block: bool) -> bool:
        """Handle every command in the inbox (waiting for one if `block`); False on stop."""
        results = []
        keep_going = True
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if command is _STOP:
                    keep_going = False
                elif isinstance(command, _Add):
                    results.append((command.done, self._add(command)))
                else:
                    _, request_id = command
                    if request_id in self.engine.scheduler.requests:
                        self.engine.abort_request(request_id)
                        self._num_aborted += 1
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass
        if results:
            self._loop.call_soon_threadsafe(self._resolve, results)
        self._publish()
        return keep_going

    def _add(self, add: _Add) -> BaseException | None:
        if len(self.engine.scheduler.waiting) >= self.max_waiting_requests:
            return QueueFullError(f"{len(self.engine.scheduler.waiting)} requests are waiting, the server's limit "
                                  f"(--max-waiting-requests {self.max_waiting_requests}); retry later")
        try:
            self.engine.add_request(add.request_id, add.prompt, add.params, arrival_time=add.arrival_time)
        except (ValueError, TypeError) as err:
            return err
        except Exception as err:                             # noqa: BLE001 -- refused, the engine is unchanged
            logger.exception("add_request(%s) failed", add.request_id)
            return err
        return None

    def _abort_all(self) -> None:
        left = list(self.engine.scheduler.requests)
        if left:
            self.engine.abort_request(left)
            self._num_aborted += len(left)
        self._publish()

    def _publish(self) -> None:
        sched, alloc = self.engine.scheduler, self.engine.allocator
        self.stats = EngineStats(
            num_requests_running=len({s.request.request_id for s in sched.running}),
            num_requests_waiting=len({s.request.request_id for s in sched.waiting}),
            num_used_blocks=alloc.num_used_blocks, num_blocks=alloc.num_blocks,
            num_preemptions=sched.num_preemptions, num_aborted=self._num_aborted, num_steps=self.engine.num_steps)
