"""What the engine hands back: per request (vLLM's RequestOutput / CompletionOutput), per
request timings (RequestMetrics), and per engine step (StepStats, for plots of the batch).

    RequestOutput
      request_id, prompt, prompt_token_ids, finished, num_cached_tokens, metrics
      outputs: [CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs,
                                 finish_reason, stop_reason), ...]   one per sample (n)

finish_reason is "stop" (EOS, a stop token or a stop string; stop_reason says which, None
for EOS), "length" (max_tokens or the model's maximum length) or "abort".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int                                   # which of the request's n samples
    text: str                                    # generated text (cumulative, or the new part: output_kind)
    token_ids: list[int]                         # generated token ids (same)
    cumulative_logprob: float | None = None      # sum of the chosen tokens' log-probabilities (if logprobs asked)
    logprobs: list[dict[int, float]] | None = None   # per token: {token id: log-probability}, top-k + chosen
    finish_reason: str | None = None             # None while running
    stop_reason: int | str | None = None         # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter) of one request's life, and what it cost."""
    arrival_time: float
    first_scheduled_time: float | None = None    # first step that computed any of its tokens
    first_token_time: float | None = None        # its first generated token (TTFT = this - arrival)
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0                     # times one of its sequences was preempted (recomputed)
    num_cached_tokens: int = 0                   # prompt tokens the prefix cache supplied at admission
    num_generation_tokens: int = 0               # tokens generated over all samples

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (of sample 0's stream, or all samples)."""
        if self.first_token_time is None or self.last_token_time is None or self.num_generation_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_generation_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0

    def __repr__(self) -> str:
        texts = [o.text if len(o.text) < 60 else o.text[:57] + "..." for o in self.outputs]
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r:.60}, "
                f"outputs={texts!r}, finished={self.finished})")


@dataclass
class StepStats:
    """One engine step, as the scheduler and the runner saw it."""
    step: int
    time: float                     # perf_counter at the start of the step
    num_running: int                # sequences running once the scheduler decided (before the forward pass)
    num_waiting: int                # sequences still waiting then
    num_decode_seqs: int            # rows with one new token
    num_prefill_seqs: int           # rows with a prompt chunk
    num_scheduled_tokens: int       # tokens in the step's flattened batch
    num_blocks_used: int            # KV blocks held once the scheduler decided (finishers still hold theirs)
    num_preempted: int              # sequences preempted this step
    schedule_time: float = 0.0      # seconds: the scheduler's decisions
    prepare_time: float = 0.0       # seconds: applying them to the runner's batch, building the step's inputs
    launch_time: float = 0.0        # seconds: launching forward + sampling (on the CPU: computing them)
    wait_time: float = 0.0          # seconds the host waited for the sampled ids
    forward_time: float = 0.0       # launch_time + wait_time: from launch until the tokens are on the host
    device_time: float | None = None   # seconds of GPU time for the step (CUDA events), None on CPU
    output_time: float = 0.0        # seconds: appending tokens, stop checks, detokenizing, outputs
    cuda_graph: bool = False        # the forward replayed a captured CUDA graph
    piecewise_graph: bool = False   # a mixed step: captured graph pieces, attention eager between them
    async_scheduling: bool = False  # this step was scheduled while the previous one ran
    admission_stop: str | None = None   # why the scheduler stopped admitting (SchedulerOutput.admission_stop)
    scheduled: list = field(default_factory=list, repr=False)   # [(seq_id, num_new_tokens)], for timelines
    spans: dict = field(default_factory=dict, repr=False)       # phase -> (start, end), time.perf_counter():
                                    # schedule, prepare, launch, wait, output (host); device (the GPU's work)

    @property
    def host_time(self) -> float:
        """Seconds the CPU spent on this step outside the forward pass."""
        return self.schedule_time + self.prepare_time + self.output_time

    @property
    def total_time(self) -> float:
        return self.schedule_time + self.prepare_time + self.forward_time + self.output_time


@dataclass(frozen=True)
class EngineStats:
    """The engine's live state (LLMEngine.get_stats; kvlab serve's /metrics reads it)."""
    num_requests_running: int = 0      # requests with a sequence in the running batch
    num_requests_waiting: int = 0      # requests waiting for admission (or re-admission after preemption)
    num_used_blocks: int = 0           # KV blocks held by live sequences
    num_blocks: int = 0                # KV blocks in the pool
    num_preemptions: int = 0           # sequences preempted since start
    num_aborted: int = 0               # requests aborted since start (disconnects, shutdown)
    num_steps: int = 0                 # engine steps since start
