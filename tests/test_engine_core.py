"""The engine core alone, through its typed messages (issue 16), in a thread of this process with the
same pipes the server uses: adds and their verdicts, one StepOutputs per step whose tokens equal
LLM.generate's, a full queue, an abort, an unknown message (an error the core survives, not a stop),
and a shutdown that aborts what is left.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from kvlab import LLM, SamplingParams
from kvlab.engine import EngineArgs, LLMEngine
from kvlab.serve.engine_core import (AbortRequest, Added, AddRequest, CommandError, EngineCore, QueueFullError,
                                     Shutdown, Stats, StepOutputs)

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture
def core(tiny_llama):
    commands_rx, commands_tx = multiprocessing.Pipe(duplex=False)
    outputs_rx, outputs_tx = multiprocessing.Pipe(duplex=False)
    engine = LLMEngine(EngineArgs(model=tiny_llama, async_scheduling=True))
    core = EngineCore(engine, commands_rx, outputs_tx, max_waiting_requests=2)
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()
    yield commands_tx, outputs_rx, engine
    commands_tx.send([Shutdown()])
    thread.join(30)
    assert not thread.is_alive()


def receive(outputs_rx, until, timeout: float = 60.0) -> list:
    """Messages from the core until one satisfies `until` (all of them, in order)."""
    messages, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outputs_rx.poll(0.1):
            messages.append(outputs_rx.recv())
            if until(messages[-1]):
                return messages
    raise AssertionError(f"the core did not answer in {timeout} s; got {messages}")


def finished(request_id):
    return lambda m: isinstance(m, StepOutputs) and any(p.request_id == request_id and p.finished for p in m.outputs)


def tokens_of(messages, request_id) -> list[int]:
    """The request's tokens in its last output (the default output kind is cumulative)."""
    outs = [p for m in messages if isinstance(m, StepOutputs) for p in m.outputs if p.request_id == request_id]
    return outs[-1].completions[0][2]


def test_adds_steps_and_outputs(core, tiny_llama):
    tx, rx, engine = core
    prompts = {"a": [5, 6, 7], "b": [8, 9, 10, 11]}
    tx.send([AddRequest(rid, p, GREEDY, time.perf_counter()) for rid, p in prompts.items()])
    messages = receive(rx, finished("b"))
    assert isinstance(messages[0], Added) and messages[0].verdicts == [("a", None), ("b", None)]
    steps = [m for m in messages if isinstance(m, StepOutputs)]
    assert all(len({p.request_id for p in m.outputs}) == len(m.outputs) for m in steps)   # one message a step
    ref = LLM(model=tiny_llama).generate(list(prompts.values()), GREEDY, use_tqdm=False)
    assert [tokens_of(messages, rid) for rid in prompts] == [o.outputs[0].token_ids for o in ref]
    assert steps[-1].stats.num_used_blocks == 0


def test_refusals_a_full_queue_and_an_abort(core):
    tx, rx, engine = core
    long = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    tx.send([AddRequest("bad", [10**6], GREEDY, time.perf_counter()),
             AddRequest("x", [1, 2], long, time.perf_counter()), AddRequest("y", [3, 4], long, time.perf_counter()),
             AddRequest("z", [5, 6], long, time.perf_counter())])
    added = receive(rx, lambda m: isinstance(m, Added))[-1]
    verdicts = dict(added.verdicts)
    assert isinstance(verdicts["bad"], ValueError) and "outside the vocabulary" in str(verdicts["bad"])
    assert verdicts["x"] is None and verdicts["y"] is None and isinstance(verdicts["z"], QueueFullError)
    tx.send([AbortRequest("x"), AbortRequest("y")])
    stats = receive(rx, lambda m: isinstance(m, Stats) and m.stats.num_aborted == 2)[-1].stats
    assert stats.num_requests_running == stats.num_requests_waiting == 0


def test_an_unknown_message_is_an_error_and_the_core_keeps_serving(core, tiny_llama):
    tx, rx, engine = core
    tx.send(["stop"])                               # the old wire format's stop: now refused, not obeyed
    error = receive(rx, lambda m: isinstance(m, CommandError))[-1]
    assert "does not know the message str" in error.message and "Shutdown" in error.message
    tx.send([AddRequest("after", [5, 6, 7], GREEDY, time.perf_counter())])
    messages = receive(rx, finished("after"))
    assert tokens_of(messages, "after") == LLM(model=tiny_llama).generate(
        [[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_shutdown_aborts_what_is_left(tiny_llama):
    commands_rx, commands_tx = multiprocessing.Pipe(duplex=False)
    outputs_rx, outputs_tx = multiprocessing.Pipe(duplex=False)
    engine = LLMEngine(EngineArgs(model=tiny_llama))
    core = EngineCore(engine, commands_rx, outputs_tx, max_waiting_requests=10)
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()
    commands_tx.send([AddRequest("long", [1, 2, 3], SamplingParams(temperature=0, max_tokens=10_000,
                                                                   ignore_eos=True), time.perf_counter())])
    receive(outputs_rx, lambda m: isinstance(m, StepOutputs))
    commands_tx.send([Shutdown()])
    thread.join(30)
    assert not thread.is_alive()
    last = receive(outputs_rx, lambda m: isinstance(m, Stats) and m.stats.num_aborted == 1)[-1]
    assert last.stats.num_used_blocks == 0 and not engine.has_unfinished_requests()
