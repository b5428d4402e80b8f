"""kvlab.ui.engine (notebook 07): timelines against brute-force counts and the engine's own step
statistics, the x-ray's reports against the scheduler's decisions and Hugging Face's tokens, the
EngineXRay widget through its Python API (errors shown, never raised), and the race and GPU figures
against the numbers they are given."""

import json
import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kvlab import LLM, SamplingParams  # noqa: E402
from kvlab.ui import engine as ui  # noqa: E402
from kvlab.ui.engine import ABSENT, DECODE, HELD, PREFILL, WAITING  # noqa: E402


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
    assert u["useful"] == sum(outs)
    assert u["held"] == sum(max(outs[j] for j in range(b, min(b + batch_size, len(outs)))) - outs[i]
                            for b in range(0, len(outs), batch_size) for i in range(b, min(b + batch_size, len(outs))))
    assert u["slot_steps"] == batch_size * step == u["useful"] + u["held"] + u["empty_while_waiting"] + u["empty"]
    assert u["empty_while_waiting"] == 0 and u["idle"] == u["held"]     # a static batch is full, except the last


def test_slot_usage_on_a_hand_made_grid():
    grid = np.array([[PREFILL, DECODE, DECODE, ABSENT],
                     [WAITING, WAITING, PREFILL, DECODE],
                     [WAITING, WAITING, WAITING, WAITING]], dtype=np.int8)
    u = ui.slot_usage(ui.Timeline(["a", "b", "c"], grid, num_slots=2))
    # step 0: a works, b and c wait, 1 free row -> 1 empty while waiting; step 1: same; step 2: a, b work;
    # step 3: b works, c waits, 1 free row -> 1 empty while waiting
    assert u == dict(steps=4, slots=2, slot_steps=8, useful=5, held=0, empty_while_waiting=3, empty=0, waiting=6,
                     idle=3)
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
        assert f"{u['steps']} steps, {u['useful']} of {u['slot_steps']} row-steps useful" in ax.get_title()


# ---------------------------------------------------------------------------- the x-ray

def xray_script(lm):
    """The notebook's walk-through: chat prompts sharing the template's system prompt (prefix hits), A longer
    than the 32-token budget (chunked), and a 12-block pool too small for all four (preemption). With
    ignore_eos the schedule depends only on lengths, so the tiny random model schedules exactly as the real one."""
    chat = lambda q: lm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                       tokenize=False)
    return [("A", chat("What does a KV cache store?"), greedy(16), 0),
            ("B", chat("Why do servers batch requests?"), greedy(12), 0),
            ("C", chat("Name a prime number."), greedy(8), 2),
            ("D", "def fibonacci(n):", greedy(20), 3)]


XRAY_CONFIG = dict(block_size=8, num_kv_blocks=12, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=256)


@pytest.fixture(scope="module")
def xray(tiny_llama):
    x = ui.XRay(tiny_llama, xray_script(tiny_llama), **XRAY_CONFIG)
    x.run()
    return x


def hf_greedy_text(lm, prompt: str, n: int) -> str:
    ids = torch.tensor([lm.encode(prompt)])
    out = lm.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_xray_hits_every_rule_and_the_text_is_hfs(xray, tiny_llama):
    reports = [s.report for s in xray.snapshots if s.report]
    assert any(r.preempted for r in reports), "the pool is meant to be too small: a preemption"
    assert any(row.cached for r in reports for row in r.rows), "C shares A's prefix: a prefix-cache hit"
    assert any(row.more for r in reports for row in r.rows), "B's prompt is longer than the budget: a chunk"
    assert any(row.kind == "recompute" for r in reports for row in r.rows)
    final = xray.snapshots[-1]
    assert xray.done and final.pool.num_free_blocks == final.pool.num_blocks
    for rid, prompt, params, _ in xray.script:
        v = final.requests[rid]
        assert v.status == "finished" and v.finish_reason == "length"
        assert v.text == hf_greedy_text(tiny_llama, prompt, params.max_tokens), rid     # preemption changed nothing


