"""kvlab.bench.serve: the requests it draws, the statistics it reports, and one small real run.

The statistics are checked against numpy on hand-made results; the real run (tiny model,
a server in a child process, then LLM.generate offline) checks that every request came back
with exactly the tokens it asked for, counted by both sides.
"""

import asyncio
import json
import math

import numpy as np
import pytest
import torch

from kvlab.bench import serve as bench
from kvlab.bench.serve import RequestResult, make_requests, summarize


def test_requests_are_seeded_and_prefix_stable():
    a = make_requests(300, "sharegpt", max_len=1024, seed=3)
    b = make_requests(600, "sharegpt", max_len=1024, seed=3)
    assert [(r.prompt_token_ids, r.output_len) for r in a] == [(r.prompt_token_ids, r.output_len) for r in b[:300]]
    assert all(1 <= len(r.prompt_token_ids) and len(r.prompt_token_ids) + r.output_len <= 1024 for r in b)
    assert all(1000 <= t < 20000 for r in b for t in r.prompt_token_ids)
    assert make_requests(5, seed=4)[0].prompt_token_ids != make_requests(5, seed=3)[0].prompt_token_ids
    alpaca = make_requests(512, "alpaca")
    assert np.mean([r.output_len for r in alpaca]) < np.mean([r.output_len for r in b])


def test_summary_statistics_against_numpy():
    results = [RequestResult(True, 10, output_len=5, ttft=0.1, e2e=0.5, itl=[0.1] * 4),
               RequestResult(True, 20, output_len=3, ttft=0.3, e2e=1.3, itl=[0.5, 0.5]),
               RequestResult(True, 30, output_len=1, ttft=2.0, e2e=2.0),
               RequestResult(False, 40, error="HTTP 503: queue full")]
    s = summarize(results, duration=4.0, slo_ttft_ms=500, slo_tpot_ms=200)
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, ["HTTP 503: queue full"])
    assert (s["input_tokens"], s["output_tokens"]) == (60, 9)
    assert s["request_throughput"] == 3 / 4 and s["output_throughput"] == 9 / 4
    assert s["ttft_ms"]["p50"] == pytest.approx(300) and s["ttft_ms"]["p90"] == pytest.approx(np.percentile([100, 300, 2000], 90))
    assert s["tpot_ms"]["mean"] == pytest.approx((100 + 500) / 2)          # the 1-token request has no TPOT
    assert s["itl_ms"]["p50"] == pytest.approx(100) and s["itl_ms"]["p99"] == pytest.approx(np.percentile([100] * 4 + [500] * 2, 99))
    assert s["normalized_latency_ms_per_token"] == pytest.approx(np.mean([100, 1300 / 3, 2000]))
    # goodput: request 1 meets both targets; request 2 misses TPOT (500 > 200); request 3 misses TTFT
    assert s["goodput"]["requests_per_s"] == 1 / 4 and s["goodput"]["fraction"] == 1 / 4


