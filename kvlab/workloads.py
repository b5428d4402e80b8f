"""Request traces: how long prompts and answers are, and when requests arrive.

A workload is a sequence of requests, each with a `prompt_len`, an `output_len`
(tokens the model will generate) and an `arrival_time`. Time is measured in
*decode steps* (one engine iteration, in which every running request produces
one token), which is the clock of `kvlab.fragmentation`; at ~30 ms a step,
a rate of 0.1 requests per step is about 3 requests per second.

The length distributions imitate the two traces of the vLLM paper (Kwon et al.,
"Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023, §6.1 and Figure 11):

    trace     mean input   mean output   (tokens, as published)
    ShareGPT  161.31       337.99        long, real ChatGPT conversations
    Alpaca     19.31        58.45        short, GPT-3.5-generated instructions

**These are synthetic draws matching those published means, not the traces
themselves.** Lengths are log-normal (long-tailed like real conversations:
most answers are short, a few are very long); the spreads (`sigma`) are our
choice, and each log-mean is solved so that the mean *after* clipping to 2048
tokens (OPT's context, the paper's setting) equals the published one; another
`max_len` clips the same draws differently. Everything is seeded and reproducible.
Real traces can be loaded from CSV or JSONL with `load`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from kvlab import checks

# published means (vLLM paper, §6.1): (mean input tokens, mean output tokens)
SHAREGPT_MEANS = (161.31, 337.99)
ALPACA_MEANS = (19.31, 58.45)


class Request(NamedTuple):
    prompt_len: int       # tokens in the prompt (K/V written at admission, by prefill)
    output_len: int       # tokens the request will generate before it finishes
    arrival_time: float   # decode steps since the start of the trace


@dataclass(frozen=True, eq=False)
class Workload:
    """Requests as three parallel arrays (a sequence of `Request`s when iterated)."""

    prompt_len: np.ndarray    # (n,) int64, >= 1
    output_len: np.ndarray    # (n,) int64, >= 1
    arrival_time: np.ndarray  # (n,) float64, >= 0, in decode steps
    name: str = "workload"

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"Workload name must be a string, got {checks.shown(self.name)}")
        where = f"Workload {self.name!r}"
        p = _token_counts(where, "prompt_len", self.prompt_len)
        o = _token_counts(where, "output_len", self.output_len)
        a = _numbers(where, "arrival_time", self.arrival_time).astype(np.float64)
        if not (p.ndim == o.ndim == a.ndim == 1 and len(p) == len(o) == len(a)):
            raise ValueError(
                f"{where}: prompt_len, output_len and arrival_time must be 1-D and of one "
                f"length, got shapes {p.shape}, {o.shape}, {a.shape}"
            )
        for field, values in (("prompt_len", p), ("output_len", o)):
            if len(values) and values.min() < 1:
                i = int(np.argmax(values < 1))
                raise ValueError(f"{where}: every prompt_len and output_len must be >= 1 token, "
                                 f"got {field}[{i}] = {values[i]}")
        bad = ~np.isfinite(a) | (a < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{where}: arrival_time must be finite and >= 0 (decode steps), "
                             f"got arrival_time[{i}] = {a[i]}")
        for field, value in (("prompt_len", p), ("output_len", o), ("arrival_time", a)):
            value.setflags(write=False)
            object.__setattr__(self, field, value)

    def __len__(self) -> int:
        return len(self.prompt_len)

    def __getitem__(self, i: int) -> Request:
        return Request(int(self.prompt_len[i]), int(self.output_len[i]), float(self.arrival_time[i]))

    def __iter__(self) -> Iterator[Request]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"Workload({self.name!r}, n={len(self)}, {self.describe()})"

    @property
    def total_len(self) -> np.ndarray:
        """(n,) final length of each request: prompt + output tokens."""
        return self.prompt_len + self.output_len

    def describe(self) -> str:
        if not len(self):
            return "empty"
        span = float(self.arrival_time.max() - self.arrival_time.min())
        return (f"mean prompt {self.prompt_len.mean():.1f}, mean output {self.output_len.mean():.1f}, "
                f"max total {int(self.total_len.max())}, arrivals over {span:.0f} steps")

    def with_arrivals(self, rate: float | None, seed: int = 0) -> "Workload":
        """The same lengths, re-timed: Poisson arrivals at `rate` per step, or all at 0 (rate=None)."""
        return Workload(self.prompt_len, self.output_len, poisson_arrivals(len(self), rate, seed), self.name)


def _token_counts(where: str, field: str, values) -> np.ndarray:
    """values as int64 token counts: ints, or floats that are whole numbers; never truncated."""
    a = _numbers(where, field, values, "whole numbers of tokens (a 1-D sequence of ints)")
    if a.dtype.kind == "f":
        fractional = ~np.isfinite(a) | (a != np.round(a)) | (np.abs(a) >= 2.0**63)
        if fractional.any():
            i = int(np.argmax(fractional))
            raise ValueError(f"{where}: {field} must be whole numbers of tokens, got {field}[{i}] = {a[i]} "
                             f"(a length is never rounded)")
    elif a.dtype.kind == "u" and a.size and a.max() > checks.INT64_MAX:
        raise ValueError(f"{where}: {field} must be whole numbers of tokens below 2**63, got {a.max()}")
    return a.astype(np.int64)


def _numbers(where: str, field: str, values, allowed: str = "numbers (a 1-D sequence)") -> np.ndarray:
    """values as a 1-D numeric numpy array (ints or floats; bools, strings and None refused)."""
    if isinstance(values, (str, bytes)) or values is None:
        raise TypeError(f"{where}: {field} must be {allowed}, got {checks.shown(values)}")
    try:
        a = np.asarray(values)
    except (ValueError, TypeError) as err:       # ragged nested lists
        raise ValueError(f"{where}: {field} must be {allowed}: {err}") from None
    if a.ndim != 1:
        raise ValueError(f"{where}: {field} must be {allowed}, got shape {a.shape}")
    if a.size == 0:
        return a.astype(np.float64)
    if a.dtype.kind not in "iuf":
        what = {"b": "bools", "U": "strings", "S": "bytes", "O": "objects (None, huge ints or mixed types)"}.get(
            a.dtype.kind, f"dtype {a.dtype}")
        raise TypeError(f"{where}: {field} must be {allowed}, got {what}")
    return a


def _check_rate(rate) -> float | None:
    if rate is None:
        return None
    return checks.in_range("rate", rate, 0, math.inf, "a positive finite number of requests per step, or None "
                           "(all at once)", low_open=True, high_open=True)


def poisson_arrivals(n: int, rate: float | None, seed: int = 0) -> np.ndarray:
    """(n,) arrival times of a Poisson process with `rate` requests per step; rate=None: all at 0."""
    n = _check_n(n)
    rate, seed = _check_rate(rate), _check_seed(seed)
    if rate is None or n == 0:
        return np.zeros(n)    # all at once, or no requests at all
    with np.errstate(over="ignore", invalid="ignore"):
        gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, size=n)  # (n,) inter-arrival times
        times = np.cumsum(gaps) - gaps[0]  # the first request arrives at time 0
    if not np.isfinite(times).all():
        raise ValueError(f"rate {rate!r} is so small that arrival times overflow a float (inf); "
                         f"use a rate that spaces {n} requests over less than 1e300 steps")
    return times


def _phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _clipped_lognormal_mean(mu: float, sigma: float, clips: Sequence[float]) -> float:
    """Average over `clips` c of E[min(X, c)] for X ~ LogNormal(mu, sigma) (closed form)."""
    total = 0.0
    for c in clips:
        lc = math.log(c)
        total += math.exp(mu + sigma**2 / 2) * _phi((lc - mu - sigma**2) / sigma) + c * (1.0 - _phi((lc - mu) / sigma))
    return total / len(clips)


def _lognormal_mu(mean: float, sigma: float, clips: Sequence[float]) -> float:
    """Log-mean mu with the clipped mean (above) equal to `mean`, by bisection (it grows with mu)."""
    if mean >= sum(clips) / len(clips):
        raise ValueError(f"a mean of {mean} tokens cannot be reached when lengths are clipped at {max(clips)}")
    lo, hi = -20.0, math.log(max(clips)) + 20.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _clipped_lognormal_mean(mid, sigma, clips) < mean else (lo, mid)
    return 0.5 * (lo + hi)


MAX_REQUESTS = 10**8     # a 2.4 GB workload: more is a typo, not a trace
MAX_LEN = 2**62          # prompt + output tokens of one request, with room to add in int64


def _check_n(n) -> int:
    return checks.integer("n", n, 0, MAX_REQUESTS, allowed=f"an integer in 0..{MAX_REQUESTS:,} (requests)")


def _check_seed(seed) -> int:
    return checks.integer("seed", seed, 0, allowed="an integer >= 0")


def _check_max_len(max_len) -> int:
    return checks.integer("max_len", max_len, 2, MAX_LEN,
                          allowed="an integer in 2..2**62 (at least one prompt and one output token)")


def _check_common(n, max_len, seed) -> tuple[int, int, int]:
    return _check_n(n), _check_max_len(max_len), _check_seed(seed)


PUBLISHED_MAX_LEN = 2048  # the traces' means are of requests that fit OPT's 2048-token context


def lognormal_lengths(n: int, mean_prompt: float, mean_output: float, *, sigma_prompt: float,
                      sigma_output: float, max_len: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_len, output_len), each (n,) int64, long-tailed, clipped so prompt + output <= max_len.

    The distributions are solved once, so that at max_len = PUBLISHED_MAX_LEN the means are
    mean_prompt and mean_output; another max_len serves the same draws clipped differently
    (a smaller one shortens the long tail and lowers the means).
    """
    n, max_len, seed = _check_common(n, max_len, seed)
    mean_prompt, mean_output = (checks.in_range(name, value, 1, PUBLISHED_MAX_LEN - 1, "a number of tokens in "
                                                f"[1, {PUBLISHED_MAX_LEN - 1})", high_open=True)
                                for name, value in (("mean_prompt", mean_prompt), ("mean_output", mean_output)))
    sigma_prompt, sigma_output = (checks.in_range(name, value, 0, 10, "a number in (0, 10]", low_open=True)
                                  for name, value in (("sigma_prompt", sigma_prompt), ("sigma_output", sigma_output)))
    rng = np.random.default_rng([seed, 0])
    ref = PUBLISHED_MAX_LEN
    mu_p = _lognormal_mu(mean_prompt, sigma_prompt, [ref - 1])
    # the output may use the room its prompt leaves: average that clip over 64 quantiles of the prompt
    quantiles = [NormalDist(mu_p, sigma_prompt).inv_cdf((i + 0.5) / 64) for i in range(64)]
    mu_o = _lognormal_mu(mean_output, sigma_output, [ref - min(max(math.exp(q), 1), ref - 1) for q in quantiles])
    prompt = np.clip(np.rint(rng.lognormal(mu_p, sigma_prompt, n)), 1, max_len - 1).astype(np.int64)
    output = np.clip(np.rint(rng.lognormal(mu_o, sigma_output, n)), 1, max_len - prompt).astype(np.int64)
    return prompt, output


