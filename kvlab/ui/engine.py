"""Figures and the engine x-ray widget for notebook 07 (continuous batching).

    timeline_from_stats(stats, prompt_lens, num_slots)   requests x steps, from the engine's StepStats
    static_timeline(output_lens, batch_size)             the same requests under static batching
    slot_usage(timeline)                                 useful and idle row-steps, counted
    plot_timelines([static, continuous])                 the two as Gantt charts, one above the other
    XRay(model, requests, ...)                           steps a real engine, one Snapshot per step,
                                                         each with a StepReport: what the scheduler did, and why
    draw_snapshot(snap), plot_snapshots(xray, steps)     the block pool at one step, or at several
    EngineXRay(...)                                      ipywidgets app over XRay: queues, block tables,
                                                         the pool's block grid, the text so far
    plot_race(summaries)                                 tokens/s of each system in a race (kvlab.bench.engine)
    load_bench(path), workload_table, concurrency_series, flat_baselines, gpu_report
    plot_gpu_workloads(result), plot_concurrency(result) the committed GPU results (data/bench/)

Everything drawn is read from the engine (StepStats with `record_schedule`, its queues,
its BlockAllocator) or from the benchmark's JSON; only `static_timeline` is a model: static
batching admits `batch_size` requests at a time in arrival order and runs every row until
the batch's longest request is done (one prefill step, then decode steps), as a server
that pads a batch does (`kvlab.bench.engine.hf_padded`). The step counts of both timelines
use the same unit: a request asking for n tokens needs n steps (its prefill step samples
the first).
"""

from __future__ import annotations

import copy
import html
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvlab.ui.figures import png
from kvlab.ui.paged import CACHED, FREE, PALETTE, draw_pool

# ---------------------------------------------------------------------------- timelines

ABSENT, WAITING, PREFILL, DECODE, HELD = 0, 1, 2, 3, 4     # what one request does in one step
STATE_NAMES = {ABSENT: "not in the system", WAITING: "waiting in the queue", PREFILL: "prefill",
               DECODE: "decode", HELD: "finished, row still held (padding)"}
STATE_COLORS = {ABSENT: "#ffffff", WAITING: "#d9d9d9", PREFILL: "#dd8452", DECODE: "#4c72b0", HELD: "#c44e52"}


@dataclass
class Timeline:
    """What each request did at each step: grid[request, step] is one of ABSENT, WAITING,
    PREFILL, DECODE, HELD. `num_slots` rows are available per step (max_num_seqs, or the
    static batch size)."""
    request_ids: list[str]
    grid: np.ndarray              # int8 (num_requests, num_steps)
    num_slots: int
    label: str = ""

    @property
    def num_steps(self) -> int:
        return self.grid.shape[1]


def timeline_from_stats(stats: Sequence, prompt_lens: dict[str, int], num_slots: int,
                        label: str = "continuous batching") -> Timeline:
    """A Timeline from the engine's StepStats (taken with `engine.record_schedule = True`): each step's
    `scheduled` list says which sequences computed how many tokens. A row computing tokens of its prompt
    (or more than one token: a recompute after a preemption) is PREFILL, a one-token row past the prompt
    DECODE; a request not scheduled before its last step (not yet admitted, or preempted) is WAITING.
    Every request is taken to arrive before the first step (LLM.generate).

    stats: the steps of one run, in order; prompt_lens: request id -> prompt tokens (one sequence per
    request)."""
    stats = list(stats)
    if stats and not any(s.scheduled for s in stats):
        raise ValueError("the steps carry no schedule: set engine.record_schedule = True before stepping")
    ids = list(prompt_lens)
    row = {r: i for i, r in enumerate(ids)}
    grid = np.zeros((len(ids), len(stats)), dtype=np.int8)
    computed = dict.fromkeys(ids, 0)                 # tokens scheduled so far (all steps)
    last = dict.fromkeys(ids, -1)
    for t, s in enumerate(stats):
        for (rid, _index), n in s.scheduled:
            if rid not in row:
                raise ValueError(f"step {s.step} scheduled request {rid!r}, which is not in prompt_lens")
            in_prompt = computed[rid] < prompt_lens[rid]
            grid[row[rid], t] = PREFILL if (n > 1 or in_prompt) else DECODE
            computed[rid] += n
            last[rid] = t
    for rid, i in row.items():
        end = last[rid] if last[rid] >= 0 else len(stats) - 1
        span = grid[i, :end + 1]
        span[span == ABSENT] = WAITING
    return Timeline(ids, grid, num_slots, label)


def static_timeline(output_lens: Sequence[int], batch_size: int, request_ids: Sequence[str] | None = None,
                    label: str = "static batching") -> Timeline:
    """Static batching of the same requests: batches of `batch_size` in arrival order; a batch
    runs max(output_lens in it) steps (prefill, then decodes) and the next batch waits until it is done.
    A row whose request has all its tokens is HELD until the batch ends."""
    outs = [int(n) for n in output_lens]
    if batch_size < 1 or any(n < 1 for n in outs):
        raise ValueError(f"batch_size and every output length must be >= 1, got {batch_size} and {outs}")
    ids = list(request_ids) if request_ids is not None else [str(i) for i in range(len(outs))]
    batches = [list(range(i, min(i + batch_size, len(outs)))) for i in range(0, len(outs), batch_size)]
    total = sum(max(outs[i] for i in b) for b in batches)
    grid = np.zeros((len(outs), total), dtype=np.int8)
    start = 0
    for b in batches:
        length = max(outs[i] for i in b)
        for i in b:
            grid[i, :start] = WAITING
            grid[i, start] = PREFILL
            grid[i, start + 1:start + outs[i]] = DECODE
            grid[i, start + outs[i]:start + length] = HELD
        start += length
    return Timeline(ids, grid, batch_size, label)


