"""Committed benchmark results (data/bench/*.json): where they are, where they came from, what they say.

    data_dir()                         the folder: $KVLAB_DATA if set, else the repository's data/bench/
    load("engine_h200.json")           a committed result (or any path), parsed
    exists("serve_h200.json")          whether it is there
    environment()                      what each benchmark records about its machine, commit included
    provenance(result)                 card (or CPU), date and commit of a result, for a caption
    workload_table(result, "A")        bench.engine: (system, tokens/s, kvlab's speed-up), fastest first
    concurrency_series(result)         bench.engine --concurrency: system -> (request counts, tokens/s)
    flat_baselines(result)             systems whose tokens/s do not depend on concurrency (one at a time)

The results are written by `python -m kvlab.bench.engine`, `kvlab bench serve` (kvlab.bench.serve)
and `python -m kvlab.bench.kernels`, and read by the notebooks through this module and kvlab.ui.

Where the data is: the JSON files are committed under the repository's `data/bench/`. A checkout,
or an editable install (`pip install -e .`, what the course's set-up does), finds them next to the
package. A regular install copies only the package into site-packages; there, point KVLAB_DATA at
the checkout's data/bench folder (`export KVLAB_DATA=/path/to/kvlab/data/bench`), or `load` says so.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "KVLAB_DATA"
PACKAGE_DIR = Path(__file__).resolve().parents[1]            # .../kvlab
REPO_DATA = PACKAGE_DIR.parent / "data" / "bench"           # a checkout's (or an editable install's) data/bench
NOT_RECORDED = "commit not recorded"


# ---------------------------------------------------------------------------- where

def data_dir() -> Path:
    """The folder of committed results: $KVLAB_DATA if set (it must exist), else the repository's data/bench/.
    Raises FileNotFoundError, saying what to do, when neither is there (a regular, non-editable install)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{ENV_VAR}={env!r} is not a folder; set it to the kvlab repository's data/bench "
                                    f"folder (the committed benchmark results), or unset it")
        return path
    if REPO_DATA.is_dir():
        return REPO_DATA
    raise FileNotFoundError(
        f"kvlab's committed benchmark results are in the repository's data/bench/ folder, which this install does "
        f"not have (kvlab is installed at {PACKAGE_DIR}, without the repository around it). Set {ENV_VAR} to that "
        f"folder of a kvlab checkout (export {ENV_VAR}=/path/to/kvlab/data/bench), or install the checkout with "
        f"pip install -e .")


def _path(name: str | Path) -> Path:
    path = Path(name)
    if not path.is_absolute() and path.parent == Path("."):   # a bare file name: a committed result
        return data_dir() / path
    return path


def exists(name: str | Path) -> bool:
    """Whether a committed result (a bare file name, in data_dir()) or a path exists."""
    try:
        return _path(name).is_file()
    except FileNotFoundError:
        return False


def load(name: str | Path) -> dict:
    """A result: a bare file name ("serve_cpu.json") is read from data_dir(), anything else as a path."""
    path = _path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark result at {path}" + (
            f" ({path.parent} holds: {', '.join(sorted(p.name for p in path.parent.glob('*.json'))) or 'nothing'})"
            if path.parent.is_dir() else ""))
    return json.loads(path.read_text())


def save(result: dict, path: str | Path) -> None:
    """Write a result as indented JSON (the folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


# ---------------------------------------------------------------------------- where from

def git_commit() -> str | None:
    """The commit of the kvlab checkout the package runs from, with '+uncommitted changes' when kvlab/ differs
    from it; $KVLAB_COMMIT where the code came without its git history (a copy sent to a GPU machine: the
    sender knows the commit); None outside a git checkout (a regular install)."""
    if os.environ.get("KVLAB_COMMIT"):
        return os.environ["KVLAB_COMMIT"]
    try:
        run = lambda *args: subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True,
                                           timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--", ".").stdout.strip()
        return head.stdout.strip() + (" +uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(packages=("transformers", "triton")) -> dict:
    """The machine and code a benchmark ran on: UTC date, versions, CPU, torch threads, GPU, kvlab's git commit."""
    import torch

    import kvlab

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "kvlab": kvlab.__version__,
           "git_commit": git_commit(), "machine": platform.machine(), "processor": platform.processor() or None,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu"}
    for name in packages:
        try:
            env[name] = __import__(name).__version__
        except Exception:                                    # noqa: BLE001 -- absent is a fact too
            env[name] = None
    if torch.cuda.is_available():
        env["device"] = "cuda"
        env["gpu"] = torch.cuda.get_device_name()
    return env