def sharegpt_like(n: int = 1000, seed: int = 0, *, rate: float | None = None, max_len: int = 2048) -> Workload:
    """Synthetic ShareGPT-like trace: long-tailed lengths with the published means (161.31 in, 337.99 out).

    Not the ShareGPT trace: log-normal draws (sigma 1.0 for prompts and outputs, our choice) whose
    means, clipped at 2048 tokens, match those the vLLM paper reports. Arrivals: Poisson at `rate`
    per step, or all at 0. Requests are clipped so that prompt + output <= max_len.
    """
    _check_rate(rate)             # every argument checked before anything is drawn
    p, o = lognormal_lengths(n, *SHAREGPT_MEANS, sigma_prompt=1.0, sigma_output=1.0, max_len=max_len, seed=seed)
    return Workload(p, o, poisson_arrivals(n, rate, seed), name="sharegpt-like")


def alpaca_like(n: int = 1000, seed: int = 0, *, rate: float | None = None, max_len: int = 2048) -> Workload:
    """Synthetic Alpaca-like trace: short lengths with the published means (19.31 in, 58.45 out).

    Not the Alpaca data set: log-normal draws (sigma 0.6 for prompts, 0.8 for outputs, our choice)
    whose means, clipped at 2048 tokens, match those the vLLM paper reports.
    """
    _check_rate(rate)
    p, o = lognormal_lengths(n, *ALPACA_MEANS, sigma_prompt=0.6, sigma_output=0.8, max_len=max_len, seed=seed)
    return Workload(p, o, poisson_arrivals(n, rate, seed), name="alpaca-like")