def slot_usage(tl: Timeline) -> dict[str, int]:
    """Row-steps (one row of the batch for one step) by what they did:
    useful (prefill or decode of an unfinished request), held (by a finished request: padding),
    empty_while_waiting (a free row while a request waited), empty (a free row, nobody waiting);
    `idle` = held + empty_while_waiting, the slots a better scheduler could have used. `waiting`
    counts request-steps spent in the queue."""
    g = tl.grid
    useful = np.isin(g, (PREFILL, DECODE)).sum(axis=0)
    held = (g == HELD).sum(axis=0)
    free = tl.num_slots - useful - held
    if (free < 0).any():
        raise ValueError(f"a step uses more than num_slots={tl.num_slots} rows")
    waiting = (g == WAITING).sum(axis=0)
    while_waiting = np.minimum(free, waiting)
    out = dict(steps=tl.num_steps, slots=tl.num_slots, slot_steps=tl.num_slots * tl.num_steps,
               useful=int(useful.sum()), held=int(held.sum()), empty_while_waiting=int(while_waiting.sum()),
               empty=int((free - while_waiting).sum()), waiting=int(waiting.sum()))
    out["idle"] = out["held"] + out["empty_while_waiting"]
    return out


def plot_timelines(timelines: Sequence[Timeline], axes=None):
    """One Gantt chart per timeline (requests down, steps across), on a shared step axis."""
    timelines = list(timelines)
    if axes is None:
        n_rows = sum(len(t.request_ids) for t in timelines)
        _, axes = plt.subplots(len(timelines), 1, figsize=(10, 1.2 + 0.28 * n_rows + 0.6 * len(timelines)),
                               sharex=True, squeeze=False, constrained_layout=True)
        axes = axes[:, 0]
    cmap = ListedColormap([STATE_COLORS[k] for k in sorted(STATE_COLORS)])
    width = max(t.num_steps for t in timelines)
    for ax, tl in zip(axes, timelines):
        ax.imshow(tl.grid, cmap=cmap, vmin=-0.5, vmax=len(STATE_COLORS) - 0.5, aspect="auto",
                  interpolation="nearest", extent=(-0.5, tl.num_steps - 0.5, len(tl.request_ids) - 0.5, -0.5))
        u = slot_usage(tl)
        ax.set_title(f"{tl.label}: {u['steps']} steps, {u['useful']} of {u['slot_steps']} row-steps useful, "
                     f"{u['idle']} idle ({u['held']} on finished requests, {u['empty_while_waiting']} empty "
                     f"while requests waited)", fontsize=9)
        ax.set_yticks(range(len(tl.request_ids)), tl.request_ids, fontsize=8)
        ax.set_ylabel("request")
        ax.set_xlim(-0.5, width - 0.5)
    axes[-1].set_xlabel("engine step")
    axes[0].legend(handles=[Patch(facecolor=STATE_COLORS[k], edgecolor="#999999", label=STATE_NAMES[k])
                            for k in (WAITING, PREFILL, DECODE, HELD)],
                   loc="lower center", bbox_to_anchor=(0.5, 1.15), ncol=4, fontsize=8, frameon=False)
    return axes


# ---------------------------------------------------------------------------- the x-ray

@dataclass
class RequestView:
    """One request as it stood after a step."""
    request_id: str
    status: str                   # "not arrived", "waiting", "running", "finished", "refused" (text: why)
    num_prompt_tokens: int
    num_tokens: int               # prompt + generated
    num_computed_tokens: int      # tokens whose K/V are in the cache
    block_table: list[int]
    num_preemptions: int
    text: str
    finish_reason: str | None