def environments(result: dict) -> list[dict]:
    """Every environment a result records: one, or one per workload (bench.engine run workload by workload)."""
    env = result.get("environment") or {}
    if env and all(isinstance(v, dict) for v in env.values()):
        return list(env.values())
    return [env]


def environment_of(result: dict, workload: str | None = None) -> dict:
    """The environment of one workload (or the first one recorded)."""
    env = result.get("environment") or {}
    if workload is not None and isinstance(env.get(workload), dict):
        return env[workload]
    return environments(result)[0]


@dataclass
class Provenance:
    """Where a result came from, for the caption beside its figures."""
    card: str                 # the GPU (or "CPU, N cores")
    date: str                 # YYYY-MM-DD
    commit: str               # kvlab's commit, or NOT_RECORDED

    @property
    def recorded(self) -> bool:
        return self.commit != NOT_RECORDED

    def __str__(self) -> str:
        commit = f"commit {self.commit}" if self.recorded else NOT_RECORDED
        return f"{self.card}, {self.date}, {commit}"


def provenance(result: dict) -> Provenance:
    """Card, date and commit of a result, read from whichever fields its benchmark wrote."""
    envs = environments(result)
    card = result.get("card") or next((e["gpu"] for e in envs if e.get("gpu")), None)
    if card is None:
        cores = next((e.get("cpu_count") or e.get("cpu_threads") for e in envs if e), None)
        card = f"CPU ({cores} cores)" if cores else "CPU"
    date = str(result.get("date") or next((e["date"] for e in envs if e.get("date")), "undated"))[:10]
    commits = [result["commit"]] if result.get("commit") else []
    commits += [e["git_commit"] for e in envs if e.get("git_commit")]
    commits = list(dict.fromkeys(_short(c) for c in commits))
    return Provenance(card.split(" (")[0] if result.get("card") else card, date, "; ".join(commits) or NOT_RECORDED)


def _short(commit: str) -> str:
    """A full hash shortened to 12 characters; anything after it (a note) kept."""
    head, _, rest = str(commit).partition(" ")
    head = head[:12] if len(head) == 40 else head
    return f"{head} {rest}".strip()


# ---------------------------------------------------------------------------- bench.engine's results

def ran(summary: dict) -> bool:
    """A system's summary with tokens and a rate (a failed run has 0 tokens and a NaN rate)."""
    return bool(summary.get("tokens")) and summary["tokens_per_s"] == summary["tokens_per_s"]


def workload_table(result: dict, workload: str) -> list[tuple[str, float, float | None]]:
    """(system, tokens/s, kvlab's speed-up over it) for one workload, fastest first; failed runs left out."""
    systems = result["workloads"][workload]["systems"]
    kv = systems.get("kvlab", {}).get("tokens_per_s")
    rows = [(k, float(v["tokens_per_s"]), (kv / v["tokens_per_s"]) if kv and k != "kvlab" else None)
            for k, v in systems.items() if ran(v)]
    return sorted(rows, key=lambda r: -r[1])


def concurrency_series(result: dict) -> dict[str, tuple[list[int], list[float]]]:
    """system -> (request counts, tokens/s) from the result's "concurrency" sweep, as
    `python -m kvlab.bench.engine --concurrency` writes it: {"16": {"kvlab": tokens/s, "hf_padded": tokens/s,
    "ratio": ..., "kvlab_tpot_p50_s": ...}, ...} (numbers under system names; the other keys are per-system
    details). Empty if the result has no sweep."""
    points: dict[str, dict[int, float]] = {}
    for n, entry in (result.get("concurrency") or {}).items():
        for k, v in entry.items():
            if k in SYSTEMS and isinstance(v, (int, float)) and v == v:      # NaN: a failed run
                points.setdefault(k, {})[int(n)] = float(v)
    return {k: (sorted(p), [p[n] for n in sorted(p)]) for k, p in points.items()}


def flat_baselines(result: dict, systems=("hf_one_at_a_time",)) -> dict[str, float]:
    """Tokens/s of systems whose throughput does not depend on concurrency (one request at a time),
    from the first workload that ran them."""
    out = {}
    for w in sorted(result.get("workloads", {})):
        for k in systems:
            v = result["workloads"][w]["systems"].get(k)
            if k not in out and v and ran(v):
                out[k] = float(v["tokens_per_s"])
    return out


# the systems of bench.engine, in the order its docstring lists them
SYSTEMS = ("hf_one_at_a_time", "hf_threads", "hf_padded", "hf_static_compile", "hf_continuous", "kvlab")