def uniform(n: int = 1000, seed: int = 0, *, prompt_range: tuple[int, int] = (1, 512),
            output_range: tuple[int, int] = (1, 512), rate: float | None = None, max_len: int = 2048) -> Workload:
    """Prompt and output lengths uniform on the inclusive ranges, clipped so prompt + output <= max_len
    (a prompt to max_len - 1 tokens, its output to the rest). A prompt_range that lies wholly above
    max_len - 1 is refused: every prompt would be max_len - 1 tokens."""
    n, max_len, seed = _check_common(n, max_len, seed)
    prompt_range, output_range = _check_range("prompt_range", prompt_range), _check_range("output_range", output_range)
    if prompt_range[0] > max_len - 1:
        raise ValueError(f"prompt_range {prompt_range} does not fit max_len={max_len}: a prompt may have at most "
                         f"max_len - 1 = {max_len - 1} tokens (one output token at least), so every prompt would "
                         f"have {max_len - 1}; lower the range or raise max_len")
    _check_rate(rate)
    rng = np.random.default_rng([seed, 0])
    p = np.minimum(rng.integers(prompt_range[0], prompt_range[1] + 1, n), max_len - 1)
    o = np.clip(rng.integers(output_range[0], output_range[1] + 1, n), 1, max_len - p)
    return Workload(p, o, poisson_arrivals(n, rate, seed), name="uniform")