@dataclass
class Row:
    """One row of a step's batch: `kind` is prefill, decode or recompute (a preempted request's
    prompt and generated tokens computed again); tokens start..end of the sequence."""
    request_id: str
    kind: str
    start: int
    end: int
    cached: int = 0               # admitted in this step: tokens the prefix cache supplied
    admitted: bool = False
    more: bool = False            # a prefill chunk with more of the prompt to come (chunked prefill)
    order: int = 0                # place in the running queue (admission order)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class StepReport:
    """What the scheduler did in one step, and why the head of the queue (if any) stayed there."""
    step: int
    rows: list[Row]
    preempted: list[str]
    finished: list[tuple[str, str]]          # (request id, finish reason)
    arrived: list[str]
    blocked: str | None                      # why the waiting queue's head was not admitted
    num_scheduled_tokens: int
    free_blocks: int                         # after scheduling (what admission saw last)

    def lines(self) -> list[str]:
        """The report in words, one line per fact."""
        out = [f"step {self.step}: {_n(len(self.rows), 'row')}, {_n(self.num_scheduled_tokens, 'token')}, "
               f"{_n(self.free_blocks, 'block')} free after scheduling"]
        if self.arrived:
            out.append(f"  arrived: {', '.join(self.arrived)}")
        for r in self.preempted:
            out.append(f"  preempted {r}: a decode needed a block and none was free; the newest running request "
                       f"gave its blocks back and waits at the head of the queue, to be recomputed")
        for row in sorted(self.rows, key=lambda r: r.order):       # in admission order
            if row.kind == "decode":
                continue
            what = f"  {'admitted' if row.admitted else 'continues'} {row.request_id}: {row.kind} tokens " \
                   f"{row.start}..{row.end - 1}"
            if row.cached:
                what += f" ({row.cached} tokens from the prefix cache)"
            if row.more:
                what += ", more next step (token budget)"
            out.append(what)
        decodes = [r.request_id for r in self.rows if r.kind == "decode"]
        if decodes:
            out.append(f"  decode: {', '.join(decodes)}")
        for rid, reason in self.finished:
            out.append(f"  finished {rid} ({reason}): its blocks are free")
        if self.blocked:
            out.append(f"  queue head {self.blocked}")
        return out


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


@dataclass
class Snapshot:
    step: int                                # engine steps taken (0: before the first)
    waiting: list[str]
    running: list[str]
    requests: dict[str, RequestView]
    pool: object                             # a copy of the engine's BlockAllocator at that moment
    report: StepReport | None = None


