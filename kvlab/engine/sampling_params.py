"""SamplingParams: how one request wants its tokens chosen, and when it stops.

The fields and their defaults are vLLM's (`vllm.SamplingParams`), so a script moves
between kvlab and vLLM by changing its import. Every field is checked when the
object is made, with a message that says what is allowed: a bad request is refused
when it is added, never half-way through a batch.

Choosing a token from the model's logits z (one row, vocab wide):
  temperature 0      greedy: argmax z (top_k, top_p and seed are then irrelevant)
  temperature T > 0  p = softmax(z / T), then
  top_k = k          keep the k most likely tokens (0 or -1: all)
  top_p = q          keep the smallest set of most likely tokens whose mass reaches q
  seed               this request draws from its own random generator, so its text is the
                     same whatever else shares the batch (with n > 1, sample i uses seed + i)
Stopping (the first that holds): `max_tokens` generated; the model's EOS token (unless
`ignore_eos`); a token in `stop_token_ids`; a string in `stop` appearing in the text (the
text is cut before it); the model's maximum length.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from kvlab import checks


MAX_N = 1024                 # samples of one prompt (the engine also caps n at max_num_seqs)
MAX_TOP_K = 2**31 - 1        # a count of tokens; the engine refuses one above the model's vocabulary
MAX_SEED = 2**64 - 1         # torch.Generator takes 64-bit seeds; sample i uses (seed + i) mod 2**64
MAX_LOGPROBS = 20            # vLLM's default max_logprobs (and OpenAI's top_logprobs limit)


class RequestOutputKind(enum.Enum):
    """What `LLMEngine.step()` returns for a request (vLLM's names)."""
    CUMULATIVE = 0     # everything generated so far, every step
    DELTA = 1          # only what is new since the last output (streaming)
    FINAL_ONLY = 2     # nothing until the request finishes (LLM.generate)


@dataclass
class SamplingParams:
    n: int = 1                                 # independent samples of one prompt (they share its blocks)
    temperature: float = 1.0                   # vLLM's default; 0 = greedy
    top_p: float = 1.0                         # nucleus: keep the most likely tokens up to this mass
    top_k: int = 0                             # keep the k most likely tokens; 0 or -1: all
    seed: int | None = None                    # per-request generator: same text whatever the batch
    max_tokens: int | None = 16                # vLLM's default; None: until EOS or the model's maximum
    stop: str | list[str] | None = None        # stop strings (not included in the text)
    stop_token_ids: list[int] | None = None    # stop tokens (included in token_ids, like EOS)
    ignore_eos: bool = False                   # keep going past EOS (benchmarks: fixed lengths)
    logprobs: int | None = None                # also return the top-`logprobs` log-probabilities per token
    skip_special_tokens: bool = True           # leave special tokens (EOS, ...) out of the text
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: tuple[str, ...] = field(init=False, repr=False)   # `stop` as a tuple

    def __post_init__(self):
        # Every bound below is what the engine can execute: a value accepted here runs (top_k is a
        # count of tokens, seeds are 64-bit, logprobs is capped as vLLM's max_logprobs). What depends
        # on the model (top_k and stop token ids within its vocabulary, n <= max_num_seqs) is checked
        # by LLMEngine.add_request, which re-checks the whole object (it may have changed since).
        self.n = _int("n", self.n, low=1, high=MAX_N, allowed=f"an integer in 1..{MAX_N}")
        self.temperature = _float("temperature", self.temperature, low=0.0,
                                  allowed="a number >= 0 (0 means greedy)")
        self.top_p = _float("top_p", self.top_p, low=0.0, low_open=True, high=1.0, allowed="a number in (0, 1]")
        self.top_k = _int("top_k", self.top_k, low=-1, high=MAX_TOP_K,
                          allowed=f"an integer in 1..{MAX_TOP_K:,} (at most the vocabulary), or 0 / -1 for no limit")
        if self.seed is not None:
            self.seed = _int("seed", self.seed, low=0, high=MAX_SEED,
                             allowed="None or an integer in 0..2**64 - 1 (a 64-bit seed)")
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens, low=1, high=checks.INT64_MAX,
                                   allowed="None or an integer >= 1")
        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS,
                                 allowed=f"None or an integer in 0..{MAX_LOGPROBS} (top log-probabilities per token)")
        if self.stop is None:
            stop = []
        elif isinstance(self.stop, str):
            stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            stop = list(self.stop)
        else:
            raise TypeError(f"stop must be None, a string or a list of strings, got {checks.shown(self.stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a non-empty string or a list of them, got {checks.brief(self.stop)}")
        self.stop_strings = tuple(stop)
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens"):
            setattr(self, name, checks.boolean(name, getattr(self, name)))
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError(f"output_kind must be a RequestOutputKind, got {checks.shown(self.output_kind)}")

    @property
    def max_stop_string_len(self) -> int:
        return max((len(s) for s in self.stop_strings), default=0)


def _int(name: str, value, low: int, allowed: str | None = None, high: int | None = None) -> int:
    return checks.integer(name, value, minimum=low, maximum=high, allowed=allowed or f"an integer >= {low}")


def _token_ids(name: str, value) -> list[int]:
    """None or an iterable of token ids (a list, a tuple, a numpy array) -> a list of ints >= 0."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be None or a list of token ids, got {checks.shown(value)}")
    return [_int(name, t, low=0, high=checks.INT64_MAX, allowed="a list of token ids >= 0") for t in value]


def _float(name: str, value, low: float, allowed: str, low_open: bool = False, high: float | None = None) -> float:
    """A finite number in [low, high] (low excluded when low_open)."""
    return checks.in_range(name, value, low, math.inf if high is None else high, allowed, low_open=low_open,
                           high_open=high is None)
