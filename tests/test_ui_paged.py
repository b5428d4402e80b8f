"""kvlab.ui.paged: operations are checked before they touch the allocator, and the figures of
notebook 05 draw exactly the numbers they are given (read back from the axes)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kvlab.engine.replay import replay  # noqa: E402
from kvlab.paged import BlockAllocator  # noqa: E402
from kvlab.ui import paged as ui  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------- operations

@pytest.mark.parametrize("op, error, message", [
    (("append", "A"), ValueError, "op = ('append', 'A'): 'append' takes 2 arguments"),
    (("allocate", "A"), ValueError, "'allocate' takes 2 arguments (allocate: seq, n_tokens or token ids"),
    (("free",), ValueError, "'free' takes 1 arguments"),
    (("fork", "A", "B", "C"), ValueError, "'fork' takes 2 arguments"),
    (("evict", "A"), ValueError, "unknown operation 'evict'; use allocate, append, fork or free"),
    ((["append"], "A", 1), ValueError, "unknown operation ['append']"),
    ((), TypeError, "op must be a tuple such as ('allocate', 'A', 6), got ()"),
    ("append", TypeError, "op must be a tuple"),
    (("append", "A", 0), ValueError, "append takes a number of tokens >= 1, got 0"),
    (("append", "A", True), ValueError, "append takes a number of tokens >= 1, got True"),
    (("append", "A", 2.0), ValueError, "append takes a number of tokens >= 1, got 2.0"),
    (("allocate", "A", -3), ValueError, "allocate takes a number of tokens >= 1 or a non-empty list of token ids"),
    (("allocate", "A", "abc"), ValueError, "allocate takes a number of tokens >= 1 or a non-empty list"),
    (("allocate", "A", []), ValueError, "allocate takes a number of tokens >= 1 or a non-empty list"),
    (("allocate", ["A"], 3), TypeError, "a sequence id must be hashable (a str, an int, a tuple), got list"),
    (("fork", "A", {"B": 1}), TypeError, "a sequence id must be hashable"),
])
def test_apply_op_refuses_a_malformed_op_before_touching_the_allocator(op, error, message):
    """Regression: apply_op(alloc, ("append", "A")) raised 'not enough values to unpack (expected 3,
    got 2)', and ("append", "A", 0) printed an empty slot list. Setup: A holds 6 tokens in a pool of 4
    blocks of 4; the bad op must raise a message naming it and leave A and the pool as they were."""
    alloc = BlockAllocator(4, 4)
    alloc.allocate_sequence("A", list(range(6)))
    with pytest.raises(error) as info:
        ui.apply_op(alloc, op)
    assert message in str(info.value)
    assert alloc.seq_ids() == ["A"] and alloc.num_tokens("A") == 6 and alloc.num_free_blocks == 2


def test_replay_ops_checks_every_op_before_running_any():
    ops = [("allocate", "A", 6), ("append", "A", 2), ("append", "A")]
    with pytest.raises(ValueError, match=r"ops\[2\] = \('append', 'A'\): 'append' takes 2 arguments"):
        ui.replay_ops(ops, num_blocks=4, block_size=4)
    with pytest.raises(TypeError, match="ops must be a list of operations"):
        ui.replay_ops("allocate", num_blocks=4, block_size=4)
    assert ui.check_ops([["free", "A"]]) == [("free", "A")]          # lists are accepted, as tuples


def test_replay_ops_equals_the_allocator_driven_by_hand():
    """The log is read from the allocator: the same verbs called directly give the same tables."""
    ops = [("allocate", "A", 5), ("allocate", "B", [7, 8, 9]), ("fork", "A", "A2"), ("append", "A2", 4),
           ("free", "B"), ("append", "A", 1)]
    alloc, log = ui.replay_ops(ops, num_blocks=8, block_size=4, free_order=[3, 1, 4, 0, 5, 2, 7, 6])
    ref = BlockAllocator(8, 4, free_order=[3, 1, 4, 0, 5, 2, 7, 6])
    ref.allocate_sequence("A", list(range(1000, 1005)))
    ref.allocate_sequence("B", [7, 8, 9])
    ref.fork("A", "A2")
    a2_slots = [ref.append_token("A2", 0) for _ in range(4)]
    copies = ref.pop_copies()
    ref.free_sequence("B")
    ref.append_token("A", 0)
    assert copies and f"copy-on-write {copies}" in log[3]
    assert f"slots {ui.slot_ranges(a2_slots)}" in log[3]
    for s in ("A", "A2"):
        assert alloc.block_table(s) == ref.block_table(s)
    assert alloc.num_free_blocks == ref.num_free_blocks
    assert log[1] == "allocate B: 3 tokens -> blocks [4]" and log[4] == "free B: blocks [4] back to the free queue"


# ---------------------------------------------------------------- figures

@pytest.fixture(scope="module")
def small_trace():
    """A trace that runs out of blocks: preemptions happen, the pool fills."""
    prompts = [[1] * n for n in (5, 9, 3, 12, 7, 4, 10, 6)]
    outs = [12, 6, 15, 4, 9, 11, 5, 8]
    stats = replay(prompts, outs, num_blocks=12, block_size=4)
    assert stats.preemptions > 0
    return stats


def test_plot_replay_draws_the_trace_and_one_legend_names_every_line(small_trace):
    """Notebook 05 drew blocks in use on a twin axis and left it out of the legend."""
    ax, right = ui.plot_replay(small_trace, num_blocks=12, slab=2)
    lines = ax.get_lines() + right.get_lines()
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), small_trace.running)
    np.testing.assert_array_equal(right.get_lines()[0].get_ydata(), small_trace.used_blocks)
    median = float(np.median(small_trace.running))
    assert [tuple(line.get_ydata()) for line in ax.get_lines()[1:]] == [(median, median), (2, 2)]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == sorted(line.get_label() for line in lines) and len(legend) == 4
    assert right.get_legend() is None
    assert ax.get_xlabel() == "engine step" and ax.get_ylabel() and right.get_ylabel()


def test_plot_prefill_work_stacks_computed_and_cached_tokens():
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] * 3 + [[9, 9, 9, 9, 9]]
    runs = {"off": replay(prompts, [3] * 4, 20, 4, arrival_steps=[0, 2, 4, 6]),
            "on": replay(prompts, [3] * 4, 20, 4, enable_prefix_caching=True, arrival_steps=[0, 2, 4, 6])}
    assert runs["on"].cached_tokens == 16                                  # 2 later copies x 2 full blocks
    ax = ui.plot_prefill_work(runs)
    bars = ax.patches
    assert [b.get_width() for b in bars] == [runs["off"].prefill_tokens, runs["on"].prefill_tokens,
                                             runs["off"].cached_tokens, runs["on"].cached_tokens]
    assert [b.get_x() for b in bars[2:]] == [runs["off"].prefill_tokens, runs["on"].prefill_tokens]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["computed (prefilled)", "from the prefix cache"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["off", "on"]


def test_plot_blocks_in_use_draws_one_line_per_trace(small_trace):
    ax = ui.plot_blocks_in_use({"a": small_trace})
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), small_trace.used_blocks)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a"]
