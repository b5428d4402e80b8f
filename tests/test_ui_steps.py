"""kvlab.ui.steps: the host lane and the device lane of a few engine steps, from the engine's own
timestamps (notebook 07, "Where a step's time goes")."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from kvlab import LLM, SamplingParams  # noqa: E402
from kvlab.ui import steps  # noqa: E402


def run(lm, async_scheduling: bool):
    llm = LLM(model=lm, async_scheduling=async_scheduling)
    llm.generate([[5, 6, 7, 8]] * 4, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    return steps.lanes_of(list(llm.engine.stats), k=4)


def test_lanes_show_who_waits_for_whom(tiny_llama):
    """Synchronous: every phase of step k + 1 comes after step k's outputs. Asynchronous: step k + 1 is
    scheduled and launched before step k's ids are collected (its wait and outputs come later)."""
    sync, async_ = run(tiny_llama, False), run(tiny_llama, True)
    assert len(sync) == len(async_) == 4 and [s["step"] for s in sync] == list(range(sync[0]["step"],
                                                                                   sync[0]["step"] + 4))
    assert sync[0]["schedule"][0] == 0.0
    for a, b in zip(sync, sync[1:]):
        assert b["schedule"][0] >= a["output"][1]
    for a, b in zip(async_, async_[1:]):
        assert b["launch"][1] <= a["wait"][0]
    fig = steps.plot_sync_async(sync, async_, device_label="CPU (the host)")
    assert len(fig.axes) == 2 and fig.axes[1].get_yticklabels()[0].get_text() == "CPU (the host)"


def test_nothing_to_draw_says_so():
    with pytest.raises(ValueError, match="no step has timestamps"):
        steps.plot_lanes([])
