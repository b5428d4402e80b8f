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
import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Iterator, NamedTuple, Sequence

import numpy as np

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
        p = np.asarray(self.prompt_len, dtype=np.int64)
        o = np.asarray(self.output_len, dtype=np.int64)
        a = np.asarray(self.arrival_time, dtype=np.float64)
        if not (p.ndim == o.ndim == a.ndim == 1 and len(p) == len(o) == len(a)):
            raise ValueError(
                f"Workload {self.name!r}: prompt_len, output_len and arrival_time must be 1-D and of one "
                f"length, got shapes {p.shape}, {o.shape}, {a.shape}"
            )
        if len(p) and (p.min() < 1 or o.min() < 1):
            raise ValueError(f"Workload {self.name!r}: every prompt_len and output_len must be >= 1 token")
        if len(a) and (not np.all(np.isfinite(a)) or a.min() < 0):
            raise ValueError(f"Workload {self.name!r}: arrival_time must be finite and >= 0 (decode steps)")
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


def poisson_arrivals(n: int, rate: float | None, seed: int = 0) -> np.ndarray:
    """(n,) arrival times of a Poisson process with `rate` requests per step; rate=None: all at 0."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if rate is None or n == 0:
        return np.zeros(n)    # all at once, or no requests at all
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests per step (or None: all at once), got {rate}")
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, size=n)  # (n,) inter-arrival times
    return np.cumsum(gaps) - gaps[0]  # the first request arrives at time 0


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


def _check_common(n: int, max_len: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(max_len, (int, np.integer)) or max_len < 2:
        raise ValueError(f"max_len must be an integer >= 2 (one prompt and one output token), got {max_len!r}")


PUBLISHED_MAX_LEN = 2048  # the traces' means are of requests that fit OPT's 2048-token context


def lognormal_lengths(n: int, mean_prompt: float, mean_output: float, *, sigma_prompt: float,
                      sigma_output: float, max_len: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_len, output_len), each (n,) int64, long-tailed, clipped so prompt + output <= max_len.

    The distributions are solved once, so that at max_len = PUBLISHED_MAX_LEN the means are
    mean_prompt and mean_output; another max_len serves the same draws clipped differently
    (a smaller one shortens the long tail and lowers the means).
    """
    _check_common(n, max_len)
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
    p, o = lognormal_lengths(n, *SHAREGPT_MEANS, sigma_prompt=1.0, sigma_output=1.0, max_len=max_len, seed=seed)
    return Workload(p, o, poisson_arrivals(n, rate, seed), name="sharegpt-like")


def alpaca_like(n: int = 1000, seed: int = 0, *, rate: float | None = None, max_len: int = 2048) -> Workload:
    """Synthetic Alpaca-like trace: short lengths with the published means (19.31 in, 58.45 out).

    Not the Alpaca data set: log-normal draws (sigma 0.6 for prompts, 0.8 for outputs, our choice)
    whose means, clipped at 2048 tokens, match those the vLLM paper reports.
    """
    p, o = lognormal_lengths(n, *ALPACA_MEANS, sigma_prompt=0.6, sigma_output=0.8, max_len=max_len, seed=seed)
    return Workload(p, o, poisson_arrivals(n, rate, seed), name="alpaca-like")


def uniform(n: int = 1000, seed: int = 0, *, prompt_range: tuple[int, int] = (1, 512),
            output_range: tuple[int, int] = (1, 512), rate: float | None = None, max_len: int = 2048) -> Workload:
    """Prompt and output lengths uniform on the inclusive ranges, clipped so prompt + output <= max_len."""
    _check_common(n, max_len)
    for label, (lo, hi) in (("prompt_range", prompt_range), ("output_range", output_range)):
        if not (1 <= lo <= hi):
            raise ValueError(f"{label} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
    rng = np.random.default_rng([seed, 0])
    p = np.minimum(rng.integers(prompt_range[0], prompt_range[1] + 1, n), max_len - 1)
    o = np.clip(rng.integers(output_range[0], output_range[1] + 1, n), 1, max_len - p)
    return Workload(p, o, poisson_arrivals(n, rate, seed), name="uniform")


def from_lengths(prompt_len: Sequence[int], output_len: Sequence[int],
                 arrival_time: Sequence[float] | None = None, name: str = "custom") -> Workload:
    """A workload from explicit lengths (arrivals all at 0 unless given)."""
    a = np.zeros(len(prompt_len)) if arrival_time is None else arrival_time
    return Workload(np.asarray(prompt_len), np.asarray(output_len), np.asarray(a, dtype=np.float64), name)


def load(path: str | Path, name: str | None = None) -> Workload:
    """Lengths from a CSV (header row) or JSONL file with fields prompt_len, output_len[, arrival_time]."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: expected a .csv or .jsonl file, got suffix {path.suffix!r}")
    for i, row in enumerate(rows):
        missing = {"prompt_len", "output_len"} - set(row)
        if missing:
            raise ValueError(f"{path}: record {i} lacks {sorted(missing)}; each needs prompt_len, output_len "
                             f"and optionally arrival_time")
    return from_lengths([int(r["prompt_len"]) for r in rows], [int(r["output_len"]) for r in rows],
                        [float(r.get("arrival_time") or 0.0) for r in rows], name or path.stem)
