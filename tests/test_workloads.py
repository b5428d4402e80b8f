"""kvlab.workloads: synthetic traces match the published means, are long-tailed, clipped, seeded."""

import json

import numpy as np
import pytest

from kvlab import workloads as W


@pytest.mark.parametrize("make, means", [(W.sharegpt_like, W.SHAREGPT_MEANS), (W.alpaca_like, W.ALPACA_MEANS)])
def test_means_match_the_vllm_paper(make, means):
    wl = make(200_000, seed=3)
    assert wl.prompt_len.mean() == pytest.approx(means[0], rel=0.015)
    assert wl.output_len.mean() == pytest.approx(means[1], rel=0.015)


@pytest.mark.parametrize("make", [W.sharegpt_like, W.alpaca_like, W.uniform])
@pytest.mark.parametrize("max_len", [2, 64, 512, 2048])
def test_lengths_positive_and_clipped_to_max_len(make, max_len):
    wl = make(20_000, seed=1, max_len=max_len)
    assert wl.prompt_len.min() >= 1 and wl.output_len.min() >= 1
    assert wl.total_len.max() <= max_len


def test_sharegpt_like_is_long_tailed():
    out = W.sharegpt_like(50_000, seed=0).output_len
    assert np.percentile(out, 99) > 5 * np.median(out)   # a few very long answers
    assert np.median(out) < out.mean()                    # most are shorter than the mean


def test_docstrings_say_synthetic_not_the_real_traces():
    for f in (W.sharegpt_like, W.alpaca_like):
        assert "Not the" in f.__doc__ and "synthetic" in f.__doc__.lower()
    assert "synthetic draws matching those published means, not the traces" in W.__doc__.replace("\n", " ") \
        .replace("**", "").replace("  ", " ")


def test_seeded_and_reproducible():
    a, b, c = W.sharegpt_like(1000, seed=7, rate=0.1), W.sharegpt_like(1000, seed=7, rate=0.1), W.sharegpt_like(1000, seed=8, rate=0.1)
    assert np.array_equal(a.prompt_len, b.prompt_len) and np.array_equal(a.output_len, b.output_len)
    assert np.array_equal(a.arrival_time, b.arrival_time)
    assert not np.array_equal(a.output_len, c.output_len)


def test_poisson_arrivals():
    t = W.poisson_arrivals(100_000, rate=0.25, seed=0)
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert np.diff(t).mean() == pytest.approx(4.0, rel=0.02)        # mean gap 1 / rate
    assert np.diff(t).std() == pytest.approx(4.0, rel=0.03)         # exponential gaps: std == mean
    assert np.array_equal(W.poisson_arrivals(5, None), np.zeros(5))  # all at once


@pytest.mark.parametrize("make", [W.sharegpt_like, W.alpaca_like, W.uniform])
@pytest.mark.parametrize("rate", [None, 0.1])
def test_zero_requests_is_an_empty_workload(make, rate):
    wl = make(0, rate=rate)
    assert len(wl) == 0 and list(wl) == [] and wl.describe() == "empty"
    assert wl.prompt_len.shape == wl.output_len.shape == wl.arrival_time.shape == (0,)


def test_with_arrivals_keeps_lengths():
    wl = W.alpaca_like(100, seed=0)
    re = wl.with_arrivals(0.5, seed=1)
    assert np.array_equal(re.prompt_len, wl.prompt_len) and re.arrival_time[-1] > 0


def test_uniform_ranges():
    wl = W.uniform(5000, seed=0, prompt_range=(10, 20), output_range=(5, 6))
    assert wl.prompt_len.min() == 10 and wl.prompt_len.max() == 20
    assert set(wl.output_len.tolist()) == {5, 6}


def test_workload_is_a_sequence_of_requests():
    wl = W.from_lengths([3, 4], [5, 6], [0.0, 2.5])
    assert len(wl) == 2 and list(wl) == [W.Request(3, 5, 0.0), W.Request(4, 6, 2.5)]
    assert wl[1].prompt_len == 4 and np.array_equal(wl.total_len, [8, 10])


