"""The `kvlab` command: `kvlab memory` prints the same plan kvlab.memory_plan computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvlab
from kvlab.cli import main


def test_memory_table_matches_memory_plan(capsys):
    argv = ["memory", "--model", "llama-3-8b", "--gpu", "H100-80GB", "--context", "8192", "--kv-dtype", "fp8", "--tp", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    plan = kvlab.memory_plan(kvlab.ModelSpec.preset("llama-3-8b"), "H100-80GB", kv_dtype="fp8",
                             context_len=8192, tensor_parallel=2)
    assert plan.max_concurrent_requests == 254
    assert "max concurrent requests           254" in out
    assert "32,768 B; 4 of 8 KV heads per GPU" in out
    assert "2 x H100-80GB (tensor parallel 2)" in out
    assert "fits                              yes" in out


def test_memory_json_is_the_plan(capsys):
    assert main(["memory", "--model", "mistral-7b", "--gpu", "24GiB", "--context", "16384", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    plan = kvlab.memory_plan(kvlab.ModelSpec.preset("mistral-7b"), 24 * 1024**3, context_len=16384)
    assert got == plan.to_dict()
    assert got["kv_bytes_per_request"] == 4096 * 131_072  # the sliding window caps the cache


def test_memory_that_does_not_fit(capsys):
    assert main(["memory", "--model", "llama-3-70b", "--gpu", "A100-80GB"]) == 0
    out = capsys.readouterr().out
    assert "fits                              NO" in out and "note: does not fit" in out


def test_list(capsys):
    assert main(["memory", "--list"]) == 0
    out = capsys.readouterr().out
    for name in kvlab.list_presets():
        assert name in out
    for gpu in kvlab.list_gpus():
        assert gpu in out
    assert "524,288 B  MHA" in out  # llama-2-7b


@pytest.mark.parametrize("argv, message", [
    (["memory", "--model", "gpt-5"], "not a preset"),
    (["memory", "--gpu", "B300"], "not a GPU preset"),
    (["memory", "--gpu=-3GiB"], "--gpu '-3GiB': memory must be positive"),
    (["memory", "--gpu", "-5GiB"], "--gpu '-5GiB': memory must be positive"),      # issue 19: no "expected one argument"
    (["memory", "--gpu", "-inf"], "--gpu '-inf': memory must be positive"),
    (["memory", "--gpu", "0GB"], "must be positive"),
    (["memory", "--gpu", "inf"], "must be positive and finite"),
    (["memory", "--gpu", "infGiB"], "must be positive and finite"),
    (["memory", "--gpu", "nan"], "must be positive and finite"),
    (["memory", "--gpu", "0.5b"], "at least 1 byte"),
    (["memory", "--gpu", "1e30GiB"], "--gpu must be a GPU preset name"),
    (["memory", "--context", "0"], "--context must be a positive integer below 2**63, got 0"),
    (["memory", "--context=-5"], "--context must be a positive integer below 2**63, got -5"),
    (["memory", "--context", "lots"], "argument --context: invalid int value"),
    (["memory", "--model", "llama-2-7b", "--context", "8192"], "--context 8192 exceeds llama-2-7b's maximum context"),
    (["memory", "--kv-dtype", "fp6"], "--kv-dtype: unknown dtype 'fp6'; allowed: float32"),
    (["memory", "--weight-dtype", "fp6"], "--weight-dtype: unknown dtype 'fp6'; allowed: float32"),
    (["memory", "--tp", "3"], "--tp=3 must divide llama-3-8b's 32 query heads; allowed: [1, 2, 4, 8, 16, 32]"),
    (["memory", "--tp", "0"], "--tp must be a positive integer"),
    (["memory", "--utilization", "0"], "--utilization must be a fraction in (0, 1], got 0.0"),
    (["memory", "--utilization", "nan"], "--utilization must be a fraction in (0, 1], got nan"),
    (["memory", "--utilization", "1.01"], "--utilization must be a fraction in (0, 1], got 1.01"),
    (["memory", "--reserve-gib", "inf"], "--reserve-gib must be a finite number of GiB >= 0"),
    (["memory", "--reserve-gib=-inf"], "--reserve-gib must be a finite number of GiB >= 0"),
    (["memory", "--reserve-gib", "nan"], "--reserve-gib must be a finite number of GiB >= 0 (below 2**33), got nan"),
    (["memory", "--reserve-gib=-1"], "--reserve-gib must be a finite number of GiB >= 0 (below 2**33), got -1.0"),
    (["memory", "--reserve-gib", "-1e3"], "--reserve-gib must be a finite number of GiB >= 0 (below 2**33), got -1000.0"),
    (["memory", "--reserve-gib", "1e12"], "--reserve-gib must be a finite number of GiB >= 0 (below 2**33)"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    """Every bad flag: exit 2, a usage line, and a message that names the flag (the Python
    parameter names, seq_len or reserve_bytes, mean nothing on the command line)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: kvlab" in err and message in err
    for python_name in ("seq_len", "context_len", "reserve_bytes", "tensor_parallel", "gpu_memory_utilization",
                        "kv_dtype", "weight_dtype", "Traceback"):
        assert python_name not in err