def _check_range(name: str, value) -> tuple[int, int]:
    allowed = "a pair (lo, hi) of integers with 1 <= lo <= hi < 2**62"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be {allowed}, got {checks.shown(value)}")
    lo, hi = (checks.integer(f"{name}[{i}]", v, allowed=allowed) for i, v in enumerate(value))
    if not 1 <= lo <= hi < MAX_LEN:
        raise ValueError(f"{name} must be {allowed}, got {(lo, hi)}")
    return lo, hi


def from_lengths(prompt_len: Sequence[int], output_len: Sequence[int],
                 arrival_time: Sequence[float] | None = None, name: str = "custom") -> Workload:
    """A workload from explicit lengths (arrivals all at 0 unless given)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {checks.shown(name)}")
    prompt_len = _token_counts(f"Workload {name!r}", "prompt_len", prompt_len)
    return Workload(prompt_len, output_len, np.zeros(len(prompt_len)) if arrival_time is None else arrival_time, name)


def load(path: str | Path, name: str | None = None) -> Workload:
    """Lengths from a CSV (header row) or JSONL file with fields prompt_len, output_len[, arrival_time].

    Lengths are whole numbers of tokens >= 1 (10 and 10.0 are read, 10.5 is refused, never
    rounded); arrival_time, in decode steps, is finite and >= 0 (empty or absent: 0). An error
    names the file, the line (counted as an editor counts, the CSV header is line 1) and the field.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or a path, got {checks.shown(path)}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string or None, got {checks.shown(name)}")
    path = Path(path)
    kind = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: expected a .csv or .jsonl file, got suffix {path.suffix!r}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    records = _jsonl_records(path, text) if kind == "jsonl" else _csv_records(path, text)
    columns: dict[str, list] = {"prompt_len": [], "output_len": [], "arrival_time": []}
    for line, row in records:
        for field, values in columns.items():
            values.append(_read_field(path, line, row, field))
    return from_lengths(columns["prompt_len"], columns["output_len"], columns["arrival_time"], name or path.stem)


_FIELDS = "each record needs prompt_len and output_len (whole numbers of tokens >= 1) and may have arrival_time"


def _jsonl_records(path: Path, text: str) -> list[tuple[int, dict]]:
    records = []
    for line, raw in enumerate(text.split("\n"), start=1):      # lines as an editor numbers them
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line}: not valid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {line}: expected a JSON object such as "
                             f'{{"prompt_len": 10, "output_len": 20}}, got {checks.shown(row)}')
        records.append((line, row))
    return records


def _csv_records(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if reader.fieldnames is None:                  # an empty file: no requests
            return []
        missing = [f for f in ("prompt_len", "output_len") if f not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}, line 1 (the header): no column {', '.join(map(repr, missing))}; "
                             f"columns are {reader.fieldnames}; {_FIELDS}")
        return [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num}: not valid CSV: {err}") from None


def _read_field(path: Path, line: int, row: dict, field: str):
    """One field of one record: an int token count, or a float arrival time (0 when absent)."""
    where = f"{path}, line {line}, field {field!r}"
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if field == "arrival_time":
            return 0.0
        raise ValueError(f"{path}, line {line}: no {field!r}; {_FIELDS}")
    if isinstance(value, str):                       # CSV gives text
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{where}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {checks.shown(value)}")
    if field == "arrival_time":
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}: an arrival time must be a finite number of decode steps >= 0, got {value!r}")
        return float(value)
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{where}: {value!r} is not a whole number of tokens (a length is never rounded)")
        value = int(value)
    if not 1 <= value <= checks.INT64_MAX:
        raise ValueError(f"{where}: a length must be a whole number of tokens in 1..2**63 - 1, got {checks.brief(value)}")
    return value
