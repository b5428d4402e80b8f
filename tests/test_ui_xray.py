"""kvlab.ui.xray and kvlab.ui.xray_app (notebook 07, sections 3-4): the x-ray's reports against the
scheduler's decisions and Hugging Face's tokens, and the EngineXRay widget through its Python API
(errors shown, never raised)."""

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kvlab import SamplingParams  # noqa: E402
from kvlab.ui import xray as ui  # noqa: E402
from kvlab.ui import xray_app  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

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


XRAY_CONFIG = dict(block_size=8, num_kv_blocks=12, max_num_seqs=4, max_num_batched_tokens=32)


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
                num_kv_blocks=8)
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
    w = xray_app.EngineXRay(tiny_llama, xray_script(tiny_llama), **XRAY_CONFIG)
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
    w = xray_app.EngineXRay(tiny_llama, [("ok", "Hello", greedy(2)), ("long", "word " * 80, greedy(2))], block_size=4,
                      num_kv_blocks=8)
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
    monkeypatch.setattr(xray_app, "draw_snapshot", lambda *a, **k: 1 / 0)
    w.back()
    assert "internal error (ZeroDivisionError" in w.message.value and w.shown_step == 1