def test_xray_reports_are_the_engines_steps(xray):
    stats = list(xray.engine.stats)
    reports = [s.report for s in xray.snapshots if s.report]
    assert len(reports) == len(stats)
    for r, s in zip(reports, stats):
        assert [(row.request_id, row.num_tokens) for row in r.rows] == [(rid, n) for (rid, _), n in s.scheduled]
        assert r.num_scheduled_tokens == s.num_scheduled_tokens == sum(row.num_tokens for row in r.rows)
        assert len(r.preempted) == s.num_preempted
        assert sum(row.kind == "decode" for row in r.rows) <= s.num_decode_seqs
    for rid, _, params, _ in xray.script:
        rows = [row for r in reports for row in r.rows if row.request_id == rid]
        samples = [row for row in rows if not row.more]          # rows that computed the last known token
        assert len(samples) == params.max_tokens                 # each samples one token: exactly those asked
        first = next(row for row in rows if row.admitted)
        assert first.start == first.cached


def test_xray_prefix_hit_is_what_the_engine_counted(xray):
    hits = {row.request_id: row.cached for s in xray.snapshots if s.report for row in s.report.rows
            if row.admitted and row.cached}
    assert hits["B"] == hits["C"] == 24                          # the chat template's system prompt: 3 blocks of 8
    shared = [s for s in xray.snapshots if s.report and any(r.request_id == "C" and r.admitted for r in s.report.rows)]
    snap = shared[0]
    a, c = snap.requests["A"].block_table, snap.requests["C"].block_table
    k = hits["C"] // XRAY_CONFIG["block_size"]
    assert a[:k] == c[:k] and all(snap.pool.ref_count(b) == 3 for b in a[:k])     # A, B and C


def test_snapshots_agree_with_the_pool_they_hold(xray):
    for snap in xray.snapshots:
        pool = snap.pool
        running = [rid for rid, v in snap.requests.items() if v.status == "running"]
        assert sorted(running) == sorted(snap.running)
        assert sorted((rid, 0) for rid in running) == sorted(pool.seq_ids())
        for rid, v in snap.requests.items():
            if v.status == "running":
                assert v.block_table == pool.block_table((rid, 0))
            else:
                assert v.block_table == []


def test_why_the_queue_head_waits_is_true(xray):
    """Every 'needs N free blocks, F free' says N > F (minus the watermark); a preempting step admits nobody."""
    seen = set()
    for snap in xray.snapshots:
        r = snap.report
        if r is None:
            continue
        admitted = [row for row in r.rows if row.admitted]
        if r.preempted:
            assert not admitted and (r.blocked is None or "preempted" in r.blocked)
        if r.blocked is None:
            continue
        m = re.search(r"needs (\d+) free blocks? for \d+ tokens, (\d+) free(?:, (\d+) kept free)?", r.blocked)
        if m:
            needed, free, keep = int(m[1]), int(m[2]), int(m[3] or 0)
            assert needed > free - keep and free == r.free_blocks
            seen.add("blocks")
        elif "token budget" in r.blocked:
            assert r.num_scheduled_tokens == XRAY_CONFIG["max_num_batched_tokens"]
            seen.add("budget")
        elif "preempted" in r.blocked:
            seen.add("preempted")
        else:
            assert "max_num_seqs" in r.blocked, r.blocked
    assert {"blocks", "budget", "preempted"} <= seen


def test_queue_head_reasons_rows_and_unchunked_prompts(tiny_llama):
    x = ui.XRay(tiny_llama, [("a", [100, 101, 102], greedy(3)), ("b", [200, 201], greedy(2))], max_num_seqs=1,
                max_num_batched_tokens=8, max_model_len=64)
    assert x.step().report.blocked == "b waits: max_num_seqs = 1 sequences are running"
    x = ui.XRay(tiny_llama, [("a", [100, 101, 102, 103], greedy(3)), ("b", [200, 201, 202, 203, 204, 205], greedy(2))],
                max_num_seqs=4, max_num_batched_tokens=8, enable_chunked_prefill=False, max_model_len=64)
    report = x.step().report
    assert [(r.request_id, r.num_tokens) for r in report.rows] == [("a", 4)]
    assert report.blocked == ("b waits: chunked prefill is off, so its 6 tokens must fit one step, and 4 of the "
                              "token budget is left")
    assert x.step().report.rows[-1].request_id == "b"                 # admitted next step, beside a's decode


