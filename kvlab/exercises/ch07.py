"""Chapter 07 exercises (notebooks/exercises/07_continuous_batching.ipynb): the scheduler, checked against kvlab's.

    07.1  static_steps(output_lens, batch_size), continuous_steps(output_lens, max_running) -> steps
              how many engine steps the same requests take under static and under continuous batching
    07.2  schedule_step(running, waiting, free_blocks, limits) -> StepPlan
              one step of kvlab's scheduler: decodes first (preempting the newest when a block runs out),
              then prompt chunks, then admissions under the token budget, the free blocks and the watermark

References: `kvlab.engine.replay` (the engine's scheduler on a trace, with no model) counts the
steps of 07.1; for 07.2 the engine's `Scheduler` runs random traces and, at every step, the
learner's function gets the scheduler's state (through `kvlab.exercises.scheduler_adapter`, the
only code here that touches the Scheduler's API) and must return the scheduler's own decision.
"""

from __future__ import annotations

import copy
import random

from kvlab.engine.replay import replay
from kvlab.exercises.harness import (Case, Mismatch, Verdict, compare_equal, passed, run_check, show)
from kvlab.exercises.scheduler_adapter import Limits, Seq, StepPlan, StepState, engine_steps

__all__ = ["Limits", "Seq", "StepPlan", "StepState", "check_batching_steps", "check_schedule_step"]


# ---- 07.1 static against continuous batching, in steps --------------------------------------------

def _replay_steps(output_lens, max_running) -> int:
    """Engine steps for these requests (one-token prompts, all there at step 0, blocks to spare)."""
    n = len(output_lens)
    return replay([[7]] * n, list(output_lens), num_blocks=sum(output_lens) + n + 8, block_size=16,
                  max_running=max_running).steps


def _static_reference(output_lens, batch_size) -> int:
    """Static batching: the engine runs each batch alone, to the end of its longest request."""
    return sum(_replay_steps(output_lens[i:i + batch_size], batch_size)
               for i in range(0, len(output_lens), batch_size))


BATCH_CASES = [
    ("chapter 07's eight requests, 4 at a time", [24, 4, 8, 12, 6, 20, 5, 10], 4),
    ("one request", [7], 3),
    ("equal lengths", [5, 5, 5, 5, 5, 5], 3),
    ("one long request among short ones", [30, 2, 2, 2, 2, 2, 2, 2, 2], 2),
    ("more rows than requests", [4, 9, 2], 8),
    ("one row", [3, 1, 4, 1, 5], 1),
]


def _batch_cases(which: str):
    rng = random.Random(7)
    cases = BATCH_CASES + [(f"random lengths ({seed})", [rng.randint(1, 40) for _ in range(rng.randint(5, 20))],
                            rng.randint(2, 6)) for seed in range(4)]
    for i, (what, lens, b) in enumerate(cases, start=1):
        ref = (lambda l=lens, b=b: _static_reference(l, b)) if which == "static" else \
            (lambda l=lens, b=b: _replay_steps(l, b))
        yield Case(f"case {i}: {what}", (list(lens), b), inputs=f"output_lens {lens}, "
                   f"{'batch_size' if which == 'static' else 'max_running'} {b}", expected=ref,
                   data={"lens": lens, "b": b})


