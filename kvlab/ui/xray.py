"""The engine x-ray: step a real engine and record, after each step, what the scheduler did and why.

    XRay(model, requests, ...)             steps an LLMEngine, one Snapshot per step, each with a
                                           StepReport: rows, admissions, chunks, preemptions, finishes,
                                           and why the head of the queue waits
    draw_snapshot(snap), plot_snapshots(xray, steps)   the block pool at one step, or at several
    snapshot_html(snap)                    queues, block tables and text so far, as HTML

Everything shown is read from the engine: the scheduler's SchedulerOutput through the engine's
`on_schedule` hook, its queues, its BlockAllocator (copied at each step). The widget over it is
kvlab.ui.xray_app.EngineXRay (notebook 07, section 4).
"""

from __future__ import annotations

import copy
import html
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from kvlab.ui.paged import CACHED, FREE, PALETTE, draw_pool


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
    EngineArgs (prefix caching on, as the engine's default)."""

    def __init__(self, model, requests: Sequence[tuple], **engine_kwargs):
        from kvlab.engine import EngineArgs, LLMEngine, SamplingParams

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
        self.engine = LLMEngine(EngineArgs(model=model, **engine_kwargs))
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
        sched = self.engine.scheduler
        order = {id(s): i for i, s in enumerate(sched.running)}
        for seq_id, n in out.num_scheduled_tokens.items():
            seq = sched.sequence(seq_id)
            start = out.num_computed_tokens[seq_id]     # tokens already cached (after any prefix hit)
            admitted = id(seq) in waiting_before
            samples = start + n == seq.num_tokens - 1   # it computes its last token; the one it samples is pending
            if n == 1 and not admitted and samples and start >= seq.num_prompt_tokens:
                kind = "decode"
            elif seq.num_preemptions:
                kind = "recompute"
            else:
                kind = "prefill"
            rows.append(Row(seq_id[0], kind, start, start + n, cached=start if admitted else 0,
                            admitted=admitted, more=not samples, order=order.get(id(seq), -1)))
        free = self.engine.allocator.num_free_blocks
        return StepReport(step, rows, [s[0] for s in out.preempted_seq_ids], [], arrived,
                          self._why_blocked(out, free), out.num_batched_tokens, free)

    def _why_blocked(self, out, free: int) -> str | None:
        """Why the waiting queue's head was not admitted in this step, in words: the scheduler says which
        of its admission rules stopped it (SchedulerOutput.admission_stop); this adds the numbers."""
        from kvlab.engine import scheduler as rules

        sched = self.engine.scheduler
        if out.admission_stop is None or not sched.waiting:
            return None
        seq = sched.waiting[0]
        rid, stop = seq.seq_id[0], out.admission_stop
        if stop == rules.STOP_PREEMPTED:
            return f"{rid} waits: this step preempted, and a step that preempts admits nobody"
        if stop == rules.STOP_BUDGET:
            return f"{rid} waits: the token budget is spent ({sched.max_num_batched_tokens} tokens per step)"
        if stop == rules.STOP_SEQS:
            return f"{rid} waits: max_num_seqs = {sched.max_num_seqs} sequences are running"
        if stop == rules.STOP_BLOCKS:
            needed = self.engine.allocator.free_blocks_needed(seq.token_ids)
            keep = sched.watermark_blocks if sched.running else 0
            return (f"{rid} waits: it needs {_n(needed, 'free block')} for {len(seq.token_ids)} tokens, {free} free"
                    + (f", {keep} kept free (watermark)" if keep else ""))
        if stop == rules.STOP_NO_CHUNKING:
            left = sched.max_num_batched_tokens - out.num_batched_tokens
            return (f"{rid} waits: chunked prefill is off, so its {len(seq.token_ids)} tokens must fit one step, "
                    f"and {left} of the token budget is left")
        return f"{rid} waits: its last token is still being sampled (it was preempted a step ago)"

    def _snapshot(self, step: int, report: StepReport | None) -> Snapshot:
        sched = self.engine.scheduler
        views = {}
        for rid, prompt, params, arrival in self.script:
            if rid not in self._requests:
                status = "refused" if rid in self.refused else "not arrived"
                views[rid] = RequestView(rid, status, 0, 0, 0, [], 0, self.refused.get(rid, ""), None)
                continue
            s, alloc = self._seq(rid), self.engine.allocator
            table = alloc.block_table(s.seq_id) if s.seq_id in alloc else []
            views[rid] = RequestView(rid, s.status.value, s.num_prompt_tokens, s.num_tokens, s.num_computed_tokens,
                                     table, s.num_preemptions, s.text, s.finish_reason)
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