def test_plot_snapshots_draws_the_pools_and_says_what_happened(xray):
    steps = xray.key_steps()
    fig = ui.plot_snapshots(xray, steps)
    assert len(fig.axes) == len(steps)
    for ax, k in zip(fig.axes, steps):
        snap = xray.snapshots[k]
        title = ax.get_title(loc="left")
        assert title.startswith(f"after step {k} ({snap.pool.num_free_blocks} of 12 blocks free)")
        assert all(line.strip().split(":")[0] in title for line in snap.report.lines()[1:])
        owned = {b for v in snap.requests.values() for b in v.block_table}
        request_colors = {to_rgba(c) for c in xray.colors.values()}
        filled = [p for p in ax.patches if p.get_facecolor() in request_colors]
        assert len(filled) == len(owned) == snap.pool.num_used_blocks    # one coloured fill per block in use
    assert fig.axes[0].get_legend() is not None and all(ax.get_legend() is None for ax in fig.axes[1:])


def test_arrival_steps_are_honoured(xray):
    arrived = {rid: s.step for s in xray.snapshots if s.report for rid in s.report.arrived}
    assert arrived == {"A": 1, "B": 1, "C": 3, "D": 4}
    assert all(xray.snapshots[k].requests["D"].status == "not arrived" for k in range(4))
    assert xray.key_steps()[0] == 1 and len(xray.key_steps(limit=2)) == 2


def test_xray_bad_scripts_are_refused(tiny_llama):
    with pytest.raises(TypeError, match="requests\\[0\\] must be"):
        ui.XRay(tiny_llama, ["A"], max_model_len=64)
    with pytest.raises(ValueError, match="n=1"):
        ui.XRay(tiny_llama, [("A", "hi", SamplingParams(n=2))], max_model_len=64)
    with pytest.raises(ValueError, match="arrival step"):
        ui.XRay(tiny_llama, [("A", "hi", greedy(2), -1)], max_model_len=64)
    with pytest.raises(ValueError, match="unique"):
        ui.XRay(tiny_llama, [("A", "hi", greedy(2)), ("A", "ho", greedy(2))], max_model_len=64)


def test_a_refused_request_is_said_once_and_the_rest_run(tiny_llama):
    x = ui.XRay(tiny_llama, [("ok", "Hello", greedy(3)), ("long", "word " * 80, greedy(3))], block_size=4,
                num_kv_blocks=8, max_model_len=256)
    with pytest.raises(ValueError, match="'long'"):
        x.step()
    assert x.refused.keys() == {"long"} and x.snapshots[-1].step == 0
    x.run()
    assert x.done and x.snapshots[-1].requests["ok"].status == "finished"
    assert x.snapshots[-1].requests["long"].status == "refused"
    with pytest.raises(RuntimeError, match="nothing left"):
        x.step()


# ---------------------------------------------------------------------------- the widget

def test_engine_xray_widget_steps_and_goes_back(tiny_llama):
    w = ui.EngineXRay(tiny_llama, xray_script(tiny_llama), **XRAY_CONFIG)
    assert w.shown_step == 0 and w.image.value[:4] == b"\x89PNG" and "no step yet" in w.info.value
    w.next()
    assert w.shown_step == w.slider.value == 1 and len(w.xray.snapshots) == 2
    assert "admitted A" in w.info.value and w.error is None
    w.back()
    assert w.shown_step == 0 and len(w.xray.snapshots) == 2          # going back steps nothing
    w.next()
    assert w.shown_step == 1 and len(w.xray.snapshots) == 2          # forward through what was recorded
    w.run()
    last = len(w.xray.snapshots) - 1
    assert w.xray.done and w.shown_step == w.slider.value == w.slider.max == last
    assert "every request is done" in w.message.value
    w.slider.value = 2
    snap = w.xray.snapshots[2]
    assert w.shown_step == 2 and all(str(v.block_table) in w.info.value for v in snap.requests.values())
    w.slider.value = last
    w.next()                                                            # nothing left: said, not raised
    assert "nothing left" in w.error and "kvlab-error" in w.message.value and w.shown_step == last
    w.reset()
    assert w.shown_step == 0 and len(w.xray.snapshots) == 1 and w.error is None and w.slider.max == 0