def test_reserve_gib_is_used(capsys):
    assert main(["memory", "--reserve-gib", "0", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["reserve_bytes"] == 0
    assert plan == kvlab.memory_plan(kvlab.ModelSpec.preset("llama-3-8b"), "H100-80GB", reserve_bytes=0).to_dict()


def test_python_dash_m_kvlab():
    done = subprocess.run([sys.executable, "-m", "kvlab", "memory", "--model", "falcon-7b", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kv_bytes_per_token"] == 32 * 2 * 1 * 64 * 2
    bad = subprocess.run([sys.executable, "-m", "kvlab", "memory", "--tp", "5"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "usage:" in bad.stderr


# ---- kvlab generate / bench ----------------------------------------------------------------------

def test_generate_prints_json_lines_equal_to_the_engine(capsys, tmp_path):
    """`kvlab generate` is LLM.generate: the same greedy text, one JSON line per sample."""
    import kvlab

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('The weather today is\n\n{"prompt": "def fibonacci(n):"}\n')
    rc = main(["generate", "--model", "tiny-llama-random", "--max-tokens", "5", "--json", "--file", str(prompts)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [x["prompt"] for x in lines] == ["The weather today is", "def fibonacci(n):"]
    expected = kvlab.LLM(model="tiny-llama-random").generate(
        ["The weather today is", "def fibonacci(n):"], kvlab.SamplingParams(temperature=0, max_tokens=5),
        use_tqdm=False)
    assert [x["text"] for x in lines] == [o.outputs[0].text for o in expected]
    assert all(x["num_tokens"] <= 5 for x in lines)


@pytest.mark.parametrize("argv,flag", [
    (["--max-tokens", "-1", "x"], "--max-tokens"), (["--top-p", "1.5", "x"], "--top-p"),
    (["--temperature", "-1", "x"], "--temperature"), ([], "give a prompt"),
    (["--file", "/nonexistent/prompts.txt"], "--file"), (["--block-size", "0", "x"], "--block-size must be"),
    (["--max-num-seqs", "64", "--max-num-batched-tokens", "8", "x"], "--max-num-batched-tokens"),
])
def test_generate_bad_flags_exit_2_naming_the_flag(capsys, argv, flag):
    rc = main(["generate", "--model", "tiny-llama-random", *argv])
    assert rc == 2 and flag in capsys.readouterr().err


def test_bench_dispatches_to_the_benchmark_and_refuses_unknown_ones(capsys):
    assert main(["bench", "fragmentation", "--help"]) == 0
    assert "usage" in capsys.readouterr().out
    assert main(["bench", "nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err
