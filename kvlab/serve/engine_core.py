"""The engine core: one LLMEngine stepping in a process of its own (vLLM v1's EngineCore).

The server's process handles HTTP: parsing, tokenizing, JSON, one event per token per
stream. The engine's step is Python too (scheduling, inputs, detokenizing). In one process
they would take turns on one interpreter lock (the GIL), and every token a client
receives would slow the batch that produces it. So, as vLLM v1 does, the engine runs here,
in a child process, and talks to the server through two pipes, in typed messages:

    server -> core   lists of requests:    AddRequest(request_id, prompt_token_ids, params, arrival_time)
                                           AbortRequest(request_id)        Shutdown()
    core -> server   Ready(...)            once the model is loaded
                     Added([(request_id, error or None), ...])   the engine's verdict on adds
                     StepOutputs([PackedOutput, ...], EngineStats)   one message per step: the new tokens
                                                                    and text of each request that reports
                     Stats(EngineStats)    after requests that changed the state
                     CommandError(text)    a message the core does not know (the core goes on)
                     Failed(text)          the engine could not start, or its loop died: it is gone

The loop:

    while True:
        take every request waiting (block only when nothing runs)
        if anything is running or waiting:
            outputs = engine.step()                  # one forward pass for the whole batch
            send them as one StepOutputs: a few tuples per request, not the prompt again

so requests join the running batch at the step after they arrive (continuous batching
across HTTP clients). Detokenizing and stop strings stay here, in the engine (kvlab's
OutputProcessor): with asynchronous scheduling they run while the GPU computes the next
step, and the HTTP process is left one job per output, the event. Every output costs this
process Python work (building it, packing it, sending it) that the next step waits for, so
with `--stream-interval k` (EngineArgs.stream_interval) the engine reports a stream's first
token at once and then every k tokens: fewer, larger outputs, here and in the HTTP process.
The core reads only the engine's public API (add_request, abort_request, step, get_stats).
Times are time.perf_counter(), the same monotonic clock in both processes on one machine, so
a request's arrival is stamped when its HTTP request came in.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, fields
from typing import NamedTuple

from kvlab.engine import CompletionOutput, EngineArgs, EngineStats, RequestMetrics, RequestOutput, SamplingParams

logger = logging.getLogger("kvlab.serve")


class QueueFullError(Exception):
    """The waiting queue is at its limit: the client should retry later (HTTP 503)."""


# ---- server -> core --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CoreConfig:
    """What the core process needs to start: the engine's arguments and the process's own settings."""
    engine_args: EngineArgs
    max_waiting_requests: int = 1000       # more waiting requests than this: QueueFullError (HTTP 503)
    torch_threads: int | None = None       # torch.set_num_threads in the core process (None: torch's choice)


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Abort what is left, send the last Stats, and exit."""


# ---- core -> server --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    tokenizer: object                      # None: the engine runs on token ids only
    max_model_len: int
    num_blocks: int
    load_time: float


@dataclass(frozen=True)
class Added:
    verdicts: list[tuple[str, BaseException | None]]


@dataclass(frozen=True)
class StepOutputs:
    outputs: list["PackedOutput"]
    stats: EngineStats

    def __reduce__(self):
        # Sent every step: the outputs go as plain tuples, which pickle about 3x faster than
        # NamedTuples (measured on the course's CPU: 256 one-token outputs, 0.08 against 0.27 ms),
        # and become PackedOutputs again on the other side.
        return _step_outputs, ([tuple(p) for p in self.outputs], self.stats)


@dataclass(frozen=True)
class Stats:
    stats: EngineStats


@dataclass(frozen=True)
class CommandError:
    message: str


@dataclass(frozen=True)
class Failed:
    message: str


# ---- the wire format of an output: what the server needs, nothing more -----------------------------

METRICS_FIELDS = [f.name for f in fields(RequestMetrics)]
RUNNING = RequestMetrics(arrival_time=float("nan"))   # stands in for the metrics of an unfinished request


