"""The engine core: one LLMEngine stepping in a process of its own (vLLM v1's EngineCore).

The server's process handles HTTP: parsing, tokenizing, JSON, one event per token per
stream. The engine's step is Python too (scheduling, metadata, detokenizing). In one
process they would take turns on one interpreter lock (the GIL), and every token a client
receives would slow the batch that produces it. So, as vLLM v1 does, the engine runs here,
in a child process, and talks to the server through two pipes:

    server -> core   lists of commands:  ("add", request_id, prompt_token_ids, params, arrival_time)
                                         ("abort", request_id)         ("stop",)
    core -> server   ("ready", info)                       once the model is loaded
                     ("added", [(request_id, error or None), ...])   the engine's verdict on adds
                     ("step", [packed RequestOutput, ...], EngineStats)   after every step
                     ("stats", EngineStats)                after commands that changed the state
                     ("failed", message)                   the engine raised: it is gone

The loop:

    while True:
        take every command waiting (block only when nothing runs)
        if anything is running or waiting:
            outputs = engine.step()                  # one forward pass for the whole batch
            send them, packed: a few tuples per request, not the prompt again

so requests join the running batch at the step after they arrive (continuous batching
across HTTP clients). Times are time.perf_counter(), the same monotonic clock in both
processes on one machine, so a request's arrival is stamped when its HTTP request came in.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, fields

from kvlab.engine import CompletionOutput, RequestMetrics, RequestOutput


class QueueFullError(Exception):
    """The waiting queue is at its limit: the client should retry later (HTTP 503)."""


@dataclass(frozen=True)
class EngineStats:
    """The engine's live state, sent by the core after every step (read by /metrics)."""
    num_requests_running: int = 0      # requests with a sequence in the running batch
    num_requests_waiting: int = 0      # requests waiting for admission (or re-admission after preemption)
    num_used_blocks: int = 0           # KV blocks held by live sequences
    num_blocks: int = 0                # KV blocks in the pool
    num_preemptions: int = 0           # sequences preempted since start
    num_aborted: int = 0               # requests aborted since start (disconnects, shutdown)
    num_steps: int = 0                 # engine steps since start


# ---- the wire format of an output: what the server needs, nothing more -----------------------------

METRICS_FIELDS = [f.name for f in fields(RequestMetrics)]
RUNNING = RequestMetrics(arrival_time=float("nan"))   # stands in for the metrics of an unfinished request


def pack(out: RequestOutput) -> tuple:
    """A RequestOutput as plain tuples (cheap to pickle); the metrics only once it has finished."""
    metrics = tuple(getattr(out.metrics, f) for f in METRICS_FIELDS) if out.finished else None
    return (out.request_id, out.finished, out.num_cached_tokens, metrics,
            [(o.index, o.text, o.token_ids, o.finish_reason, o.stop_reason) for o in out.outputs])


def unpack(packed: tuple, prompt_token_ids: list[int]) -> RequestOutput:
    request_id, finished, cached, metrics, outputs = packed
    return RequestOutput(request_id, None, prompt_token_ids,
                         [CompletionOutput(i, text, ids, finish_reason=f, stop_reason=s)
                          for i, text, ids, f, s in outputs],
                         finished, RUNNING if metrics is None else RequestMetrics(*metrics), cached)


# ---- the child process --------------------------------------------------------------------------

class EngineCore:
    """Steps one LLMEngine; commands in, packed outputs out (see the module docstring)."""

    def __init__(self, engine, commands, outputs, max_waiting_requests: int):
        self.engine = engine
        self.commands = commands            # multiprocessing Connection: lists of commands from the server
        self.outputs = outputs              # multiprocessing Connection: messages to the server
        self.max_waiting_requests = max_waiting_requests
        self.num_aborted = 0

    def run(self) -> None:
        while self.take_commands(block=not self.engine.has_unfinished_requests()):
            if self.engine.has_unfinished_requests():
                outputs = self.engine.step()
                self.outputs.send(("step", [pack(o) for o in outputs], self.stats()))
        self.abort_all()

    def take_commands(self, block: bool) -> bool:
        """Handle every command waiting (waiting for one if `block`); False once told to stop."""
        if not block and not self.commands.poll():
            return True
        added, changed, keep_going = [], False, True
        while True:
            for command in self.commands.recv():
                kind = command[0]
                if kind == "add":
                    added.append((command[1], self.add(*command[1:])))
                elif kind == "abort":
                    if command[1] in self.engine.scheduler.requests:
                        self.engine.abort_request(command[1])
                        self.num_aborted += 1
                        changed = True
                else:                                        # "stop"
                    keep_going = False
            if not self.commands.poll():
                break
        if added:
            self.outputs.send(("added", added))
        if changed or added:
            self.outputs.send(("stats", self.stats()))
        return keep_going

    def add(self, request_id, prompt_token_ids, params, arrival_time) -> BaseException | None:
        waiting = len(self.engine.scheduler.waiting)
        if waiting >= self.max_waiting_requests:
            return QueueFullError(f"{waiting} requests are waiting, the server's limit (--max-waiting-requests "
                                  f"{self.max_waiting_requests}); retry later")
        try:
            self.engine.add_request(request_id, {"prompt_token_ids": prompt_token_ids}, params,
                                    arrival_time=arrival_time)
        except Exception as err:                             # noqa: BLE001 -- refused; the engine is unchanged
            return err
        return None

    def abort_all(self) -> None:
        left = list(self.engine.scheduler.requests)
        if left:
            self.engine.abort_request(left)
            self.num_aborted += len(left)
        self.outputs.send(("stats", self.stats()))

    def stats(self) -> EngineStats:
        sched, alloc = self.engine.scheduler, self.engine.allocator
        return EngineStats(
            num_requests_running=len({s.request.request_id for s in sched.running}),
            num_requests_waiting=len({s.request.request_id for s in sched.waiting}),
            num_used_blocks=alloc.num_used_blocks, num_blocks=alloc.num_blocks,
            num_preemptions=sched.num_preemptions, num_aborted=self.num_aborted, num_steps=self.engine.num_steps)


def engine_core_main(args, commands, outputs, max_waiting_requests: int) -> None:
    """The child process: load the model, report ready, run the loop until told to stop or orphaned."""
    # Ctrl-C in a terminal signals the whole process group: the server shuts down gracefully and
    # then stops this process itself, so the core ignores SIGINT and SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from kvlab.engine import LLMEngine
    from kvlab.serve.cli import apply_torch_threads, engine_config, load_engine_model

    try:
        apply_torch_threads(args)
        t0 = time.perf_counter()
        engine = LLMEngine(engine_config(args, load_engine_model(args)))
        outputs.send(("ready", {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len,
                                "num_blocks": engine.allocator.num_blocks, "load_time": time.perf_counter() - t0}))
    except Exception as err:                                 # noqa: BLE001 -- reported to the server, which exits
        outputs.send(("failed", f"{type(err).__name__}: {err}"))
        return
    core = EngineCore(engine, commands, outputs, max_waiting_requests)
    try:
        core.run()
    except EOFError:                                         # the server is gone: nothing left to serve
        return
    except Exception as err:                                 # noqa: BLE001 -- a step raised: report, then exit
        import traceback

        outputs.send(("failed", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