def test_a_small_run_end_to_end(tmp_path):
    out = tmp_path / "serve.json"
    argv = ["--model", "tiny-llama-random", "--max-num-seqs", "16", "--max-num-batched-tokens", "256",
            "--torch-threads", "1", "--dataset", "alpaca", "--max-len", "256", "--num-prompts", "12",
            "--rates", "inf", "20", "--warmup", "2", "--stream-interval", "3", "--quiet", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0                 # --torch-threads 1 applies to this process too (offline)
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    asked = sum(r.output_len for r in make_requests(12, "alpaca", 256))
    inf, twenty = result["runs"]
    assert (inf["rate"], twenty["rate"]) == ("inf", 20.0)
    for run in (inf, twenty):
        assert run["completed"] == 12 and run["failed"] == 0 and run["output_tokens"] == asked   # events of 3 tokens counted right
        assert run["server"]["engine_steps"] > 0
        assert run["server"]["http_cpu_s"] > 0 and run["server"]["core_cpu_s"] > run["server"]["http_cpu_s"]
        assert 0 < run["server"]["http_cpu_us_per_token"] < 1e6
    assert result["offline"]["output_tokens"] == asked and result["server_exit_status"] == 0
    comparison = result["server_vs_offline"]
    assert comparison["throughput_ratio"] == pytest.approx(inf["output_throughput"]
                                                           / result["offline"]["output_throughput"])
    assert math.isfinite(comparison["added_median_tpot_ms"])
    assert result["environment"]["python"] and result["environment"]["date"]
    assert "git_commit" in result["environment"]                # the code a figure came from (issue 17)
    fig = bench.plot_latency_vs_rate(result)
    assert len(fig.axes) == 3


def test_the_sweep_sizes_each_rate_within_min_and_max_prompts(monkeypatch):
    """--rates auto: the rate-inf run measures C, then each fraction of C sends rate x seconds
    requests, clipped to [min_prompts, max_prompts]. The cap is what keeps notebook 08's overloaded
    run from outgrowing the server's waiting queue on a fast machine (a CI run failed on that)."""
    sent = []

    async def fake_one_rate(url, requests, rate, **kw):
        sent.append((rate, len(requests)))
        return {"rate": rate, "request_throughput": 4.0}

    monkeypatch.setattr(bench, "one_rate", fake_one_rate)
    pool = make_requests(100, "alpaca", max_len=64)
    requests = lambda n: pool[:n]
    sweep = lambda **kw: asyncio.run(bench.sweep_async("http://x", "m", requests, "auto", num_prompts=10,
                                                       fractions=(0.25, 1.0, 3.0), seconds_per_rate=6, **kw))
    sweep(min_prompts=8)
    assert sent == [(math.inf, 10), (1.0, 8), (4.0, 24), (12.0, 72)]          # C = 4/s: 6, 24 and 72 asked
    sent.clear()
    sweep(min_prompts=8, max_prompts=16)
    assert sent == [(math.inf, 10), (1.0, 8), (4.0, 16), (12.0, 16)]


def test_bad_arguments_are_usage_errors(capsys):
    for argv in (["--rates", "auto", "5"], ["--rates", "0"], ["--rates", "fast"], ["--num-prompts", "0"],
                 ["--stream-interval", "0"], ["--max-prompts", "0"], ["--min-prompts", "9", "--max-prompts", "8"]):
        with pytest.raises(SystemExit) as info:
            bench.main(argv)
        assert info.value.code == 2
    assert "a rate must be > 0" in capsys.readouterr().err


def test_summary_table_shows_a_run_where_nothing_completed():
    """A run whose every request failed (the server died, say) has no latencies: the table shows
    '-' there and the failures, instead of raising."""
    failed = [RequestResult(ok=False, prompt_len=5, error="got 10 tokens, asked for 20")] * 3
    done = [RequestResult(ok=True, prompt_len=5, output_len=3, ttft=0.1, e2e=0.3, itl=[0.1, 0.1])]
    result = {"model": "m", "dataset": "sharegpt", "requests": {"mean_prompt_len": 5, "mean_output_len": 20},
              "runs": [{"rate": "inf", **summarize(done + failed, 1.0, 1000, 100)},
                       {"rate": 2.0, **summarize(failed, 1.0, 1000, 100)}]}
    lines = bench.summary_table(result).splitlines()
    assert lines[2].split()[:3] == ["inf", "1.00", "3"] and lines[2].endswith("3 failed")
    assert lines[3].split()[3:9] == ["-"] * 6 and lines[3].endswith("3 failed")


def test_a_burst_of_clients_on_a_small_server():
    """burst_async (notebook 08, section 3): requests of different lengths all sent at once to a server that
    runs 2 at a time; every client gets exactly its tokens, the polled gauges never show more than 2 running,
    and the counters moved by what the burst did."""
    import asyncio

    from kvlab.serve import ServerProcess

    server = ServerProcess(["--model", "tiny-llama-random", "--max-num-seqs", "2", "--torch-threads", "1"]).start()
    try:
        requests = [bench.BenchRequest(r.prompt_token_ids, n) for r, n in
                    zip(make_requests(5, "alpaca", max_len=64, seed=1), [3, 9, 5, 12, 7])]
        burst = asyncio.run(bench.burst_async(server.url, "tiny-llama-random", requests, poll_s=0.02))
    finally:
        server.stop()
        server.close()
    assert [r.output_len for r in burst.results] == [3, 9, 5, 12, 7] and all(r.ok for r in burst.results)
    times, running = burst.series("kvlab:num_requests_running")
    assert times == sorted(times) and max(running) <= 2
    assert burst.series("kvlab:num_requests_waiting")[1][-1] == 0 and burst.after["kvlab:kv_cache_used_blocks"] == 0
    assert burst.delta("kvlab:generation_tokens_total") == 3 + 9 + 5 + 12 + 7
    assert burst.delta("kvlab:engine_steps_total") >= 12                # the longest request alone needs 12 steps
    a, b = bench.plot_burst(burst, max_num_seqs=2)
    assert a.get_lines()[0].get_label() == "running (in the batch)"