class PackedOutput(NamedTuple):
    """A RequestOutput as plain tuples (cheap to pickle); the metrics only once it has finished."""
    request_id: str
    finished: bool
    num_cached_tokens: int
    metrics: tuple | None
    completions: list[tuple]               # (index, text, token_ids, finish_reason, stop_reason) per sample

    @classmethod
    def pack(cls, out: RequestOutput) -> "PackedOutput":
        metrics = tuple(getattr(out.metrics, f) for f in METRICS_FIELDS) if out.finished else None
        return cls(out.request_id, out.finished, out.num_cached_tokens, metrics,
                   [(o.index, o.text, o.token_ids, o.finish_reason, o.stop_reason) for o in out.outputs])

    def unpack(self, prompt_token_ids: list[int]) -> RequestOutput:
        return RequestOutput(self.request_id, None, prompt_token_ids,
                             [CompletionOutput(i, text, ids, finish_reason=f, stop_reason=s)
                              for i, text, ids, f, s in self.completions],
                             self.finished, RUNNING if self.metrics is None else RequestMetrics(*self.metrics),
                             self.num_cached_tokens)


def _step_outputs(rows: list[tuple], stats: EngineStats) -> StepOutputs:
    return StepOutputs([PackedOutput._make(r) for r in rows], stats)


# ---- the child process --------------------------------------------------------------------------

class EngineCore:
    """Steps one LLMEngine; requests in, one StepOutputs per step out (see the module docstring)."""

    def __init__(self, engine, commands, outputs, max_waiting_requests: int):
        self.engine = engine
        self.commands = commands            # multiprocessing Connection: lists of requests from the server
        self.outputs = outputs              # multiprocessing Connection: messages to the server
        self.max_waiting_requests = max_waiting_requests

    def run(self) -> None:
        while self.take_requests(block=not self.engine.has_unfinished_requests()):
            if self.engine.has_unfinished_requests():
                outputs = self.engine.step()
                self.outputs.send(StepOutputs([PackedOutput.pack(o) for o in outputs], self.engine.get_stats()))
        self.abort_all()

    def take_requests(self, block: bool) -> bool:
        """Handle every request waiting (waiting for one if `block`); False once told to shut down."""
        if not block and not self.commands.poll():
            return True
        added, changed, keep_going = [], False, True
        while True:
            for message in self.commands.recv():
                if isinstance(message, AddRequest):
                    added.append((message.request_id, self.add(message)))
                elif isinstance(message, AbortRequest):
                    if self.engine.has_request(message.request_id):
                        self.engine.abort_request(message.request_id)
                        changed = True
                elif isinstance(message, Shutdown):
                    keep_going = False
                else:
                    logger.error("engine core: unknown message %r", message)
                    self.outputs.send(CommandError(f"the engine core does not know the message "
                                                   f"{type(message).__name__} ({message!r:.200}); it takes "
                                                   f"AddRequest, AbortRequest and Shutdown"))
            if not self.commands.poll():
                break
        if added:
            self.outputs.send(Added(added))
        if changed or added:
            self.outputs.send(Stats(self.engine.get_stats()))
        return keep_going

    def add(self, message: AddRequest) -> BaseException | None:
        waiting = self.engine.get_stats().num_requests_waiting
        if waiting >= self.max_waiting_requests:
            return QueueFullError(f"{waiting} requests are waiting, the server's limit (--max-waiting-requests "
                                  f"{self.max_waiting_requests}); retry later")
        try:
            self.engine.add_request(message.request_id, {"prompt_token_ids": message.prompt_token_ids},
                                    message.params, arrival_time=message.arrival_time)
        except (ValueError, TypeError) as err:               # refused; the engine is unchanged
            return err
        return None

    def abort_all(self) -> None:
        left = self.engine.unfinished_request_ids()
        if left:
            self.engine.abort_request(left)
        self.outputs.send(Stats(self.engine.get_stats()))


def engine_core_main(config: CoreConfig, commands, outputs) -> None:
    """The child process: load the model, report Ready, run the loop until told to stop or orphaned."""
    # Ctrl-C in a terminal signals the whole process group: the server shuts down gracefully and
    # then stops this process itself, so the core ignores SIGINT and SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from kvlab.engine import LLMEngine

    try:
        if config.torch_threads is not None:
            import torch

            torch.set_num_threads(config.torch_threads)
        t0 = time.perf_counter()
        engine = LLMEngine(config.engine_args)
        outputs.send(Ready(engine.tokenizer, engine.max_model_len, engine.allocator.num_blocks,
                           time.perf_counter() - t0))
    except Exception as err:                                 # noqa: BLE001 -- reported to the server, which exits
        outputs.send(Failed(f"{type(err).__name__}: {err}"))
        return
    core = EngineCore(engine, commands, outputs, config.max_waiting_requests)
    try:
        core.run()
    except EOFError:                                         # the server is gone: nothing left to serve
        return
    except Exception as err:                                 # noqa: BLE001 -- the loop itself broke: report, exit
        import traceback

        outputs.send(Failed(f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