def test_load_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "trace.csv"
    csv_path.write_text("prompt_len,output_len,arrival_time\n10,20,0\n30,40,1.5\n")
    jsonl_path = tmp_path / "trace.jsonl"
    jsonl_path.write_text(json.dumps({"prompt_len": 10, "output_len": 20}) + "\n"
                          + json.dumps({"prompt_len": 30, "output_len": 40, "arrival_time": 1.5}) + "\n")
    for path in (csv_path, jsonl_path):
        wl = W.load(path)
        assert wl.prompt_len.tolist() == [10, 30] and wl.output_len.tolist() == [20, 40]
        assert wl.arrival_time.tolist() == [0.0, 1.5] and wl.name == "trace"


def test_load_bad_files(tmp_path):
    bad = tmp_path / "trace.csv"
    bad.write_text("prompt_len\n10\n")
    with pytest.raises(ValueError, match="output_len"):
        W.load(bad)
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        W.load(tmp_path / "trace.txt")


@pytest.mark.parametrize("file, text, message", [
    # a JSON error on line 2 is reported on line 2 (json.loads on the whole file said "line 1 column 2")
    ("t.jsonl", '{"prompt_len": 1, "output_len": 2}\n{"prompt_len": 1, "output_len": 2,}\n',
     "t.jsonl, line 2: not valid JSON: Expecting property name enclosed in double quotes (column 35)"),
    ("t.jsonl", '\n\n{"prompt_len": 3}\n', "t.jsonl, line 3: no 'output_len'; each record needs prompt_len and"),
    ("t.jsonl", "[10, 20]\n", "t.jsonl, line 1: expected a JSON object such as"),
    ("t.jsonl", '{"prompt_len": 10.5, "output_len": 2}\n',
     "t.jsonl, line 1, field 'prompt_len': 10.5 is not a whole number of tokens (a length is never rounded)"),
    ("t.jsonl", '{"prompt_len": true, "output_len": 2}\n', "line 1, field 'prompt_len': expected a number, got the bool"),
    ("t.jsonl", '{"prompt_len": 3, "output_len": 0}\n', "line 1, field 'output_len': a length must be a whole number "
                                                          "of tokens in 1..2**63 - 1, got 0"),
    ("t.csv", "prompt_len,output_len\n1,2\n3,x\n", "t.csv, line 3, field 'output_len': 'x' is not a number"),
    ("t.csv", "prompt_len,output_len\n1,2\n4\n", "t.csv, line 3: no 'output_len'"),
    ("t.csv", "prompt_len,output_len,arrival_time\n1,2,-1\n", "line 2, field 'arrival_time': an arrival time must "
                                                               "be a finite number of decode steps >= 0, got -1"),
    ("t.csv", "prompt_len,output_len,arrival_time\n1,2,nan\n", "line 2, field 'arrival_time'"),
    ("t.csv", "prompt,output\n1,2\n", "t.csv, line 1 (the header): no column 'prompt_len', 'output_len'"),
])
def test_load_errors_name_the_file_the_line_and_the_field(tmp_path, file, text, message):
    path = tmp_path / file
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        W.load(path)
    assert str(path.parent) in str(info.value) and message in str(info.value)


def test_load_reads_whole_floats_and_empty_files(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt_len,output_len,arrival_time\n10.0,2,\n3,4,1.5\n")
    wl = W.load(path)
    assert wl.prompt_len.tolist() == [10, 3] and wl.arrival_time.tolist() == [0.0, 1.5]
    (tmp_path / "empty.jsonl").write_text("")
    assert len(W.load(tmp_path / "empty.jsonl")) == 0
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.csv: not a UTF-8 text file"):
        W.load(tmp_path / "bin.csv")
    with pytest.raises(TypeError, match="path must be a str or a path, got None"):
        W.load(None)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_len=[1.5], output_len=[1]), r"prompt_len must be whole numbers of tokens, got prompt_len\[0\] = 1.5"),
    (dict(prompt_len=[3], output_len=[2, 2.25][1:]), r"output_len\[0\] = 2.25 \(a length is never rounded\)"),
    (dict(prompt_len=[0], output_len=[1]), ">= 1"),
    (dict(prompt_len=[1], output_len=[0]), ">= 1"),
    (dict(prompt_len=[1, 2], output_len=[1]), "one length"),
    (dict(prompt_len=[1], output_len=[1], arrival_time=[-1.0]), "arrival_time"),
    (dict(prompt_len=[1], output_len=[1], arrival_time=[np.nan]), "arrival_time"),
])
def test_bad_workloads(kwargs, match):
    with pytest.raises(ValueError, match=match):
        W.from_lengths(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_len=["10"], output_len=[1]), "prompt_len must be whole numbers of tokens .* got strings"),
    (dict(prompt_len=[True], output_len=[1]), "got bools"),
    (dict(prompt_len=None, output_len=[1]), "prompt_len must be whole numbers of tokens .* got None"),
    (dict(prompt_len=[1], output_len=[1], arrival_time=[None]), "arrival_time must be numbers"),
    (dict(prompt_len=[1], output_len=[1], name=5), "name must be a string, got int 5"),
])
def test_wrong_kinds_of_lengths(kwargs, match):
    with pytest.raises(TypeError, match=match):
        W.from_lengths(**kwargs)


