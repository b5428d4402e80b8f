"""AsyncEngine: the server's handle on the one engine loop (kvlab.serve.engine_core), for coroutines.

    engine = AsyncEngine.launch(CoreConfig(EngineArgs(...)))   # child process; returns once the model is loaded
    engine.start()                                         # inside the running event loop
    stream = await engine.add_request("r1", [1, 2, 3], SamplingParams(...))   # raises if refused
    async for outputs in stream: ...                       # RequestOutputs, as steps produce them
    engine.abort("r1")                                     # the client went away
    await engine.shutdown()                                # aborts what is left, stops the core

Every HTTP connection shares this one object and so the one engine: the event loop calls
it, two threads carry the messages (a sender, so that writing a long prompt into the pipe
never blocks the event loop; a reader, which turns each step's message into one event-loop
callback that hands each request its outputs). An add waits for the core's verdict, so a
prompt the engine refuses (too long, empty, queue full) is refused before the HTTP response
starts. An abort is fire-and-forget: the core frees the request's blocks between two steps.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading

from kvlab.engine import EngineStats, RequestOutput, SamplingParams
from kvlab.serve.engine_core import (AbortRequest, AddRequest, Added, CommandError, CoreConfig, Failed, QueueFullError,
                                     Ready, Shutdown, Stats, StepOutputs, engine_core_main)

logger = logging.getLogger("kvlab.serve")

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStats", "QueueFullError", "RequestStream"]


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or it failed): no request can be served."""