def test_engine_xray_widget_shows_errors(tiny_llama, monkeypatch):
    w = ui.EngineXRay(tiny_llama, [("ok", "Hello", greedy(2)), ("long", "word " * 80, greedy(2))], block_size=4,
                      num_kv_blocks=8, max_model_len=256)
    w.next()                                                            # the engine refuses 'long' when it arrives
    assert "ValueError: request 'long'" in w.error and "request &#x27;long&#x27;" in w.message.value
    assert w.shown_step == 0
    w.next()
    assert w.error is None and w.shown_step == 1
    w.run()
    last = w.shown_step
    w.next()                                                            # every request done: said, not raised
    assert "nothing left" in w.error and w.shown_step == last
    w.back()                                                            # moving back clears the message
    assert w.error is None and w.shown_step == last - 1 and "kvlab-error" not in w.message.value
    monkeypatch.setattr(ui, "draw_snapshot", lambda *a, **k: 1 / 0)
    w.back()
    assert "internal error (ZeroDivisionError" in w.message.value and w.shown_step == 1


# ---------------------------------------------------------------------------- race and GPU results

def summary(system, tok_s, tokens=100, warmup=1.0):
    return dict(system=system, tokens=tokens, tokens_per_s=tok_s, warmup_s=warmup, wall_s=tokens / tok_s)


def test_plot_race_draws_the_rates_and_ratios():
    race = {"kvlab": summary("kvlab", 40.0), "hf_padded": summary("hf_padded", 25.0),
            "hf_one_at_a_time": summary("hf_one_at_a_time", 10.0), "hf_continuous": summary("hf_continuous", math.nan,
                                                                                               tokens=0)}
    ax = ui.plot_race(race, labels={"hf_padded": "HF static batches of 4"})
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == [10.0, 25.0, 40.0]                                  # the failed run is left out
    assert [t.get_text() for t in ax.get_yticklabels()] == ["HF one at a time", "HF static batches of 4",
                                                             ui.SYSTEM_LABELS["kvlab"]]
    texts = [t.get_text() for t in ax.texts]
    assert any("(kvlab 4.0x)" in t for t in texts) and any("(kvlab 1.6x)" in t for t in texts)


def gpu_result(concurrency):
    systems = {"kvlab": summary("kvlab", 20_000.0, 8192, 7.8), "hf_padded": summary("hf_padded", 1_500.0, 8192, 3.0),
               "hf_static_compile": summary("hf_static_compile", 9_000.0, 8192, 52.0),
               "hf_continuous": summary("hf_continuous", math.nan, 0),
               "hf_one_at_a_time": {**summary("hf_one_at_a_time", 20.0, 1024), "num_requests": 8}}
    systems["kvlab"]["engine_steps"] = dict(steps=130, cuda_graph_steps=127, schedule_s=0.05, prepare_s=0.06,
                                            output_s=0.07, forward_s=0.25)
    return {"environment": {"gpu": "NVIDIA H200", "date": "2026-11-29T15:51:54", "torch": "2.11.0",
                            "transformers": "5.17.0", "git_commit": "4b470bea30a8"},
            "workloads": {"A": {"requests": 64, "generated_tokens": 8192, "systems": systems,
                                "spec": {"prompt_range": [16, 512], "new_range": [128, 128]}}},
            "concurrency": concurrency}


