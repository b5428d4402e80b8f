"""Static against continuous batching as timelines: what each request did at each step (notebook 07).

    timeline_from_stats(stats, prompt_lens, num_slots)   requests x steps, from the engine's StepStats
    static_timeline(output_lens, batch_size)             the same requests under static batching
    slot_usage(timeline)                                 the batch's row-steps, counted by what they did
    plot_timelines([static, continuous])                 the two as Gantt charts, one above the other

`timeline_from_stats` reads the engine (StepStats with `record_schedule`); only `static_timeline`
is a model: static batching admits `batch_size` requests at a time in arrival order and runs every
row until the batch's longest request is done (one prefill step, then decode steps), as a server
that pads a batch does (`kvlab.bench.engine.hf_padded`). The step counts of both timelines use the
same unit: a request asking for n tokens needs n steps (its prefill step samples the first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

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
    """The batch's row-steps (one row of the batch for one step), counted by what they did.

        useful                 computed a token a request needed (prefill or decode)
        unused                 every other row-step: `held` by a finished request (static batching's
                               padding) or `empty` (no request in it)
        unused_while_waiting   unused row-steps while a request waited in the queue, at most one per
                               waiting request in that step: the rows a better schedule could have used
        waiting                request-steps spent in the queue

    The fair comparison of two schedules is pair by pair: `unused` against `unused` (what the batch
    computed for nobody, in all), `unused_while_waiting` against `unused_while_waiting` (what it
    withheld from a queue). A row held at the end of a run, with nobody left to admit, is unused but
    not withheld."""
    g = tl.grid
    useful = np.isin(g, (PREFILL, DECODE)).sum(axis=0)          # (steps,)
    held = (g == HELD).sum(axis=0)
    unused = tl.num_slots - useful
    if (unused - held < 0).any():
        raise ValueError(f"a step uses more than num_slots={tl.num_slots} rows")
    waiting = (g == WAITING).sum(axis=0)
    withheld = np.minimum(unused, waiting)
    return dict(steps=tl.num_steps, slots=tl.num_slots, slot_steps=tl.num_slots * tl.num_steps,
                useful=int(useful.sum()), unused=int(unused.sum()), held=int(held.sum()),
                empty=int((unused - held).sum()), unused_while_waiting=int(withheld.sum()), waiting=int(waiting.sum()))


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
        ax.set_title(f"{tl.label}: {u['steps']} steps, {u['useful']} of {u['slot_steps']} row-steps useful; "
                     f"{u['unused']} unused ({u['held']} held by finished requests), "
                     f"{u['unused_while_waiting']} of them while a request waited", fontsize=9)
        ax.set_yticks(range(len(tl.request_ids)), tl.request_ids, fontsize=8)
        ax.set_ylabel("request")
        ax.set_xlim(-0.5, width - 0.5)
    axes[-1].set_xlabel("engine step")
    axes[0].legend(handles=[Patch(facecolor=STATE_COLORS[k], edgecolor="#999999", label=STATE_NAMES[k])
                            for k in (WAITING, PREFILL, DECODE, HELD)],
                   loc="lower center", bbox_to_anchor=(0.5, 1.15), ncol=4, fontsize=8, frameon=False)
    return axes