class XRay:
    """Steps a real engine through a script of requests and keeps a Snapshot after each step.

        xray = XRay(lm, [("A", "prompt text", SamplingParams(...), 0), ...], num_kv_blocks=24, block_size=4)
        xray.step()          # one engine step (requests whose arrival step has come are added first)
        xray.run()           # until every request is done
        xray.snapshots[k]    # the state after k steps; .report says what step k did and why

    Each report is the scheduler's own decision (its SchedulerOutput, read through the engine's
    `on_schedule` hook the moment `schedule()` returns, with the pool and queues as it saw them),
    plus who finished after the forward pass.

    requests: (request_id, prompt, SamplingParams[, arrival step]) with n = 1. Engine keywords go to
    EngineConfig (prefix caching on, as the engine's default)."""

    def __init__(self, model, requests: Sequence[tuple], **engine_kwargs):
        from kvlab.engine import EngineConfig, LLMEngine, SamplingParams

        script = []
        for i, r in enumerate(requests):
            if not isinstance(r, (tuple, list)) or len(r) not in (3, 4):
                raise TypeError(f"requests[{i}] must be (request_id, prompt, SamplingParams[, arrival step]), "
                                f"got {r!r}")
            rid, prompt, params, arrival = (*r, 0) if len(r) == 3 else r
            if not isinstance(params, SamplingParams) or params.n != 1:
                raise ValueError(f"requests[{i}]: params must be a SamplingParams with n=1, got {params!r}")
            if isinstance(arrival, bool) or not isinstance(arrival, int) or arrival < 0:
                raise ValueError(f"requests[{i}]: the arrival step must be an integer >= 0, got {arrival!r}")
            script.append((str(rid), prompt, params, arrival))
        if len({r[0] for r in script}) != len(script):
            raise ValueError(f"request ids must be unique, got {[r[0] for r in script]}")
        self.script = script
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.engine.record_schedule = True
        self.colors = {(rid, 0): PALETTE[i % len(PALETTE)] for i, (rid, *_) in enumerate(script)}
        self._requests: dict[str, object] = {}        # request id -> the engine's Request
        self.refused: dict[str, str] = {}             # request id -> why add_request refused it
        self.snapshots: list[Snapshot] = [self._snapshot(0, None)]

    @property
    def done(self) -> bool:
        return len(self._requests) + len(self.refused) == len(self.script) and \
            not self.engine.has_unfinished_requests()

    def step(self) -> Snapshot:
        """Add the requests due now, run one engine step, record and return the new snapshot."""
        if self.done:
            raise RuntimeError("every request is done: nothing left to step")
        engine, sched = self.engine, self.engine.scheduler
        k = len(self.snapshots) - 1                     # engine steps taken so far
        arrived = []
        for rid, prompt, params, arrival in self.script:
            if arrival <= k and rid not in self._requests and rid not in self.refused:
                try:
                    engine.add_request(rid, prompt, params)
                except (ValueError, TypeError) as err:     # the engine refused it: say so, once
                    self.refused[rid] = f"{type(err).__name__}: {err}"
                    raise
                self._requests[rid] = sched.requests[rid]
                arrived.append(rid)
        unfinished = [rid for rid in self._requests if not self._seq(rid).finished]
        waiting = {id(s) for s in sched.waiting}
        decision: dict = {}

        def probe(out):                                 # the scheduler's decision, before the forward pass
            decision["report"] = self._decision(out, waiting, arrived, k + 1)

        engine.on_schedule = probe
        try:
            engine.step()
        finally:
            engine.on_schedule = None
        report = decision.get("report")
        if report is not None and report.rows:
            report.finished = [(rid, self._seq(rid).finish_reason) for rid in unfinished if self._seq(rid).finished]
        else:
            report = None                               # nothing was scheduled (nobody has arrived yet)
        snap = self._snapshot(k + 1, report)
        self.snapshots.append(snap)
        return snap

    def run(self, max_steps: int = 10_000) -> list[Snapshot]:
        while not self.done and len(self.snapshots) <= max_steps:
            self.step()
        return self.snapshots

    def log(self) -> list[str]:
        return [line for s in self.snapshots if s.report for line in s.report.lines()]

    def key_steps(self, limit: int = 6) -> list[int]:
        """Steps in which more happened than decodes: admissions, chunks, preemptions, finishes."""
        keys = [s.step for s in self.snapshots if s.report and (
            s.report.preempted or s.report.finished or any(r.kind != "decode" for r in s.report.rows))]
        return keys[:limit]

    # ------------------------------------------------------------------ internals
    def _seq(self, rid: str):
        return self._requests[rid].sequences[0]

    def _decision(self, out, waiting_before: set, arrived: list[str], step: int) -> StepReport:
        """What the SchedulerOutput `out` says, read the moment schedule() returned."""
        rows = []
        order = {id(s): i for i, s in enumerate(self.engine.scheduler.running)}
        for item in out.scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = item.context_len                    # tokens already cached (after any prefix hit)
            admitted = id(seq) in waiting_before
            if n == 1 and not admitted and start == seq.num_tokens - 1 and start >= seq.num_prompt_tokens:
                kind = "decode"
            elif seq.num_preemptions:
                kind = "recompute"
            else:
                kind = "prefill"
            rows.append(Row(seq.seq_id[0], kind, start, start + n, cached=start if admitted else 0,
                            admitted=admitted, more=not item.samples, order=order.get(id(seq), -1)))
        free = self.engine.allocator.num_free_blocks
        return StepReport(step, rows, [s.seq_id[0] for s in out.preempted], [], arrived,
                          self._why_blocked(out, free), out.num_batched_tokens, free)

    def _why_blocked(self, out, free: int) -> str | None:
        """Why the waiting queue's head was not admitted in this step: the scheduler's admission
        rules (kvlab/engine/scheduler.py, step 3) in the order it checks them, on the state it saw."""
        sched = self.engine.scheduler
        if not sched.waiting:
            return None
        seq = sched.waiting[0]
        rid = seq.seq_id[0]
        if out.preempted:
            return f"{rid} waits: this step preempted, and a step that preempts admits nobody"
        if out.num_batched_tokens >= sched.max_num_batched_tokens:
            return f"{rid} waits: the token budget is spent ({sched.max_num_batched_tokens} tokens per step)"
        if sched.num_rows_in_use >= sched.max_num_seqs:
            return f"{rid} waits: max_num_seqs = {sched.max_num_seqs} sequences are running"
        needed = self.engine.allocator.free_blocks_needed(seq.token_ids)
        keep = sched.watermark_blocks if sched.running else 0
        if needed > free - keep:
            return (f"{rid} waits: it needs {_n(needed, 'free block')} for {seq.num_tokens} tokens, {free} free"
                    + (f", {keep} kept free (watermark)" if keep else ""))
        left = sched.max_num_batched_tokens - out.num_batched_tokens
        if not sched.enable_chunked_prefill and seq.num_tokens > left:
            return (f"{rid} waits: chunked prefill is off, so its {seq.num_tokens} tokens must fit one step, and "
                    f"{left} of the token budget is left")
        return f"{rid} waits, and no admission rule explains why (a bug in the x-ray or the scheduler)"

    def _snapshot(self, step: int, report: StepReport | None) -> Snapshot:
        sched = self.engine.scheduler
        views = {}
        for rid, prompt, params, arrival in self.script:
            if rid not in self._requests:
                status = "refused" if rid in self.refused else "not arrived"
                views[rid] = RequestView(rid, status, 0, 0, 0, [], 0, self.refused.get(rid, ""), None)
                continue
            s = self._seq(rid)
            views[rid] = RequestView(rid, s.status.value, s.num_prompt_tokens, s.num_tokens, s.num_computed_tokens,
                                     list(s.block_table), s.num_preemptions, s.text, s.finish_reason)
        return Snapshot(step, [s.seq_id[0] for s in sched.waiting], [s.seq_id[0] for s in sched.running],
                        views, copy.deepcopy(self.engine.allocator), report)


def draw_snapshot(snap: Snapshot, colors: dict, ax=None, cols: int = 12, title: str | None = None,
                  legend: bool = True):
    """The pool's block grid at a snapshot: each block filled in its request's color, shared
    blocks with a black border and their reference count, freed blocks that keep a prefix-cache
    hash pale green (kvlab.ui.paged.draw_pool)."""
    pool = snap.pool
    if title is None:
        title = (f"after step {snap.step}: {pool.num_free_blocks} of {pool.num_blocks} blocks free"
                 if snap.step else f"before the first step: {pool.num_blocks} blocks of {pool.block_size} slots")
    ax = draw_pool(pool, ax, cols=cols, colors=colors, title=title, show_tables=False)
    if legend:
        handles = [Patch(facecolor=c, label=s[0]) for s, c in colors.items()]
        handles += [Patch(facecolor=FREE, edgecolor="#bbbbbb", label="free"),
                    Patch(facecolor=CACHED, edgecolor="#bbbbbb", label="free, cached prefix")]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    return ax