class RequestStream:
    """One request's outputs as they arrive from the engine (event-loop side only).

        async for outputs in stream:      # every output since the last iteration (>= 1)
            ...

    Iteration ends after the output marked finished; it raises EngineDeadError if the
    engine stopped first. Outputs that arrive while the reader is busy are handed over
    together, as one batch: one wake-up, one event to the client. How many tokens an output
    holds is the engine's choice (`kvlab serve --stream-interval`, EngineArgs.stream_interval):
    the engine core then builds and sends fewer, larger outputs, and this process sends
    fewer, larger events.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int]):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
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


class AsyncEngine:
    def __init__(self, process, commands, outputs, ready: Ready):
        self.process = process                 # the engine core's process
        self._commands = commands              # Connection: this process -> core
        self._outputs = outputs                # Connection: core -> this process
        self.tokenizer = ready.tokenizer       # None: the engine runs on token ids only
        self.max_model_len = ready.max_model_len
        self.stats = EngineStats(num_blocks=ready.num_blocks)
        self.error: str | None = None
        self.on_finished = None                # callback(RequestOutput), for the metrics
        self.on_dead = None                    # callback(), when the core fails (the server then exits)
        self._streams: dict[str, RequestStream] = {}                  # live requests (event loop only)
        self._adding: dict[str, asyncio.Future] = {}                  # adds waiting for the core's verdict
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = False

    @classmethod
    def launch(cls, config: CoreConfig, timeout: float = 600.0) -> "AsyncEngine":
        """Start the engine core and wait until its model is loaded. Raises RuntimeError with the
        core's message if it cannot start."""
        ctx = multiprocessing.get_context("spawn")           # a fresh interpreter: safe with CUDA
        commands_rx, commands_tx = ctx.Pipe(duplex=False)
        outputs_rx, outputs_tx = ctx.Pipe(duplex=False)
        process = ctx.Process(target=engine_core_main, name="kvlab-engine-core", daemon=True,
                              args=(config, commands_rx, outputs_tx))
        process.start()
        commands_rx.close()
        outputs_tx.close()                                   # EOF on outputs_rx once the core is gone
        try:
            if not outputs_rx.poll(timeout):
                raise RuntimeError(f"the engine core did not load the model within {timeout:.0f} s")
            message = outputs_rx.recv()
        except EOFError:
            message = Failed(f"the engine core exited with status {process.exitcode}")
        except BaseException:
            process.kill()
            raise
        if not isinstance(message, Ready):
            process.join(10)
            raise RuntimeError(f"the engine core could not start: {getattr(message, 'message', message)}")
        return cls(process, commands_tx, outputs_rx, message)

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for target, name in ((self._send_commands, "kvlab-core-sender"), (self._read_outputs, "kvlab-core-reader")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def is_running(self) -> bool:
        return self.error is None and self.process.is_alive() and bool(self._threads)

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          arrival_time: float) -> RequestStream:
        """Queue a request; returns its stream once the core took it. Raises what
        `LLMEngine.add_request` raises (ValueError, TypeError), QueueFullError or EngineDeadError;
        then nothing of the request is left in the engine."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.error or 'shut down'})")
        stream = RequestStream(request_id, prompt_token_ids)
        self._streams[request_id] = stream                   # before the add: no output can be missed
        verdict = self._adding[request_id] = self._loop.create_future()
        self._outbox.put(AddRequest(request_id, prompt_token_ids, params, arrival_time))
        try:
            await verdict
        except asyncio.CancelledError:                      # the client left while we waited
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finally:
            self._adding.pop(request_id, None)
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (if it is still in the engine) and forget its stream."""
        self._streams.pop(request_id, None)
        self._outbox.put(AbortRequest(request_id))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the core: requests still in the engine are aborted, their blocks freed."""
        self._stopping = True
        if self.process.is_alive():
            self._outbox.put(Shutdown())
            await asyncio.to_thread(self.process.join, timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._outbox.put(None)                               # ends the sender thread
        self._fail_all("the server shut down before the request finished")

    # ------------------------------------------------------------------ callbacks on the event loop
    def _on_message(self, message) -> None:
        if isinstance(message, StepOutputs):
            self.stats = message.stats
            for packed in message.outputs:
                stream = self._streams.get(packed.request_id)
                if stream is None and not packed.finished:
                    continue                                  # aborted here, still in the core: drop
                out = packed.unpack(stream.prompt_token_ids if stream else [])
                if out.finished:
                    self._streams.pop(out.request_id, None)
                    if self.on_finished is not None and stream is not None:
                        self.on_finished(out)
                if stream is not None:
                    stream.put(out)
        elif isinstance(message, Added):
            for request_id, error in message.verdicts:
                verdict = self._adding.get(request_id)
                if verdict is not None and not verdict.done():
                    verdict.set_result(None) if error is None else verdict.set_exception(error)
        elif isinstance(message, Stats):
            self.stats = message.stats
        elif isinstance(message, CommandError):
            logger.error("the engine core refused a message: %s", message.message)
        elif isinstance(message, Failed):
            self.error = message.message
            logger.error("the engine core failed: %s", message.message)
            self._fail_all(f"the engine failed: {message.message.splitlines()[0]}")
            if self.on_dead is not None:
                self.on_dead()
        else:
            logger.error("unknown message from the engine core: %r", message)

    def _fail_all(self, message: str) -> None:
        for verdict in self._adding.values():
            if not verdict.done():
                verdict.set_exception(EngineDeadError(message))
        for stream in self._streams.values():
            stream.fail(EngineDeadError(message))
        self._streams.clear()

    # ------------------------------------------------------------------ the two threads
    def _send_commands(self) -> None:
        """Sender thread: every command queued so far, as one message (blocks only this thread)."""
        while True:
            batch = [self._outbox.get()]
            while True:
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            commands = [c for c in batch if c is not None]
            if commands:
                try:
                    self._commands.send(commands)
                except (OSError, ValueError):                 # the core is gone
                    return
            if None in batch:
                return

    def _read_outputs(self) -> None:
        """Reader thread: each message from the core becomes one callback on the event loop."""
        while True:
            try:
                message = self._outputs.recv()
            except (EOFError, OSError):
                if self.error is None and not self._stopping:
                    self._loop.call_soon_threadsafe(self._on_message, Failed("the engine core exited"))
                return
            self._loop.call_soon_threadsafe(self._on_message, message)
