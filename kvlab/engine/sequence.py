"""A request and its sequences: the state the scheduler moves between queues.

A *request* is one prompt with its SamplingParams. It generates `n` samples; each is a
*sequence*: the token ids so far (prompt, then generated tokens) and how many of them
have their K/V in the cache (`num_computed_tokens`). Every step computes, for each
scheduled sequence, some of its not-yet-computed tokens:

    prefill   the prompt (in chunks when it is longer than the step's token budget);
              after a prefix-cache hit it starts past the cached tokens
    decode    one token: the one sampled last step, whose K/V nobody has computed yet

and when a step computes a sequence's last known token, the logits there sample the
next one. A sequence preempted by recompute keeps its token ids and goes back to the
waiting queue with num_computed_tokens = 0: re-admission recomputes prompt + generated
tokens in one prefill (vLLM's recompute preemption). With n > 1 the request starts with
one sequence; when its prompt is computed, it forks into n sequences that share the
prompt's blocks (copy-on-write on the partly filled last block), each sampling its own
first token from the same logits row.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from kvlab.engine.outputs import RequestMetrics
from kvlab.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: tuple[str, int]              # the allocator's key: (request_id, sample index)
    request: "Request"
    index: int                           # which of the request's n samples
    token_ids: list[int]                 # prompt + generated
    num_prompt_tokens: int
    num_computed_tokens: int = 0         # tokens whose K/V the cache holds
    num_allocated_tokens: int = 0        # tokens the allocator holds slots for (computed or about to be)
    status: SequenceStatus = SequenceStatus.WAITING
    row: int = -1                        # persistent row of the runner's block-table buffer while running
    reserved_rows: list[int] = field(default_factory=list)   # n > 1: rows kept for the samples it forks into
    block_table: list[int] = field(default_factory=list)     # the allocator's table, kept in step O(1) per token
    table_synced: int = 0                # block_table[:table_synced] is in the runner's buffer unchanged
    generator: torch.Generator | None = None                 # seeded requests: their own random stream
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_preemptions: int = 0
    # incremental detokenization and what has been handed out (kvlab.engine.detokenizer)
    detokenizer: object | None = None
    text: str = ""
    num_text_sent: int = 0               # chars of text already returned (DELTA outputs)
    num_tokens_sent: int = 0             # output tokens already returned (DELTA outputs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_allocated(self) -> int:
        """Prefill still to do: tokens that hold slots but whose K/V are not computed yet."""
        return self.num_allocated_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, {self.status.value}, tokens={self.num_tokens} "
                f"(prompt {self.num_prompt_tokens}), computed={self.num_computed_tokens})")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    sequences: list[Sequence] = field(default_factory=list)
    forked: bool = False                 # n > 1: the samples exist (after the prompt's prefill)

    @property
    def finished(self) -> bool:
        return (self.forked or self.params.n == 1) and all(s.finished for s in self.sequences)

    def new_sequence(self, index: int, token_ids: list[int], generator: torch.Generator | None) -> Sequence:
        seq = Sequence((self.request_id, index), self, index, list(token_ids), len(self.prompt_token_ids), generator=generator)
        self.sequences.append(seq)
        return seq