def plot_snapshots(xray: XRay, steps: Sequence[int], cols: int = 12, width: int = 110):
    """Small multiples: the pool after each of the given steps, titled with what the step did."""
    steps = list(steps)
    rows = -(-xray.snapshots[0].pool.num_blocks // cols)
    titles = []
    for k in steps:
        snap = xray.snapshots[k]
        said = [line.strip() for line in snap.report.lines()[1:]] if snap.report else ["nothing scheduled"]
        head = f"after step {k} ({snap.pool.num_free_blocks} of {snap.pool.num_blocks} blocks free):"
        titles.append("\n".join([head] + [w for line in said for w in textwrap.wrap(line, width)]))
    # placed by hand, in inches, so that every panel's blocks have the same size
    grid_h, line_h, gap = 0.5 * rows, 0.15, 0.25
    text_h = [line_h * (t.count("\n") + 1) for t in titles]
    total = sum(grid_h + h + gap for h in text_h) + 0.1
    fig_w = 10.0
    fig = plt.figure(figsize=(fig_w, total))
    top = total - 0.1
    for i, (k, t, h) in enumerate(zip(steps, titles, text_h)):
        top -= h + 0.05
        ax = fig.add_axes((0.01, (top - grid_h) / total, min(0.75, grid_h * cols / (rows + 0.2) / fig_w),
                           grid_h / total))
        draw_snapshot(xray.snapshots[k], xray.colors, ax, cols=cols, legend=i == 0)
        ax.set_title("")                                    # draw_pool's own title: the text below says more
        ax.set_title(t, fontsize=8, loc="left")
        top -= grid_h + gap - 0.05
    return fig


def snapshot_html(snap: Snapshot, colors: dict, max_text: int = 120) -> str:
    """Queues, every request's block table and text, and the step's report, as HTML."""
    e = html.escape
    report = "<br>".join(e(x) for x in snap.report.lines()) if snap.report else \
        ("no step yet" if snap.step == 0 else f"step {snap.step}: nothing to schedule (no request waiting)")
    rows = []
    for rid, v in snap.requests.items():
        text = v.text if len(v.text) <= max_text else "…" + v.text[-max_text:]
        color = colors.get((rid, 0), "#333333")
        rows.append(f"<tr><td style='color:{color}'><b>{e(rid)}</b></td><td>{e(v.status)}"
                    f"{' (' + e(v.finish_reason) + ')' if v.finish_reason else ''}</td>"
                    f"<td>{v.num_prompt_tokens} + {v.num_tokens - v.num_prompt_tokens if v.num_tokens else 0}</td>"
                    f"<td>{v.num_computed_tokens}</td><td>{e(str(v.block_table))}</td><td>{v.num_preemptions}</td>"
                    f"<td style='text-align:left'>{e(repr(text))}</td></tr>")
    head = ("<tr><th>request</th><th>status</th><th>prompt + generated</th><th>computed</th>"
            "<th>block table</th><th>preempted</th><th style='text-align:left'>text so far</th></tr>")
    queues = (f"<b>waiting</b> [{e(', '.join(snap.waiting)) or '&nbsp;'}] &nbsp; "
              f"<b>running</b> [{e(', '.join(snap.running)) or '&nbsp;'}]")
    return (f"<div style='font-family:monospace;font-size:12px'>{report}<br><br>{queues}"
            f"<table style='font-size:12px'>{head}{''.join(rows)}</table></div>")


class EngineXRay:
    """Step a real engine and watch it: the step's report (who was admitted, chunked, preempted,
    finished, and why the queue's head waits), the waiting and running queues, every request's
    block table and text so far, and the pool's block grid.

    Buttons: back / next (next steps the engine when at the newest snapshot), run to the end,
    reset (a fresh engine). The slider moves over the steps taken. Callbacks never raise: an
    error shows in the message line and the drawing stays at the last step that worked
    (`shown_step`). Arguments as for XRay."""

    def __init__(self, model, requests: Sequence[tuple], cols: int = 12, **engine_kwargs):
        import ipywidgets as W

        self._args = (model, list(requests), dict(engine_kwargs))
        self.cols = cols
        self.error: str | None = None
        self.shown_step: int | None = None
        self.xray = XRay(model, requests, **engine_kwargs)
        self.slider = W.IntSlider(value=0, min=0, max=0, description="step")
        self.back_button, self.next_button = W.Button(description="back"), W.Button(description="next step")
        self.run_button, self.reset_button = W.Button(description="run to the end"), W.Button(description="reset")
        self.message = W.HTML()
        self.info = W.HTML()
        self.image = W.Image(format="png")
        self.back_button.on_click(lambda _: self.back())
        self.next_button.on_click(lambda _: self.next())
        self.run_button.on_click(lambda _: self.run())
        self.reset_button.on_click(lambda _: self.reset())
        self.slider.observe(lambda _: self.show(self.slider.value), names="value")
        self.widget = W.VBox([W.HBox([self.back_button, self.next_button, self.run_button, self.reset_button,
                                      self.slider]), self.message, self.info, self.image])
        self.show(0)

    # the verbs (what the buttons call; each never raises)
    def next(self) -> None:
        k = self.slider.value
        if k < len(self.xray.snapshots) - 1:
            self._go(k + 1)
            return
        self._guard(self.xray.step)
        self._go(len(self.xray.snapshots) - 1)

    def back(self) -> None:
        self.error = None                     # the last error was about stepping forward
        self._go(max(0, self.slider.value - 1))

    def run(self) -> None:
        self._guard(self.xray.run)
        self._go(len(self.xray.snapshots) - 1)

    def reset(self) -> None:
        model, requests, kwargs = self._args
        if self._guard(lambda: setattr(self, "xray", XRay(model, requests, **kwargs))):
            self._go(0)

    def show(self, k: int) -> None:
        """Draw snapshot k (clamped to the steps taken). Never raises."""
        try:
            k = max(0, min(int(k), len(self.xray.snapshots) - 1))
            snap = self.xray.snapshots[k]
            self.info.value = snapshot_html(snap, self.xray.colors)
            fig = Figure(figsize=(10, 0.5 * -(-snap.pool.num_blocks // self.cols) + 1.2), dpi=80)
            draw_snapshot(snap, self.xray.colors, fig.add_subplot(), cols=self.cols)
            fig.subplots_adjust(left=0.02, right=0.8, top=0.85, bottom=0.02)
            self.image.value = png(fig)
            self.shown_step = k
            done = " (every request is done)" if self.xray.done and k == len(self.xray.snapshots) - 1 else ""
            self.message.value = self._error_html() or f"step {k} of {len(self.xray.snapshots) - 1} taken{done}"
        except Exception as err:             # noqa: BLE001  (a callback must not raise: show it)
            self.error = f"internal error ({type(err).__name__}: {err})"
            self.message.value = self._error_html()

    # internals
    def _go(self, k: int) -> None:
        self.slider.max = len(self.xray.snapshots) - 1
        if self.slider.value == k:
            self.show(k)
        else:
            self.slider.value = k             # observe -> show

    def _guard(self, fn) -> bool:
        try:
            fn()
            self.error = None
            return True
        except Exception as err:             # noqa: BLE001  (the engine refused a request, or nothing is left)
            self.error = f"{type(err).__name__}: {err}"
            return False

    def _error_html(self) -> str:
        if not self.error:
            return ""
        return f"<span class='kvlab-message kvlab-error' style='color:#b00020'>⚠ {html.escape(self.error)}</span>"

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


# ---------------------------------------------------------------------------- the race

SYSTEM_LABELS = {"kvlab": "kvlab (continuous batching, paged)", "hf_padded": "HF padded batch",
                 "hf_static_compile": "HF static cache + compile", "hf_continuous": "HF continuous batching",
                 "hf_one_at_a_time": "HF one at a time", "hf_threads": "HF thread per request"}
SHORT_LABELS = {"kvlab": "kvlab", "hf_padded": "HF padded", "hf_static_compile": "HF compile",
                "hf_continuous": "HF continuous", "hf_one_at_a_time": "HF one at a time", "hf_threads": "HF threads"}
SYSTEM_COLORS = {"kvlab": "#55a868", "hf_padded": "#4c72b0", "hf_static_compile": "#8172b3",
                 "hf_continuous": "#937860", "hf_one_at_a_time": "#c44e52", "hf_threads": "#dd8452"}


def _ran(summary: dict) -> bool:
    """A system's summary with tokens and a rate (a failed run has 0 tokens and a NaN rate)."""
    return bool(summary.get("tokens")) and summary["tokens_per_s"] == summary["tokens_per_s"]


def plot_race(summaries: dict[str, dict], ax=None, title: str = "the race", labels: dict | None = None):
    """Generated tokens per second of each system (summaries as `Run.summary()` / the benchmark JSON),
    fastest on top, each bar labelled with its ratio to kvlab. labels: names to show instead of
    SYSTEM_LABELS' for some systems."""
    labels = {**SYSTEM_LABELS, **(labels or {})}
    rows = [(k, v["tokens_per_s"]) for k, v in summaries.items() if _ran(v)]
    rows.sort(key=lambda r: r[1])
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.2), constrained_layout=True)
    ax.barh([labels.get(k, k) for k, _ in rows], [v for _, v in rows],
            color=[SYSTEM_COLORS.get(k, "#8c8c8c") for k, _ in rows])
    ref = summaries.get("kvlab", {}).get("tokens_per_s")
    for i, (k, v) in enumerate(rows):
        note = f"{v:,.0f} tok/s" + (f"  (kvlab {ref / v:.1f}x)" if ref and k != "kvlab" else "")
        ax.text(v, i, " " + note, va="center", fontsize=8)
    ax.set_xlim(0, 1.35 * max(v for _, v in rows))
    ax.set_xlabel("generated tokens per second (higher is better)")
    ax.set_title(title, fontsize=10)
    return ax


# ---------------------------------------------------------------------------- GPU results

GPU_RESULTS = Path(__file__).resolve().parents[2] / "data" / "bench" / "engine_h200.json"   # the committed GPU run


def load_bench(path=GPU_RESULTS) -> dict | None:
    """The benchmark's JSON (python -m kvlab.bench.engine --out PATH), or None if the file is absent."""
    path = Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def workload_table(result: dict, workload: str) -> list[tuple[str, float, float | None]]:
    """(system, tokens/s, kvlab's speed-up over it) for one workload, fastest first; failed runs left out."""
    w = result["workloads"][workload]
    systems = w["systems"]
    kv = systems.get("kvlab", {}).get("tokens_per_s")
    rows = [(k, float(v["tokens_per_s"]), (kv / v["tokens_per_s"]) if kv and k != "kvlab" else None)
            for k, v in systems.items() if _ran(v)]
    return sorted(rows, key=lambda r: -r[1])


def concurrency_series(result: dict) -> dict[str, tuple[list[int], list[float]]]:
    """system -> (request counts, tokens/s) from the result's "concurrency" sweep. Shapes read:
    {"16": {"kvlab": tokens/s, "hf_padded": tokens/s, "ratio": ..., "kvlab_tpot_p50_s": ...}, ...}
    (what kvlab.bench.engine --concurrency writes: numbers under system names, others skipped),
    {"16": run_workload-like dict with "systems", ...} or a list of those (each with "requests"), and
    {"requests": [...], "<system>": [tokens/s, ...]}. Empty if the result has no sweep."""
    sweep = result.get("concurrency")
    if not sweep:
        return {}
    points: dict[str, dict[int, float]] = {}
    if isinstance(sweep, dict) and isinstance(sweep.get("requests"), list):
        ns = [int(n) for n in sweep["requests"]]
        for k, vals in sweep.items():
            if k != "requests" and isinstance(vals, list):
                points[k] = {n: float(v) for n, v in zip(ns, vals) if v is not None}
    else:
        entries = sweep.items() if isinstance(sweep, dict) else ((e.get("requests"), e) for e in sweep)
        for n, entry in entries:
            n = int(entry.get("requests", n))
            rates = {k: v["tokens_per_s"] for k, v in entry.get("systems", {}).items() if _ran(v)}
            rates.update({k: v for k, v in entry.items() if k in SYSTEM_LABELS and isinstance(v, (int, float))})
            for k, v in rates.items():
                if v == v:                                       # NaN: a failed run
                    points.setdefault(k, {})[n] = float(v)
    return {k: (sorted(p), [p[n] for n in sorted(p)]) for k, p in points.items() if p}


def flat_baselines(result: dict, systems=("hf_one_at_a_time",)) -> dict[str, float]:
    """Tokens/s of systems whose throughput does not depend on concurrency (one request at a time),
    from the first workload that ran them."""
    out = {}
    for w in sorted(result.get("workloads", {})):
        for k in systems:
            v = result["workloads"][w]["systems"].get(k)
            if k not in out and v and _ran(v):
                out[k] = float(v["tokens_per_s"])
    return out


def environment_of(result: dict, workload: str | None = None) -> dict:
    """The machine a workload ran on (the JSON keeps one environment, or one per workload)."""
    env = result.get("environment", {})
    if workload is not None and isinstance(env.get(workload), dict):
        return env[workload]
    if "gpu" not in env and env and all(isinstance(v, dict) for v in env.values()):
        return next(iter(env.values()))
    return env


def gpu_caption(result: dict) -> str:
    env = environment_of(result)
    card = result.get("card") or env.get("gpu", "unknown GPU")
    return f"{card.split(' (')[0]}, {str(result.get('date') or env.get('date', 'undated'))[:10]}"


def gpu_report(result: dict) -> list[str]:
    """The GPU run in words: the card, per workload every system's tokens/s, warm-up and kvlab's speed-up
    and kvlab's host share; the concurrency sweep; the decode step against its bandwidth bound."""
    lines = [f"{result.get('card') or gpu_caption(result)}, {result.get('date') or gpu_caption(result).split(', ')[-1]}"]
    if result.get("model"):
        lines.append(f"model: {result['model']}")
    for w in sorted(result.get("workloads", {})):
        res = result["workloads"][w]
        env = environment_of(result, w)
        spec = res.get("spec", {})
        lo, hi = spec.get("prompt_range", ("?", "?"))
        nlo, nhi = spec.get("new_range", ("?", "?"))
        new = f"{nlo}" if nlo == nhi else f"{nlo}..{nhi}"
        lines.append(f"workload {w}: {res['requests']} requests, prompts {lo}..{hi} tokens, {new} new tokens each, "
                     f"{res['generated_tokens']:,} generated (torch {env.get('torch', '?')}, transformers "
                     f"{env.get('transformers', '?')})")
        for k, v, x in workload_table(result, w):
            s = res["systems"][k]
            subset = f" (first {s['num_requests']})" if s.get("num_requests", res["requests"]) < res["requests"] else ""
            lines.append(f"  {SYSTEM_LABELS.get(k, k) + subset:<45} {v:>9,.0f} tok/s   warm-up {s['warmup_s']:>6.1f} s"
                         + (f"   kvlab {x:,.1f}x" if x else ""))
        steps = res["systems"].get("kvlab", {}).get("engine_steps")
        if steps:
            host = steps["schedule_s"] + steps["prepare_s"] + steps["output_s"]
            lines.append(f"  kvlab: {steps['steps']} steps ({steps['cuda_graph_steps']} replayed a CUDA graph); "
                         f"host work (schedule, prepare, outputs) {host / (host + steps['forward_s']):.0%} "
                         f"of the step time")
    series = concurrency_series(result)
    if series:
        flat = flat_baselines(result)
        table = {k: dict(zip(*v)) for k, v in series.items()}
        others = [k for k in table if k != "kvlab"] + list(flat)
        lines.append("concurrency sweep: generated tokens/s, and kvlab's speed-up"
                     + (f" (HF one at a time: {flat['hf_one_at_a_time']:,.1f} tok/s at any concurrency)"
                        if "hf_one_at_a_time" in flat else ""))
        lines.append(f"  {'requests':>8}" + "".join(f"{SHORT_LABELS.get(k, k):>18}" for k in table)
                     + "".join(f"{'kvlab / ' + SHORT_LABELS.get(k, k):>26}" for k in others if "kvlab" in table))
        for n in sorted({n for xs, _ in series.values() for n in xs}):
            row = "".join(f"{table[k][n]:>18,.0f}" if n in table[k] else f"{'-':>18}" for k in table)
            if n in table.get("kvlab", {}):
                for k in others:
                    base = flat.get(k, table.get(k, {}).get(n))
                    row += f"{table['kvlab'][n] / base:>25,.1f}x" if base else f"{'-':>26}"
            lines.append(f"  {n:>8}{row}")
    decode = result.get("decode_step")
    if decode:
        for key in sorted((k for k in decode if k.startswith("batch_")), key=lambda k: int(k.split("_")[1])):
            d = decode[key]
            lines.append(f"decode step at {key.replace('_', ' ')}, context {d['context']}: "
                         f"{d['cuda_graph']['step_ms']:.2f} ms with CUDA graphs ({d['eager']['step_ms']:.2f} ms "
                         f"eager); bandwidth bound {d['bound_ms']:.2f} ms (weights + K/V at "
                         f"{decode['copy_bandwidth_GB_s']:,.0f} GB/s)")
    return lines


def plot_gpu_workloads(result: dict, axes=None):
    """Tokens/s of every system on each GPU workload (log scale: the systems differ by orders of magnitude)."""
    names = sorted(result["workloads"])
    if axes is None:
        _, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 3.4), squeeze=False,
                               constrained_layout=True)
        axes = axes[0]
    for ax, w in zip(axes, names):
        res = result["workloads"][w]
        rows = workload_table(result, w)[::-1]
        ax.barh([SYSTEM_LABELS.get(k, k) for k, _, _ in rows], [v for _, v, _ in rows],
                color=[SYSTEM_COLORS.get(k, "#8c8c8c") for k, _, _ in rows])
        for i, (k, v, x) in enumerate(rows):
            ax.text(v, i, f" {v:,.0f}" + (f" (kvlab {x:,.1f}x)" if x else ""), va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(right=max(v for _, v, _ in rows) * 30)
        ax.set_title(f"workload {w}: {res['requests']} requests, {res['generated_tokens']:,} tokens", fontsize=9)
        ax.set_xlabel(f"generated tokens/s, log scale ({gpu_caption(result)})")
    return axes


def plot_concurrency(result: dict, axes=None):
    """Tokens/s against the number of concurrent requests (left; one request at a time is a flat line:
    its throughput does not depend on how many wait) and kvlab's speed-up over each baseline (right)."""
    series = concurrency_series(result)
    if not series:
        raise ValueError("the result has no 'concurrency' sweep")
    flat = flat_baselines(result)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    a, b = axes
    ns = sorted({n for xs, _ in series.values() for n in xs})
    for k, (xs, vals) in series.items():
        a.plot(xs, vals, "o-", color=SYSTEM_COLORS.get(k, "#8c8c8c"), label=SYSTEM_LABELS.get(k, k))
    for k, v in flat.items():
        a.plot([ns[0], ns[-1]], [v, v], "--", color=SYSTEM_COLORS.get(k, "#8c8c8c"),
               label=f"{SYSTEM_LABELS.get(k, k)} (any concurrency)")
    a.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="generated tokens/s")
    a.set_title(f"throughput ({gpu_caption(result)})", fontsize=9)
    a.legend(fontsize=8)
    if "kvlab" in series:
        kv = dict(zip(*series["kvlab"]))
        bases = {k: dict(zip(*v)) for k, v in series.items() if k != "kvlab"}
        bases.update({k: dict.fromkeys(kv, v) for k, v in flat.items()})
        for k, base in bases.items():
            common = [(n, kv[n] / base[n]) for n in sorted(kv) if base.get(n)]
            if common:
                b.plot(*zip(*common), "o-" if k not in flat else "o--", color=SYSTEM_COLORS.get(k, "#8c8c8c"),
                       label=f"kvlab / {SYSTEM_LABELS.get(k, k)}")
        b.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="kvlab's speed-up (x), log scale")
        b.set_title("kvlab's speed-up against each baseline", fontsize=9)
        b.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
    return axes
