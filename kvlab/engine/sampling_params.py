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
        self.n = _int("n", self.n, low=1)
        self.temperature = _float("temperature", self.temperature, low=0.0,
                                  allowed="a number >= 0 (0 means greedy)")
        self.top_p = _float("top_p", self.top_p, low=0.0, low_open=True, high=1.0, allowed="a number in (0, 1]")
        self.top_k = _int("top_k", self.top_k, low=-1, allowed="an integer >= 1, or 0 / -1 for no limit")
        if self.seed is not None:
            self.seed = _int("seed", self.seed, low=0, allowed="None or an integer >= 0")
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens, low=1, allowed="None or an integer >= 1")
        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs, low=0, allowed="None or an integer >= 0")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_strings = tuple(stop)
        ids = list(self.stop_token_ids or [])
        self.stop_token_ids = [_int("stop_token_ids", t, low=0, allowed="a list of token ids >= 0") for t in ids]
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def max_stop_string_len(self) -> int:
        return max((len(s) for s in self.stop_strings), default=0)


def _int(name: str, value, low: int, allowed: str | None = None) -> int:
    return checks.integer(name, value, minimum=low, allowed=allowed or f"an integer >= {low}")


def _float(name: str, value, low: float, allowed: str, low_open: bool = False, high: float | None = None) -> float:
    """A finite number in [low, high] (low excluded when low_open)."""
    return checks.in_range(name, value, low, math.inf if high is None else high, allowed, low_open=low_open,
                           high_open=high is None)
