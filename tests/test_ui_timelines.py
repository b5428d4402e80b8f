"""kvlab.ui.timelines (notebook 07, section 2): static and continuous timelines against brute-force
counts and the engine's own step statistics; slot_usage's fair pairs on hand-made grids."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kvlab import LLM, SamplingParams  # noqa: E402
from kvlab.ui import timelines as ui  # noqa: E402
from kvlab.ui.timelines import ABSENT, DECODE, HELD, PREFILL, WAITING  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


# ---------------------------------------------------------------------------- timelines

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_static_timeline_against_a_step_by_step_count(seed, batch_size):
    rng = np.random.default_rng(seed)
    outs = rng.integers(1, 30, rng.integers(1, 12)).tolist()
    tl = ui.static_timeline(outs, batch_size)
    # brute force: walk the batches one step at a time
    step, expected = 0, {}
    for b in range(0, len(outs), batch_size):
        batch = list(range(b, min(b + batch_size, len(outs))))
        longest = max(outs[i] for i in batch)
        for t in range(longest):
            for i in batch:
                expected[i, step] = PREFILL if t == 0 else (DECODE if t < outs[i] else HELD)
            step += 1
    assert tl.num_steps == step
    for i in range(len(outs)):
        for t in range(step):
            assert tl.grid[i, t] == expected.get((i, t), WAITING if t < min(s for (j, s) in expected if j == i)
                                                 else ABSENT), (i, t)
    u = ui.slot_usage(tl)
    assert u == brute_force_usage(tl)
    assert u["useful"] == sum(outs)
    batches = [range(b, min(b + batch_size, len(outs))) for b in range(0, len(outs), batch_size)]
    held = [sum(max(outs[j] for j in b) - outs[i] for i in b) for b in batches]
    assert u["held"] == sum(held)
    assert u["slot_steps"] == batch_size * step == u["useful"] + u["unused"] and u["unused"] == u["held"] + u["empty"]
    # withheld from the queue: held rows of the batches before the last, at most as many per step as requests wait
    assert u["unused_while_waiting"] <= sum(held[:-1])
    if len(outs) >= 2 * batch_size:                  # a full batch waits behind the first: every held row counts
        assert u["unused_while_waiting"] >= held[0]


def brute_force_usage(tl) -> dict:
    """slot_usage, one step and one row at a time."""
    u = dict(steps=tl.num_steps, slots=tl.num_slots, slot_steps=tl.num_slots * tl.num_steps, useful=0, unused=0,
             held=0, empty=0, unused_while_waiting=0, waiting=0)
    for t in range(tl.num_steps):
        col = [int(x) for x in tl.grid[:, t]]
        useful = sum(x in (PREFILL, DECODE) for x in col)
        held = sum(x == HELD for x in col)
        waiting = sum(x == WAITING for x in col)
        u["useful"] += useful
        u["held"] += held
        u["empty"] += tl.num_slots - useful - held
        u["unused"] += tl.num_slots - useful
        u["waiting"] += waiting
        for _ in range(tl.num_slots - useful):          # each unused row could have taken one waiting request
            if waiting:
                u["unused_while_waiting"] += 1
                waiting -= 1
    return u


def test_slot_usage_counts_notebook_07s_fair_pairs():
    """Issue 17: section 2's eight requests on 4 rows. Static batching left 87 row-steps unused (held by
    finished requests); only the first batch's (24-4)+(24-8)+(24-12) = 48 while requests waited.
    Continuous batching withheld none, and left 23 rows empty at the end, with nobody left to admit."""
    asked = [24, 4, 8, 12, 6, 20, 5, 10]
    u = ui.slot_usage(ui.static_timeline(asked, 4))
    assert (u["useful"], u["unused"], u["held"], u["unused_while_waiting"]) == (89, 87, 87, 48)
    # continuous batching of the same requests: a request takes a row the step after one frees (hand-scheduled)
    starts = [0, 0, 0, 0, 4, 8, 10, 12]
    grid = np.zeros((8, 28), np.int8)
    for i, (n, s) in enumerate(zip(asked, starts)):
        grid[i, :s] = WAITING
        grid[i, s] = PREFILL
        grid[i, s + 1:s + n] = DECODE
    tl = ui.Timeline([str(i) for i in range(8)], grid, 4)
    c = ui.slot_usage(tl)
    assert c == brute_force_usage(tl)
    assert (c["steps"], c["useful"], c["unused"], c["unused_while_waiting"]) == (28, 89, 23, 0)


def test_slot_usage_on_a_hand_made_grid():
    grid = np.array([[PREFILL, DECODE, DECODE, ABSENT],
                     [WAITING, WAITING, PREFILL, DECODE],
                     [WAITING, WAITING, WAITING, WAITING]], dtype=np.int8)
    u = ui.slot_usage(ui.Timeline(["a", "b", "c"], grid, num_slots=2))
    # step 0: a works, b and c wait, 1 free row -> 1 empty while waiting; step 1: same; step 2: a, b work;
    # step 3: b works, c waits, 1 free row -> 1 empty while waiting
    assert u == dict(steps=4, slots=2, slot_steps=8, useful=5, unused=3, held=0, empty=3, unused_while_waiting=3,
                     waiting=6)
    with pytest.raises(ValueError, match="more than num_slots=1"):
        ui.slot_usage(ui.Timeline(["a", "b", "c"], grid, num_slots=1))


def test_bad_static_timeline_arguments():
    with pytest.raises(ValueError, match="must be >= 1"):
        ui.static_timeline([3, 0], 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        ui.static_timeline([3], 0)


@pytest.fixture(scope="module")
def continuous_run(tiny_llama):
    """Six requests of mixed lengths, 3 at a time, with a long prompt chunked by a 16-token budget."""
    prompts = ["Hello there", "The capital of France is", "def f(x):", "One two three four five six seven eight "
               "nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen", "Why", "A KV cache stores"]
    asked = [9, 3, 6, 4, 7, 2]
    llm = LLM(model=tiny_llama, max_num_seqs=3, max_num_batched_tokens=16, max_model_len=256)
    llm.engine.record_schedule = True
    outs = llm.generate(prompts, [greedy(n) for n in asked], use_tqdm=False)
    return llm, outs, asked


def test_continuous_timeline_from_the_engines_stats(continuous_run):
    llm, outs, asked = continuous_run
    stats = list(llm.engine.stats)
    lens = {o.request_id: len(o.prompt_token_ids) for o in outs}
    tl = ui.timeline_from_stats(stats, lens, num_slots=3)
    assert tl.num_steps == len(stats) and tl.request_ids == [o.request_id for o in outs]
    for i, (o, n) in enumerate(zip(outs, asked)):
        row = tl.grid[i]
        active = np.flatnonzero(np.isin(row, (PREFILL, DECODE)))
        chunks = -(-lens[o.request_id] // 16)
        assert (row == DECODE).sum() == n - 1                       # every token after the first is a decode
        assert chunks <= (row == PREFILL).sum() <= chunks + 1       # the budget may cut one more chunk
        assert (row[:active[0]] == WAITING).all() and (row[active[-1] + 1:] == ABSENT).all()
        assert (row[active[0]:active[-1] + 1] != ABSENT).all()
    assert (np.isin(tl.grid, (PREFILL, DECODE)).sum(axis=0) == [len(s.scheduled) for s in stats]).all()
    assert ui.slot_usage(tl)["useful"] == sum(len(s.scheduled) for s in stats)
    assert ui.slot_usage(tl) == brute_force_usage(tl)
    # the long prompt (request 3) needed more than one chunk
    assert (tl.grid[3] == PREFILL).sum() >= 2


def test_timeline_needs_record_schedule(tiny_llama):
    llm = LLM(model=tiny_llama, max_model_len=128)
    llm.generate(["Hi"], greedy(2), use_tqdm=False)
    with pytest.raises(ValueError, match="record_schedule"):
        ui.timeline_from_stats(llm.engine.stats, {"0": 1}, 4)


def test_plot_timelines_draws_the_grids():
    a = ui.static_timeline([5, 2, 3], 2, ["x", "y", "z"])
    b = ui.Timeline(["x", "y", "z"], np.array([[2, 3, 3, 3, 3], [2, 3, 0, 0, 0], [1, 1, 2, 3, 3]], np.int8), 2,
                    "continuous")
    axes = ui.plot_timelines([a, b])
    for ax, tl in zip(axes, (a, b)):
        assert np.array_equal(ax.get_images()[0].get_array(), tl.grid)
        u = ui.slot_usage(tl)
        assert f"{u['steps']} steps, {u['useful']} of {u['slot_steps']} row-steps useful; {u['unused']} unused" \
            in ax.get_title()