SWEEP = {1: (300.0, 100.0), 16: (4_000.0, 900.0), 64: (15_000.0, 1_500.0)}
SHAPES = {
    "dict of run_workload results": {str(n): {"requests": n, "systems": {"kvlab": summary("kvlab", k),
                                                                         "hf_padded": summary("hf_padded", h)}}
                                     for n, (k, h) in SWEEP.items()},
    "list of run_workload results": [{"requests": n, "systems": {"kvlab": summary("kvlab", k),
                                                                 "hf_padded": summary("hf_padded", h)}}
                                     for n, (k, h) in SWEEP.items()],
    "columns": {"requests": list(SWEEP), "kvlab": [k for k, _ in SWEEP.values()],
                "hf_padded": [h for _, h in SWEEP.values()]},
    "rates under system names (bench.engine --concurrency)": {
        str(n): {"kvlab": k, "hf_padded": h, "ratio": k / h, "kvlab_tpot_p50_s": 0.001, "hf_padded_tpot_p50_s": 0.03}
        for n, (k, h) in SWEEP.items()},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_concurrency_series_reads_every_shape(shape):
    series = ui.concurrency_series(gpu_result(SHAPES[shape]))
    assert series == {"kvlab": ([1, 16, 64], [300.0, 4_000.0, 15_000.0]),
                      "hf_padded": ([1, 16, 64], [100.0, 900.0, 1_500.0])}
    a, b = ui.plot_concurrency(gpu_result(SHAPES[shape]))
    lines = {line.get_label(): line for line in a.get_lines()}
    assert list(lines[ui.SYSTEM_LABELS["kvlab"]].get_ydata()) == [300.0, 4_000.0, 15_000.0]
    assert list(lines["HF one at a time (any concurrency)"].get_ydata()) == [20.0, 20.0]    # workload A's rate
    ratios = {line.get_label(): list(line.get_ydata()) for line in b.get_lines()}
    assert ratios["kvlab / HF padded batch"] == pytest.approx([3.0, 4_000 / 900, 10.0])
    assert ratios["kvlab / HF one at a time"] == pytest.approx([15.0, 200.0, 750.0])


def test_gpu_report_and_figure_from_a_result(tmp_path):
    result = gpu_result(SHAPES["columns"])
    assert ui.load_bench(tmp_path / "absent.json") is None
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(result))
    loaded = ui.load_bench(path)
    assert loaded["environment"] == result["environment"]
    assert ui.workload_table(loaded, "A") == ui.workload_table(result, "A")
    rows = ui.workload_table(result, "A")
    assert [r[0] for r in rows] == ["kvlab", "hf_static_compile", "hf_padded", "hf_one_at_a_time"]   # failed: out
    assert rows[1][2] == pytest.approx(20_000 / 9_000) and rows[0][2] is None
    text = "\n".join(ui.gpu_report(result))
    assert "NVIDIA H200, 2026-11-29" in text and "20,000 tok/s" in text and "kvlab 13.3x" in text
    assert re.search(r"HF one at a time \(first 8\)\s+20 tok/s .* kvlab 1,000.0x", text)
    assert "host work (schedule, prepare, outputs) 42% of the step time" in text      # 0.18 / (0.18 + 0.25)
    assert re.search(r"\n\s+64\s+15,000\s+1,500\s+10.0x\s+750.0x", text)
    (ax,) = ui.plot_gpu_workloads(result)
    assert sorted(p.get_width() for p in ax.patches) == [20.0, 1_500.0, 9_000.0, 20_000.0]
    assert "NVIDIA H200, 2026-11-29" in ax.get_xlabel()
    assert ui.concurrency_series({"workloads": {}}) == {}
    with pytest.raises(ValueError, match="no 'concurrency' sweep"):
        ui.plot_concurrency({"workloads": {}})


@pytest.mark.skipif(ui.load_bench() is None, reason="data/bench/engine_h200.json is not committed")
def test_the_committed_gpu_run_reads_as_written():
    """The notebook's GPU cells on the committed file: every number shown is one in the JSON."""
    result = ui.load_bench()
    series = ui.concurrency_series(result)
    for n, entry in result["concurrency"].items():
        for system in ("kvlab", "hf_padded"):
            ns, rates = series[system]
            assert rates[ns.index(int(n))] == entry[system]
    for w, res in result["workloads"].items():
        shown = {k: v for k, v, _ in ui.workload_table(result, w)}
        assert shown == {k: v["tokens_per_s"] for k, v in res["systems"].items() if v["tokens"]}
    text = "\n".join(ui.gpu_report(result))
    assert result["date"] in text and f"{result['workloads']['A']['systems']['kvlab']['tokens_per_s']:,.0f}" in text
    ui.plot_gpu_workloads(result)
    ui.plot_concurrency(result)
