"""A request and its sequences: the state the scheduler moves between queues.

A *request* is one prompt with its SamplingParams. It generates `n` samples; each is a
*sequence*: the token ids so far (prompt, then generated tokens) and how many of them
have their K/V in the cache, or on the way there (`num_computed_tokens`). Every step
computes, for each scheduled sequence, some of its not-yet-computed tokens:

    prefill   the prompt (in chunks when it is longer than the step's token budget);
              after a prefix-cache hit it starts past the cached tokens
    decode    one token: the one sampled last step, whose K/V nobody has computed yet

and when a step computes a sequence's last token, the logits there sample the next one.

As in vLLM v1, `num_computed_tokens` moves forward when the scheduler *schedules* tokens,
not when the step that computes them finishes: so the scheduler can plan step N + 1 while
step N still runs on the GPU (asynchronous scheduling). The token step N samples is then
not known yet when step N + 1 is planned: it counts as *pending* (`num_pending`, 0 or 1),
takes its slot in the cache, and its id reaches the host while step N + 1 runs.

A sequence preempted by recompute keeps its token ids and goes back to the waiting queue
with num_computed_tokens = 0: re-admission recomputes prompt + generated tokens in one
prefill (vLLM's recompute preemption). With n > 1 the request starts with one sequence;
the step that computes the end of its prompt forks it into n sequences that share the
prompt's blocks (copy-on-write on the partly filled last block), each sampling its own
first token from the same logits row.

The scheduler's side only: the model runner keeps its own rows (kvlab.engine.input_batch),
fed by the SchedulerOutput's plain data, and never reads a Sequence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvlab.engine.outputs import RequestMetrics
from kvlab.engine.sampling_params import SamplingParams

SeqId = tuple[str, int]                  # (request_id, sample index): the key of a sequence everywhere


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: SeqId
    request: "Request"
    index: int                           # which of the request's n samples
    token_ids: list[int]                 # prompt + generated tokens known on the host
    num_prompt_tokens: int
    num_computed_tokens: int = 0         # tokens whose K/V are in the cache or scheduled to be written
    num_allocated_tokens: int = 0        # tokens holding a slot in the cache (computed, or about to be)
    num_pending: int = 0                 # sampled by a step whose result has not reached the host yet
    max_num_tokens: int = 0              # its length limit: prompt + max_tokens, or the model's maximum
    status: SequenceStatus = SequenceStatus.WAITING
    num_reserved_seqs: int = 0           # n > 1 before the fork: places under max_num_seqs kept for the samples
    prefix_hashes: list[int] = field(default_factory=list)  # prefix-cache names of its full blocks, hashed once
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_preemptions: int = 0
    # incremental detokenization and what has been handed out (LLMEngine's output processing)
    detokenizer: object | None = None
    text: str = ""
    num_text_sent: int = 0               # chars of text already returned (DELTA outputs)
    num_tokens_sent: int = 0             # output tokens already reported (DELTA: returned; stream_interval)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, the pending one included."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def __repr__(self) -> str:
        pending = f" + {self.num_pending} pending" if self.num_pending else ""
        return (f"Sequence({self.seq_id!r}, {self.status.value}, tokens={len(self.token_ids)}{pending} "
                f"(prompt {self.num_prompt_tokens}), computed={self.num_computed_tokens})")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    sequences: list[Sequence] = field(default_factory=list)
    forked: bool = False                 # n > 1: the samples exist (from the step that ends the prompt)

    @property
    def finished(self) -> bool:
        for s in self.sequences:                         # (n > 1 before the fork: only by an abort)
            if s.status is not SequenceStatus.FINISHED:  # (a loop, not all(...): read every step)
                return False
        return True

    def new_sequence(self, index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence((self.request_id, index), self, index, list(token_ids), len(self.prompt_token_ids))
        self.sequences.append(seq)
        return seq
