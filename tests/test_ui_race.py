"""kvlab.ui.race (notebook 07, section 6): the race and GPU figures and tables against the numbers they are
given, and on the committed GPU run (every number shown is one in the JSON)."""

import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from kvlab.bench import results  # noqa: E402
from kvlab.ui import race as ui  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


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


def gpu_result():
    systems = {"kvlab": summary("kvlab", 20_000.0, 8192, 7.8), "hf_padded": summary("hf_padded", 1_500.0, 8192, 3.0),
               "hf_static_compile": summary("hf_static_compile", 9_000.0, 8192, 52.0),
               "hf_continuous": summary("hf_continuous", math.nan, 0),
               "hf_one_at_a_time": {**summary("hf_one_at_a_time", 20.0, 1024), "num_requests": 8}}
    sweep = {str(n): {"kvlab": k, "hf_padded": h, "ratio": k / h, "kvlab_tpot_p50_s": 0.001,
                      "hf_padded_tpot_p50_s": 0.03, "hf_padded_rounds_wall_s": [1.0, 1.1]}
             for n, (k, h) in {1: (300.0, 100.0), 16: (4_000.0, 900.0), 64: (15_000.0, 1_500.0)}.items()}
    return {"environment": {"gpu": "NVIDIA H200", "date": "2026-11-29T15:51:54", "torch": "2.11.0",
                            "git_commit": "4b470bea30a8aa0b1c2d3e4f5a6b7c8d9e0f1a2b"},
            "workloads": {"A": {"requests": 64, "generated_tokens": 8192, "systems": systems,
                                "spec": {"prompt_range": [16, 512], "new_range": [128, 128]}}},
            "concurrency": sweep,
            "decode_step": {"copy_bandwidth_GB_s": 4000.0, "batch_64": {
                "context": 512, "bound_ms": 0.25, "cuda_graph": {"step_ms": 1.8, "device_ms": 1.4},
                "async": {"step_ms": 1.5, "device_ms": 1.4, "schedule_ms": 0.1, "prepare_ms": 0.2, "launch_ms": 0.3,
                          "output_ms": 0.15},
                "eager": {"step_ms": 12.0}}},
            "decode_step_before": {"batch_64_sync": {"period_ms": 2.4, "device_ms": 1.5},
                                   "environment": {"git_commit": "bda7a6e", "gpu": "NVIDIA H200"}}}


def test_concurrency_is_plotted_and_tabled_as_given():
    result = gpu_result()
    assert results.concurrency_series(result) == {"kvlab": ([1, 16, 64], [300.0, 4_000.0, 15_000.0]),
                                                  "hf_padded": ([1, 16, 64], [100.0, 900.0, 1_500.0])}
    a, b = ui.plot_concurrency(result)
    lines = {line.get_label(): line for line in a.get_lines()}
    assert list(lines[ui.SYSTEM_LABELS["kvlab"]].get_ydata()) == [300.0, 4_000.0, 15_000.0]
    assert list(lines["HF one at a time (any concurrency)"].get_ydata()) == [20.0, 20.0]    # workload A's rate
    ratios = {line.get_label(): list(line.get_ydata()) for line in b.get_lines()}
    assert ratios["kvlab / HF padded batch"] == pytest.approx([3.0, 4_000 / 900, 10.0])
    assert ratios["kvlab / HF one at a time"] == pytest.approx([15.0, 200.0, 750.0])
    assert "NVIDIA H200, 2026-11-29, commit 4b470bea30a8" in a.get_title()
    table = "\n".join(ui.concurrency_table(result))
    assert re.search(r"\n\s+64\s+15,000\s+1,500\s+10.0x\s+750x\s+1.0 ms\s+30.0 ms", table)
    assert "HF one at a time: 20.0 tok/s" in table


def test_speedup_table_and_workload_figure():
    result = gpu_result()
    rows = results.workload_table(result, "A")
    assert [r[0] for r in rows] == ["kvlab", "hf_static_compile", "hf_padded", "hf_one_at_a_time"]   # failed: out
    assert rows[1][2] == pytest.approx(20_000 / 9_000) and rows[0][2] is None
    table = ui.speedup_table(result)
    assert re.search(r"kvlab, tokens/s\s+20,000$", table[1])
    assert any(re.search(r"kvlab / HF padded batch\s+13.3x$", line) for line in table)
    assert any(re.search(r"kvlab / HF one at a time \(first 8\)\s+1,000.0x$", line) for line in table)
    assert not any("continuous" in line for line in table)                # it failed: no row
    (ax,) = ui.plot_gpu_workloads(result)
    assert sorted(p.get_width() for p in ax.patches) == [20.0, 1_500.0, 9_000.0, 20_000.0]
    assert "NVIDIA H200, 2026-11-29, commit 4b470bea30a8" in ax.get_xlabel()
    assert ui.decode_step_lines(result) == [
        "decode step at batch 64, context 512: bound 0.25 ms (weights + K/V at 4,000 GB/s)",
        "  synchronous   1.80 ms, of which the GPU 1.40 ms (step / GPU 1.29); eager 12.00 ms",
        "  asynchronous  1.50 ms, of which the GPU 1.40 ms (step / GPU 1.07); the host per step: schedule 0.10, "
        "prepare 0.20, launch 0.30, outputs 0.15 ms",
        "  the engine before the redesign (commit bda7a6e, its own run on NVIDIA H200): 2.40 ms, of which the GPU "
        "1.50 ms (step / GPU 1.60)"]
    with pytest.raises(ValueError, match="no 'concurrency' sweep"):
        ui.plot_concurrency({"workloads": {}})
    assert ui.concurrency_table({"workloads": {}}) == []


@pytest.mark.skipif(not results.exists("engine_h100.json"), reason="data/bench/engine_h100.json is not committed")
def test_the_committed_gpu_run_reads_as_written():
    """The notebook's GPU cells on the committed file: every number shown is one in the JSON."""
    result = results.load("engine_h100.json")
    series = results.concurrency_series(result)
    for n, entry in result["concurrency"].items():
        for system in ("kvlab", "hf_padded"):
            ns, rates = series[system]
            assert rates[ns.index(int(n))] == entry[system]
    for w, res in result["workloads"].items():
        shown = {k: v for k, v, _ in results.workload_table(result, w)}
        assert shown == {k: v["tokens_per_s"] for k, v in res["systems"].items() if v["tokens"]}
    text = "\n".join(ui.speedup_table(result))
    assert f"{result['workloads']['A']['systems']['kvlab']['tokens_per_s']:,.0f}" in text
    assert str(results.provenance(result)).startswith(f"NVIDIA H100 80GB HBM3, {result['date']}")
    steps = "\n".join(ui.decode_step_lines(result))
    assert f"{result['decode_step']['batch_256']['async']['step_ms']:.2f} ms" in steps
    ui.plot_gpu_workloads(result)
    ui.plot_concurrency(result)
