"""kvlab.bench.results: committed results are found in a checkout, through KVLAB_DATA, or refused with a
message saying what to do (a regular install has no data/ folder); every committed file says where it came
from (card, date, commit)."""

import json
import re

import pytest

from kvlab.bench import results


def test_a_checkout_finds_the_repositorys_data(monkeypatch):
    monkeypatch.delenv(results.ENV_VAR, raising=False)
    assert results.data_dir() == results.REPO_DATA
    assert results.exists("serve_cpu.json") and not results.exists("no_such_run.json")
    assert results.load("serve_cpu.json")["model"] == "smollm2-135m"


def test_kvlab_data_overrides_the_folder(monkeypatch, tmp_path):
    (tmp_path / "engine_h200.json").write_text(json.dumps({"card": "a card", "date": "2030-01-02"}))
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path))
    assert results.data_dir() == tmp_path
    assert results.load("engine_h200.json")["card"] == "a card"
    assert not results.exists("serve_cpu.json")                       # only the folder named is read
    with pytest.raises(FileNotFoundError, match=r"no benchmark result at .*serve_cpu.json .*holds: engine_h200.json"):
        results.load("serve_cpu.json")
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="KVLAB_DATA=.*missing.* is not a folder"):
        results.data_dir()
    assert not results.exists("engine_h200.json")


def test_a_regular_install_without_data_is_told_what_to_do(monkeypatch, tmp_path):
    """Installed into site-packages, the package has no data/bench beside it: a clear error, not a silent None."""
    monkeypatch.delenv(results.ENV_VAR, raising=False)
    monkeypatch.setattr(results, "REPO_DATA", tmp_path / "site-packages" / "data" / "bench")
    with pytest.raises(FileNotFoundError, match=r"data/bench/ folder, which this install does not have.*"
                                                r"export KVLAB_DATA=/path/to/kvlab/data/bench.*pip install -e"):
        results.load("engine_h200.json")
    assert not results.exists("engine_h200.json")


def test_a_path_is_read_as_a_path(tmp_path):
    path = tmp_path / "run.json"
    results.save({"x": 1}, path)
    assert results.load(path) == {"x": 1} and results.load(str(path)) == {"x": 1}


@pytest.mark.parametrize("name", sorted(p.name for p in results.REPO_DATA.glob("*.json")))
def test_every_committed_result_says_where_it_came_from(name):
    p = results.provenance(results.load(name))
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", p.date), p
    assert p.card and p.card != "unknown"
    assert str(p) == f"{p.card}, {p.date}, " + (f"commit {p.commit}" if p.recorded else "commit not recorded")


def test_provenance_reads_each_benchmarks_fields():
    full = "0123456789abcdef0123456789abcdef01234567"
    assert str(results.provenance({"environment": {"gpu": "NVIDIA H200", "date": "2026-12-01T10:00:00+00:00",
                                                   "git_commit": full}})) == "NVIDIA H200, 2026-12-01, commit 0123456789ab"
    per_workload = {"card": "NVIDIA H200 (141 GB HBM3e), lent", "date": "2026-11-29",
                    "environment": {"A": {"git_commit": "4c473e0 (a note)"}, "C": {"git_commit": "4c473e0 (a note)"}}}
    assert str(results.provenance(per_workload)) == "NVIDIA H200, 2026-11-29, commit 4c473e0 (a note)"
    cpu = results.provenance({"environment": {"date": "2026-11-29T16:47:18", "cpu_count": 2}})
    assert str(cpu) == "CPU (2 cores), 2026-11-29, commit not recorded" and not cpu.recorded


def test_environment_records_the_commit(monkeypatch, tmp_path):
    env = results.environment()
    assert {"date", "torch", "kvlab", "git_commit", "cpu_count", "torch_threads", "device"} <= env.keys()
    assert re.match(r"[0-9a-f]{40}( \+uncommitted changes)?$", env["git_commit"])      # this checkout
    monkeypatch.setattr(results, "PACKAGE_DIR", tmp_path)                              # not a git checkout
    assert results.git_commit() is None