def test_whole_float_lengths_and_numpy_scalars_are_accepted():
    wl = W.from_lengths([3.0, np.int64(4)], np.array([5, 6], dtype=np.uint8))
    assert wl.prompt_len.dtype == np.int64 and wl.prompt_len.tolist() == [3, 4] and wl.output_len.tolist() == [5, 6]
    a = W.sharegpt_like(np.int64(50), seed=np.uint8(3), rate=np.float32(0.5), max_len=np.int32(512))
    b = W.sharegpt_like(50, seed=3, rate=0.5, max_len=512)
    assert np.array_equal(a.prompt_len, b.prompt_len) and np.array_equal(a.arrival_time, b.arrival_time)


@pytest.mark.parametrize("call, match", [
    (lambda: W.sharegpt_like(10, rate=0), "rate"),
    (lambda: W.sharegpt_like(10, rate=-1.0), "rate"),
    (lambda: W.sharegpt_like(10, rate=float("inf")), r"rate must be a positive finite number of requests per step, "
                                                     r"or None \(all at once\), got inf"),
    (lambda: W.sharegpt_like(10, rate=1e-320), "rate 1e-320 is so small that arrival times overflow"),
    (lambda: W.sharegpt_like(-1), "n must"),
    (lambda: W.sharegpt_like(10**9), r"n must be an integer in 0..100,000,000 \(requests\), got 1000000000"),
    (lambda: W.sharegpt_like(10, seed=-1), "seed must be an integer >= 0, got -1"),      # numpy: "expected non-negative"
    (lambda: W.alpaca_like(10, max_len=1), "max_len"),
    (lambda: W.alpaca_like(10, max_len=10**30), r"max_len must be an integer in 2..2\*\*62"),   # was OverflowError
    (lambda: W.uniform(10, prompt_range=(5, 2)), "prompt_range"),
    (lambda: W.uniform(10, output_range=(1, 10**30)), r"output_range must be a pair \(lo, hi\) of integers with "
                                                        r"1 <= lo <= hi < 2\*\*62"),         # numpy: "high is out of bounds"
    (lambda: W.lognormal_lengths(5, 0.5, 10, sigma_prompt=1, sigma_output=1), r"mean_prompt must be a number of tokens "
                                                                               r"in \[1, 2047\), got 0.5"),
    (lambda: W.lognormal_lengths(5, 5, 10, sigma_prompt=1e300, sigma_output=1), r"sigma_prompt must be a number in "
                                                                                 r"\(0, 10\]"),
])
def test_bad_generator_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: W.sharegpt_like(10, seed=1.5), "seed must be an integer >= 0, got float 1.5"),
    (lambda: W.sharegpt_like(10.0), "n must be an integer in 0..100,000,000 .*, got float 10.0"),
    (lambda: W.sharegpt_like(True), "n must be .* got the bool True"),
    (lambda: W.sharegpt_like(10, rate="fast"), "rate must be a positive finite number .* got str 'fast'"),
    (lambda: W.uniform(10, prompt_range=None), r"prompt_range must be a pair \(lo, hi\) .* got None"),
    (lambda: W.uniform(10, prompt_range=(1.5, 3)), r"prompt_range\[0\] must be a pair"),
    (lambda: W.poisson_arrivals(5, rate=0.1, seed=None), "seed must be an integer >= 0, got None"),
])
def test_wrong_kinds_of_generator_arguments(call, match):
    with pytest.raises(TypeError, match=match):
        call()
