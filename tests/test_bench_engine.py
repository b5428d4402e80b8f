"""kvlab.bench.engine's method (issue 17): every system warms up on the very requests it is timed on, keeps
every timed round, and the concurrency sweep runs HF with no kvlab engine beside it; transformers' continuous
batching is set up once, outside the timed runs, and its attention work is counted against what the
requests need. Tiny random model, CPU."""


from kvlab.bench import engine as bench


def fake_system(calls):
    """A system that records which requests it was given and returns a TTFT and TPOT per request."""
    def run(requests):
        calls.append([p for p, _ in requests])
        return [0.0] * len(requests), [0.0] * len(requests)
    return run


REQUESTS = [([1, 2, 3], 4), ([4, 5], 2), ([6], 3)]


def test_measure_warms_up_on_the_same_requests_and_keeps_every_round():
    calls = []
    run = bench.measure("x", fake_system(calls), REQUESTS, rounds=3)
    assert calls == [[p for p, _ in REQUESTS]] * 4                     # warm-up + 3 timed runs, all identical
    assert len(run.walls) == 3 and run.wall == min(run.walls)
    s = run.summary()
    assert s["rounds_wall_s"] == run.walls and s["tokens"] == 9 and "fastest of 3" in s["note"]
    calls.clear()
    bench.measure("slow", fake_system(calls), REQUESTS, warm_subset=2)
    assert [len(c) for c in calls] == [2, 3]                           # only slow systems warm up on a subset


def test_race_interleaves_the_systems():
    order = []
    systems = {name: (lambda r, name=name: (order.append(name), ([0.0] * len(r), [0.0] * len(r)))[1])
               for name in ("a", "b")}
    out = bench.race(systems, REQUESTS, rounds=2, warm_subset=1, progress=False)
    assert order == ["a", "b", "a", "b", "a", "b"]                     # warm-ups, then the rounds take turns
    assert out.keys() == {"a", "b"} and len(out["a"]["rounds_wall_s"]) == 2


def test_the_sweep_runs_hf_before_building_kvlab(monkeypatch, tiny_llama):
    events = []
    monkeypatch.setattr(bench, "hf_padded", lambda lm, r: (events.append(("hf", len(r))), ([0.1] * len(r),
                                                                                          [0.01] * len(r)))[1])
    monkeypatch.setattr(bench, "make_kvlab", lambda lm, pool, device: events.append(("make_kvlab", len(pool))))
    monkeypatch.setattr(bench, "kvlab_run", lambda llm, r: (events.append(("kvlab", len(r))), ([0.1] * len(r),
                                                                                               [0.01] * len(r)))[1])
    out = bench.concurrency_sweep(tiny_llama, counts=(1, 3), device="cpu", rounds=2)
    assert events == [("hf", 1)] * 3 + [("hf", 3)] * 3 + [("make_kvlab", 3)] + [("kvlab", 1)] * 3 + [("kvlab", 3)] * 3
    assert out["3"].keys() >= {"kvlab", "hf_padded", "ratio", "kvlab_tpot_p50_s", "hf_padded_ttft_p50_s",
                               "hf_padded_rounds_wall_s"}
    assert len(out["1"]["kvlab_rounds_wall_s"]) == 2


def test_hf_continuous_is_set_up_once_and_generates_exactly_what_was_asked(tiny_llama):
    requests = [(list(range(10, 30)), 5), (list(range(40, 47)), 3)]
    hf = bench.HFContinuous(tiny_llama, requests, max_batch_tokens=64)
    try:
        assert hf.setup_s > 0
        manager = hf.manager
        for _ in range(2):
            ttft, tpot = hf(requests)
            assert len(ttft) == 2 and all(t > 0 for t in ttft) and all(t >= 0 for t in tpot)
        assert hf.manager is manager                                    # one manager for every run
    finally:
        hf.close()


def test_hf_continuous_attention_work_is_counted(tiny_llama):
    """Two prompts of 20 and 7 tokens, 4 new tokens each, a budget that prefills both in one step: SDPA's
    work is (all queries) x (all keys) per step, what the requests need is the sum of their own."""
    a, b, n = 20, 7, 4
    requests = [(list(range(10, 10 + a)), n), (list(range(40, 40 + b)), n)]
    out = bench.hf_continuous_breakdown(tiny_llama, requests, max_batch_tokens=64)
    assert out["steps"] == n and out["tokens"] == 2 * n
    needed = a * a + b * b + sum((a + t) + (b + t) for t in range(1, n))
    computed = (a + b) ** 2 + sum(2 * (a + b + 2 * t) for t in range(1, n))
    assert (out["attention_work_needed"], out["attention_work_computed"]) == (needed, computed)
    parts = out["prepare_s"] + out["attention_s"] + out["forward_rest_s"] + out["update_s"]
    assert 0 < parts <= out["wall_s"] * 1.05


def test_runs_merge_into_one_result(tmp_path):
    env = lambda day: {"gpu": "NVIDIA H200", "date": f"2026-12-0{day}T10:00:00+00:00", "git_commit": f"c{day}"}
    parts = [{"environment": env(1), "workloads": {"A": {"systems": {}, "model": "m"}}, "decode_step": {"batch_64": {}}},
             {"environment": env(2), "workloads": {"C": {"systems": {}}}},
             {"environment": env(3), "workloads": {}, "concurrency": {"1": {"kvlab": 1.0, "hf_padded": 1.0}}}]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"{i}.json")
        bench.results.save(part, paths[-1])
    assert bench.main(["--merge", *map(str, paths), "--out", str(tmp_path / "all.json")]) == 0
    merged = bench.results.load(tmp_path / "all.json")
    assert sorted(merged["workloads"]) == ["A", "C"] and merged["concurrency"] == parts[2]["concurrency"]
    assert merged["model"] == "m" and merged["card"] == "NVIDIA H200" and merged["date"] == "2026-12-01"
    assert merged["environment"]["C"]["git_commit"] == "c2" and merged["environment"]["concurrency"]["date"][:10] == \
        "2026-12-03"
    assert str(bench.results.provenance(merged)) == "NVIDIA H200, 2026-12-01, commit c1; c2; c3"