def _static_diagnose(case: Case, got) -> str | None:
    lens, b = case.data["lens"], case.data["b"]
    if got == -(-sum(lens) // b):
        return ("That is perfect packing; in static batching each batch runs until its LONGEST request is done: sum "
                "over the batches (in order, batch_size at a time) of their maximum output length.")
    if got == max(lens) * -(-len(lens) // b):
        return "Each batch runs as long as its own longest request, not the longest of all: take the max per batch."
    return "Cut the requests in order into batches of batch_size; each batch takes max(its output lengths) steps."


def _continuous_diagnose(case: Case, got) -> str | None:
    lens, b = case.data["lens"], case.data["b"]
    if got == -(-sum(lens) // b):
        return ("A request keeps its row for all its steps, and rows free up at different times: simulate the rows. "
                "Each request, in order, takes the row that frees up first.")
    gap, robin = [0] * min(b, len(lens)), [0] * min(b, len(lens))
    for i, n in enumerate(lens):
        gap[gap.index(min(gap))] += n + 1
        robin[i % len(robin)] += n
    found = []
    if got in (max(gap) - 1, max(gap)):
        found.append("A finished request's row is taken by the next request in the very next step (its prefill runs "
                     "beside the others' decodes): no step is lost between two requests on a row.")
    if got == max(robin):
        found.append("Requests do not go to rows in turn (i % max_running): the next request takes whichever row frees "
                     "up first.")
    if found:
        return " Or: ".join(found)
    return ("Keep, per row, the step at which it is free again; each request in order takes the earliest-free row and "
            "holds it for output_len steps (its prefill step samples the first token).")


def check_batching_steps(static_steps, continuous_steps) -> Verdict:
    """07.1: static_steps(output_lens, batch_size) and continuous_steps(output_lens, max_running): engine steps to
    serve the requests under each batching, as kvlab's scheduler (kvlab.engine.replay) takes them."""
    first = run_check(
        "07.1 static_steps", static_steps, _batch_cases("static"),
        compare=lambda e, g: compare_equal(e, g, name="number of steps"), checked="",
        todo="Write the bodies of static_steps and continuous_steps, then run this cell again.",
        diagnose=_static_diagnose)
    if not first.passed:
        return first
    second = run_check(
        "07.1 continuous_steps", continuous_steps, _batch_cases("continuous"),
        compare=lambda e, g: compare_equal(e, g, name="number of steps"), checked="",
        todo="static_steps passed; now write the body of continuous_steps, then run this cell again.",
        diagnose=_continuous_diagnose)
    if not second.passed:
        return second
    n, (_, lens, b) = len(BATCH_CASES) + 4, BATCH_CASES[0]
    return passed("07.1 static_steps, continuous_steps",
                  f"{n} traces each: your step counts equal kvlab's engine (kvlab.engine.replay) run batch by batch "
                  f"(static) and with max_running rows refilled at every step (continuous), including chapter 07's "
                  f"eight requests ({_static_reference(lens, b)} steps against {_replay_steps(lens, b)}).")


# ---- 07.2 one scheduler step ----------------------------------------------------------------------

TRACES = [  # what, prompt lengths, output lengths, engine settings
    ("two requests, plenty of blocks and budget", [5, 9], [4, 6], dict(num_blocks=40, block_size=4, max_running=8,
                                                                     token_budget=1000)),
    ("a token budget of 16: a 30-token prompt is prefilled in chunks while the others decode",
     [30, 5, 12], [6, 8, 5], dict(num_blocks=40, block_size=4, max_running=8, token_budget=16)),
    ("max_running 2: the others wait for a place", [6, 6, 6, 6], [5, 9, 3, 7],
     dict(num_blocks=40, block_size=4, max_running=2, token_budget=64)),
    ("12 blocks for 4 growing requests: decodes run out of blocks and the newest is preempted",
     [8, 8, 8, 8], [12, 12, 12, 12], dict(num_blocks=12, block_size=4, max_running=8, token_budget=64, watermark=0.0)),
    ("a watermark of 4 blocks out of 20: an admission must leave them free while anything runs",
     [32, 28, 12, 4], [6, 6, 6, 6], dict(num_blocks=20, block_size=4, max_running=8, token_budget=96, watermark=0.2)),
]


def _random_traces():
    for seed in range(4):
        rng = random.Random(seed)
        n = 12
        yield (f"random trace {seed + 1}: {n} requests arriving over 15 steps, 30 blocks, budget 24",
               [rng.randint(1, 40) for _ in range(n)], [rng.randint(1, 30) for _ in range(n)],
               dict(num_blocks=30, block_size=4, max_running=6, token_budget=24, watermark=0.1,
                    arrival_steps=sorted(rng.randint(0, 15) for _ in range(n))))


def _plan_of(got) -> StepPlan:
    """Accept a StepPlan, or a (scheduled, preempted) pair."""
    if isinstance(got, StepPlan):
        return got
    if isinstance(got, (tuple, list)) and len(got) == 2 and isinstance(got[0], dict):
        return StepPlan(dict(got[0]), list(got[1]))
    raise Mismatch("schedule_step must return a StepPlan (or a pair: {request_id: tokens}, [preempted ids])", None,
                   show(got, 200))


def _state_text(state: StepState, limits: Limits) -> str:
    return (f"running {state.running}; waiting {state.waiting}; free_blocks {state.free_blocks}; limits: block_size "
            f"{limits.block_size}, token_budget {limits.token_budget}, max_running {limits.max_running}, "
            f"watermark_blocks {limits.watermark_blocks}")


def _plan_text(plan: StepPlan) -> str:
    return f"scheduled {show(plan.scheduled, 400)}, preempted {show(plan.preempted)}"


def _run_trace(schedule_step, case: Case):
    limits, steps = case.data["engine"]()
    for k, (state, want) in enumerate(steps):
        got = _plan_of(schedule_step(copy.deepcopy(state.running), copy.deepcopy(state.waiting), state.free_blocks,
                                     limits))
        if compare_equal(want.scheduled, got.scheduled) is not None or \
                compare_equal(want.preempted, got.preempted) is not None:
            case.inputs = f"step {k + 1} of {len(steps)}: " + _state_text(state, limits)
            raise Mismatch(f"your plan for step {k + 1} differs from kvlab's scheduler's",
                           _plan_text(want), _plan_text(got), _diagnose_step(state, limits, want, got))
    case.data["steps"] = len(steps)
    return "ok"


def _diagnose_step(state: StepState, limits: Limits, want: StepPlan, got: StepPlan) -> str | None:
    bs = limits.block_size
    waiting_ids = [s.request_id for s in state.waiting]
    running = {s.request_id: s for s in state.running}
    admitted = [r for r in got.scheduled if r in waiting_ids]
    decode_ready = [s.request_id for s in state.running if s.num_slots == s.num_computed]
    if sum(got.scheduled.values()) > limits.token_budget:
        return f"Your plan computes {sum(got.scheduled.values())} tokens; the step's token budget is {limits.token_budget}."
    if want.preempted and admitted:
        return "No admissions in a step that preempted someone: the blocks just freed are for the running sequences."
    if want.preempted and not got.preempted:
        return ("A decode whose last block is full needs a new block; when none is free, preempt the newest running "
                "sequence (the last admitted), free its blocks, and try again (recompute preemption).")
    if got.preempted and want.preempted and got.preempted != want.preempted:
        if got.preempted[0] == state.running[0].request_id:
            return "Preempt the NEWEST running sequence (the last one in running), not the oldest."
        return "Preempt newest first, one at a time, only until the decode that needed a block gets one."
    short = [r for r in running if got.scheduled.get(r, 0) < want.scheduled.get(r, 0)]
    if short and admitted:
        return ("Admissions come last: first every decode (oldest first), then the prompt chunks of sequences admitted "
                "earlier, and only then new requests, with what is left of the budget and the blocks. Yours admitted a "
                f"waiting request and gave {short[0]} less than its share.")
    missing = [r for r in decode_ready if r in want.scheduled and r not in got.scheduled]
    if missing:
        return "Every running sequence whose tokens are all computed (num_slots == num_computed) decodes one token."
    for i, r in enumerate(admitted):
        if r not in want.scheduled:
            seq = next(s for s in state.waiting if s.request_id == r)
            if len(state.running) + i + 1 > limits.max_running:
                return f"At most max_running ({limits.max_running}) sequences run at once."
            watermark = limits.watermark_blocks if state.running or i > 0 else 0
            free = state.free_blocks - sum(-(-next(s for s in state.waiting if s.request_id == a).num_tokens // bs)
                                           for a in admitted[:i])
            need = -(-seq.num_tokens // bs)
            if seq.num_tokens // bs <= free - watermark < need:
                return (f"{r} has {seq.num_tokens} tokens: it needs ceil({seq.num_tokens} / {bs}) = {need} blocks (a "
                        f"partly filled last block counts), more than the {free - watermark} it may take.")
            if need <= free < need + watermark:
                return (f"An admission must leave watermark_blocks ({watermark}) free while anything runs, so that the "
                        f"newcomer is not preempted at once: {need} blocks needed, {free} free.")
            return "An admission must fit: ceil(num_tokens / block_size) blocks <= free blocks - watermark_blocks."
    for r in want.scheduled:
        if r in waiting_ids and r not in got.scheduled:
            if not state.running and not admitted:
                return "The watermark applies only while something runs: an empty engine admits the head if it fits."
            return ("Keep admitting, first come first served, while the head of the queue fits (blocks, places, budget); "
                    "a prompt longer than the budget left is admitted and runs its first chunk.")
    for r, n in got.scheduled.items():
        if r in want.scheduled and n != want.scheduled[r]:
            if r in running and running[r].num_slots > running[r].num_computed:
                return ("A sequence still prefilling computes min(its tokens left, the budget left) this step (chunked "
                        "prefill), after the decodes.")
            return "An admitted prompt computes min(num_tokens, the budget left) tokens in its first step."
    return None


def check_schedule_step(schedule_step) -> Verdict:
    """07.2: schedule_step(running, waiting, free_blocks, limits) -> StepPlan equal to kvlab's Scheduler's decision
    at every step of random traces (decodes first with preemption of the newest, then chunks, then admissions)."""
    traces = TRACES + list(_random_traces())

    def cases():
        for i, (what, P, O, kw) in enumerate(traces, start=1):
            yield Case(f"case {i}: {what}", inputs=f"prompt lengths {P}, output lengths {O}, {kw}", expected="ok",
                       call=_run_trace, data={"engine": lambda P=P, O=O, kw=kw: engine_steps(P, O, **kw)})

    return run_check(
        "07.2 schedule_step", schedule_step, cases(),
        compare=lambda e, g: None,
        checked=lambda n: (f"{n} traces, every step: your plan equals kvlab's Scheduler's (the engine's own, run "
                           f"with no model): decodes first, preemption of the newest when a decode needs a block, "
                           f"chunked prefill under the token budget, admissions under max_running, the free blocks and "
                           f"the watermark, none in a step that preempted."),
        todo="Write the body of schedule_step(running, waiting, free_blocks, limits), then run this cell again.",
        generic_hint="Follow the three phases in order: decodes (oldest first), then chunks of sequences still "
                     "prefilling, then admissions from the head of the queue.")
