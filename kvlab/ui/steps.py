"""Where a step's time goes: the host's work and the GPU's, step by step, as two lanes (notebook 07).

    lanes_of(stats, k)              the phases of k consecutive StepStats, ms from the first step's start
    plot_lanes(lanes, ax, title)    a host lane (schedule, prepare, launch, wait, output) over a GPU lane
    plot_sync_async(sync, async_)   the two side by side, on one time axis

Each phase comes from the engine's own timestamps (StepStats.spans, time.perf_counter(); the
GPU's from CUDA events mapped onto the same clock). Synchronous, a step's host work and its GPU
work take turns: the GPU idles while Python schedules, prepares and detokenizes. With
asynchronous scheduling the host plans step N + 1 while the GPU runs step N, and the GPU lane
closes up. On a CPU there is no separate device: the forward pass runs inside "launch", on the
host itself, and the lanes say so (nothing can overlap there).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt

PHASES = {"schedule": "#4c72b0", "prepare": "#55a868", "launch": "#8172b2", "wait": "#dddddd",
          "output": "#dd8452", "device": "#c44e52"}
LABELS = {"schedule": "schedule", "prepare": "prepare inputs", "launch": "launch", "wait": "wait for the ids",
          "output": "outputs (tokens, text)", "device": "GPU works"}


def lanes_of(stats: Sequence, k: int = 5, start: int | None = None) -> list[dict]:
    """k consecutive steps' phases ((start, end) in ms from the first step's start), from the middle
    of `stats` unless `start` says where (kvlab.bench.step_probe.lanes for the same from a benchmark)."""
    from kvlab.bench.step_probe import lanes

    stats = [s for s in stats if s.spans.get("output")]
    start = max(0, len(stats) // 2 - k // 2) if start is None else start
    return lanes(stats[start:start + k])


def plot_lanes(lanes: list[dict], ax=None, title: str = "", device_label: str | None = None):
    """Two lanes for the steps in `lanes`: the host above, the device below (the GPU's span from CUDA
    events; without one, the forward pass ran in "launch", on the host: device_label says so)."""
    if not lanes:
        raise ValueError("no step has timestamps to draw (an engine older than StepStats.spans?)")
    ax = ax or plt.gca()
    for step in lanes:
        for phase in ("schedule", "prepare", "launch", "wait", "output"):
            if phase in step:
                a, b = step[phase]
                ax.barh(1, b - a, left=a, height=0.6, color=PHASES[phase], edgecolor="white", linewidth=0.5)
        device = step.get("device") or (step.get("launch") if device_label else None)
        if device:
            a, b = device
            ax.barh(0, b - a, left=a, height=0.6, color=PHASES["device"], edgecolor="white", linewidth=0.5)
            ax.text((a + b) / 2, 0, str(step["step"]), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks([0, 1], [device_label or "GPU", "host (Python)"])
    ax.set_xlabel("ms")
    ax.set_title(title, fontsize=10)
    return ax


def plot_sync_async(sync: list[dict], async_: list[dict], titles=("synchronous", "asynchronous scheduling"),
                    device_label: str | None = None):
    """The same decode steps without and with asynchronous scheduling, on one time axis."""
    fig, axes = plt.subplots(2, 1, figsize=(10, 3.6), sharex=True)
    for ax, lanes, title in zip(axes, (sync, async_), titles):
        plot_lanes(lanes, ax, title, device_label)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASES.values()]
    axes[0].legend(handles, [LABELS[p] for p in PHASES], ncol=6, fontsize=7, loc="lower center",
                   bbox_to_anchor=(0.5, 1.15), frameon=False)
    fig.tight_layout()
    return fig
