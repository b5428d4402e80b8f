"""LLMEngine: requests in, one batched step at a time, outputs out (vLLM's LLMEngine).

    engine = LLMEngine(EngineArgs(model="smollm2-135m"))
    engine.add_request("r0", "The factory production line optimization requires",
                       SamplingParams(temperature=0, max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():          # what each request produced in this step
            ...
    engine.abort_request("r0")             # anywhere in its life; its blocks are freed

`step()` is the whole loop of a serving engine, three stages that hand each other plain data:

    Scheduler.schedule()                -> SchedulerOutput    who runs, with how many tokens
    ModelRunner.execute_model(...)      -> ModelRunnerOutput  one forward pass, the sampled ids
    Scheduler.update_from_output(...)   tokens appended, finished sequences freed
    OutputProcessor.process(...)        -> RequestOutputs     text, stop strings, what to hand out

Synchronous, each step runs them in that order, and the GPU waits while the host
schedules, prepares and processes outputs. With asynchronous scheduling (the default on a
GPU) step() schedules and launches step N + 1 first, then collects and processes step N
while N + 1 runs: the host's work hides under the GPU's (vLLM v1's async scheduling):

    sync     host  [sched N][prep N][launch N]..wait..[out N][sched N+1][prep N+1][launch N+1]..wait..
             GPU                              [ step N ]                                    [ step N+1 ]
    async    host  [sched N+1][prep N+1][launch N+1][wait N][out N][sched N+2][prep N+2][launch N+2][wait N+1]
             GPU   [ step N             ][ step N+1                      ][ step N+2 ...

A step that fails is contained: a request the runner cannot take, or whose output cannot
be processed, ends with finish_reason "error" and the others go on; if a whole step raises,
the requests in it end with "error" and the engine keeps serving the rest.
`stats` keeps one StepStats per step.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from collections import deque

import torch

from kvlab import checks
from kvlab.engine.config import EngineArgs
from kvlab.engine.model_runner import ModelRunner, ModelRunnerOutput, PendingOutput
from kvlab.engine.output_processor import OutputProcessor
from kvlab.engine.outputs import EngineStats, RequestMetrics, RequestOutput, StepStats
from kvlab.engine.sampling_params import SamplingParams
from kvlab.engine.scheduler import Scheduler, SchedulerOutput
from kvlab.engine.sequence import Request
from kvlab.paged.block_allocator import BlockAllocator

MAX_STEP_STATS = 100_000       # keep the last this many steps' stats (a server runs for days)
logger = logging.getLogger("kvlab.engine")


@dataclasses.dataclass
class _Launched:
    """A step sent to the runner whose output has not been processed yet."""
    out: SchedulerOutput
    pending: PendingOutput | None          # None: the launch itself failed (error)
    stats: StepStats
    error: str | None = None


class LLMEngine:
    def __init__(self, args: EngineArgs):
        from kvlab.model.loading import LoadedModel, load_model
        from kvlab.model.transformer import Transformer

        if not isinstance(args, EngineArgs):
            raise TypeError(f"LLMEngine takes a kvlab.EngineArgs, got {checks.shown(args)}; build one with "
                            f"EngineArgs(model=..., ...) or call LLMEngine.from_engine_args(model=..., ...)")
        self.args = args
        t0 = time.perf_counter()
        lm = args.model if isinstance(args.model, LoadedModel) else \
            load_model(args.model, device=args.device, dtype=args.dtype)
        self.loaded_model = lm
        self.tokenizer = None if args.skip_tokenizer_init else lm.tokenizer
        if self.tokenizer is None and args.skip_tokenizer_init is False:
            raise ValueError(f"model {lm.name!r} has no tokenizer: pass skip_tokenizer_init=True (or None) and "
                             f"prompts as token ids")
        self.model = Transformer.from_hf(lm.hf_model)
        self.eos_token_id = getattr(lm.hf_model.config, "eos_token_id", None)
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0]
        self.load_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.max_model_len = self._max_model_len()
        self.model.check_positions(self.max_model_len - 1)          # once, not per step: RoPE table, window
        self.runner = ModelRunner(self.model, args, self.max_model_len)
        self._fit_max_model_len_to_pool()
        order = None
        if args.block_order_seed is not None:
            g = torch.Generator().manual_seed(args.block_order_seed)
            order = torch.randperm(self.runner.num_blocks, generator=g).tolist()
        self.allocator = BlockAllocator(self.runner.num_blocks, args.block_size, args.enable_prefix_caching,
                                        free_order=order)
        self.scheduler = Scheduler(self.allocator, args.max_num_seqs, args.max_num_batched_tokens,
                                   self.max_model_len, args.watermark, args.enable_chunked_prefill,
                                   self.eos_token_id)
        self.output_processor = OutputProcessor(self.scheduler, self.tokenizer, args.stream_interval)
        self.async_scheduling = self.runner.is_cuda if args.async_scheduling is None else args.async_scheduling
        self.init_time = time.perf_counter() - t0             # KV sizing, allocation, CUDA graph capture
        self.stats: deque[StepStats] = deque(maxlen=MAX_STEP_STATS)
        self.record_schedule = False                          # keep each step's (seq, tokens) list: timelines
        self.on_schedule = None                               # called with each SchedulerOutput before the forward
                                                              # pass (tools that show the decision: ui's x-ray)
        self.num_steps = 0
        self.num_aborted = 0
        self._in_flight: _Launched | None = None              # async: launched, output not processed yet
        self._deferred: list[RequestOutput] = []              # outputs a caller handed back for their owner

    @classmethod
    def from_engine_args(cls, **kwargs) -> "LLMEngine":
        return cls(EngineArgs(**kwargs))

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. prompt: text, a list of token ids, or {"prompt": text} /
        {"prompt_token_ids": ids} (vLLM's prompt dicts). Bad input raises ValueError (or
        TypeError) naming the request and what is allowed, and leaves the engine unchanged.
        The params are checked again here (they may have changed since they were made) and
        copied: changing them later changes nothing."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {checks.shown(request_id)}")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request {request_id!r}: that id is already in the engine; ids must be unique")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"request {request_id!r}: params must be a kvlab.SamplingParams, got "
                            f"{checks.shown(params)}")
        params = dataclasses.replace(params)                  # runs every check of SamplingParams again
        now = time.perf_counter()
        if arrival_time is not None:
            arrival_time = checks.in_range("arrival_time", arrival_time, 0.0, now, "None or a time.perf_counter() "
                                           "reading no later than now")
        text, token_ids = self._tokenize(request_id, prompt)
        self._check_request(request_id, token_ids, params)
        request = Request(request_id, text, token_ids, params,
                          RequestMetrics(arrival_time=now if arrival_time is None else arrival_time))
        request.new_sequence(0, token_ids)
        self.scheduler.add(request)

    def abort_request(self, request_id: str | list[str]) -> None:
        """Stop a request now, wherever it is (waiting, prefilling, decoding); its blocks are freed.
        An unknown id raises ValueError and aborts nothing."""
        if isinstance(request_id, str):
            ids = [request_id]
        elif isinstance(request_id, (list, tuple, set)) and all(isinstance(r, str) for r in request_id):
            ids = list(dict.fromkeys(request_id))              # each once
        else:
            raise TypeError(f"request_id must be a str or a list of str, got {checks.shown(request_id)}")
        unknown = [r for r in ids if r not in self.scheduler.requests]
        if unknown:
            raise ValueError(f"unknown request id(s) {unknown}: not in the engine (never added, finished, "
                             f"or aborted already)")
        for r in ids:
            request = self.scheduler.abort(r)
            request.metrics.finished_time = time.perf_counter()
            self.num_aborted += 1

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None or bool(self._deferred)

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    def unfinished_request_ids(self) -> list[str]:
        return list(self.scheduler.requests)

    def has_request(self, request_id: str) -> bool:
        """The request is in the engine: added, not finished or aborted yet."""
        return request_id in self.scheduler.requests

    def defer_outputs(self, outputs: list[RequestOutput]) -> None:
        """Hand back outputs of requests the caller does not own: the next step() returns them
        first, to whoever drives the engine then (LLM.generate does this for requests it did not
        add, so that nothing is lost when two callers share an engine)."""
        self._deferred.extend(outputs)

    def get_stats(self) -> EngineStats:
        """The engine's live state (read by kvlab serve's /metrics)."""
        return EngineStats(num_requests_running=self.scheduler.num_running_requests,
                           num_requests_waiting=self.scheduler.num_waiting_requests,
                           num_used_blocks=self.allocator.num_used_blocks, num_blocks=self.allocator.num_blocks,
                           num_preemptions=self.scheduler.num_preemptions, num_aborted=self.num_aborted,
                           num_steps=self.num_steps)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the RequestOutputs of the requests that progressed in it (with
        asynchronous scheduling: in the step before, while this one runs)."""
        outputs, self._deferred = self._deferred, []
        launched = self._schedule_and_launch()
        if self.async_scheduling:                          # step N + 1 is on its way: now finish step N
            previous, self._in_flight = self._in_flight, launched
            if previous is not None:
                outputs += self._finish(previous)
        elif launched is not None:
            outputs += self._finish(launched)
        if not self.scheduler.has_unfinished():
            outputs += self._drain()
        return outputs

    def _drain(self) -> list[RequestOutput]:
        """Every request is done: collect the step still in flight (it computed only tokens of
        sequences that had ended: dropped) and let the runner free the rows of those that left, so
        that an idle engine holds nothing."""
        outputs = []
        if self._in_flight is not None:
            launched, self._in_flight = self._in_flight, None
            outputs = self._finish(launched)
        out = self.scheduler.schedule()
        if out.finished_seq_ids or out.preempted_seq_ids:
            self.runner.execute_model(out)
        return outputs

    def _schedule_and_launch(self) -> _Launched | None:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        t1 = time.perf_counter()
        stats = StepStats(
            step=self.num_steps + 1, time=t0, num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), num_decode_seqs=out.num_decodes,
            num_prefill_seqs=len(out.num_scheduled_tokens) - out.num_decodes,
            num_scheduled_tokens=out.num_batched_tokens, num_blocks_used=self.allocator.num_used_blocks,
            num_preempted=len(out.preempted_seq_ids), schedule_time=t1 - t0,
            async_scheduling=self.async_scheduling, admission_stop=out.admission_stop,
            scheduled=[(s, n) for s, n in out.num_scheduled_tokens.items()] if self.record_schedule else [])
        stats.spans["schedule"] = (t0, t1)
        if self.on_schedule is not None:
            self.on_schedule(out)
        if out.is_empty:
            if out.finished_seq_ids or out.preempted_seq_ids:
                self.runner.execute_model(out)             # frees their rows; nothing to compute
            elif self.scheduler.has_unfinished() and self._in_flight is None:
                raise RuntimeError("the scheduler could schedule nothing although requests are waiting: "
                                   "a request larger than the KV pool slipped past add_request")
            return None
        self.num_steps += 1
        try:
            return _Launched(out, self.runner.execute_model(out), stats)
        except Exception as err:                           # noqa: BLE001 -- contained: see the module docstring
            logger.exception("engine step %d failed; its requests end with an error", stats.step)
            return _Launched(out, None, stats, error=f"the engine step failed: {type(err).__name__}: {err}")

    def _finish(self, launched: _Launched) -> list[RequestOutput]:
        """Collect a launched step's sampled ids, hand them to the scheduler, make the outputs."""
        out, stats = launched.out, launched.stats
        result = None
        if launched.error is None:
            try:
                result = launched.pending.get_output()
            except Exception as err:                       # noqa: BLE001
                logger.exception("engine step %d failed; its requests end with an error", stats.step)
                launched.error = f"the engine step failed: {type(err).__name__}: {err}"
        t0 = time.perf_counter()
        if result is None:                                 # the whole step failed: its requests end
            failed = {seq_id[0]: launched.error for seq_id in out.num_scheduled_tokens}
            result = ModelRunnerOutput([], [], None)
        else:
            failed = {seq_id[0]: message for seq_id, message in result.failed.items()}
        advanced = self.scheduler.update_from_output(out, result.sampled)
        logprobs = {} if result.logprobs is None else \
            {s: lp for s, lp in zip(result.seq_ids, result.logprobs) if lp is not None}
        outputs = self.output_processor.process(advanced, logprobs, failed)
        t1 = time.perf_counter()
        timing = result.timing
        stats.prepare_time, stats.launch_time, stats.wait_time = timing.prepare_time, timing.launch_time, \
            timing.wait_time
        stats.forward_time = timing.launch_time + timing.wait_time
        stats.device_time, stats.cuda_graph, stats.piecewise_graph = timing.device_time, timing.cuda_graph, \
            timing.piecewise
        stats.output_time = t1 - t0
        stats.spans.update(prepare=(timing.prepare_start, timing.launch_start),
                           launch=(timing.launch_start, timing.launch_end),
                           wait=(timing.wait_start, timing.wait_end), output=(t0, t1))
        if timing.device_start is not None:
            stats.spans["device"] = (timing.device_start, timing.device_end)
        self.stats.append(stats)
        return outputs

    # ------------------------------------------------------------------ internals
    def _tokenize(self, request_id: str, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
                if isinstance(prompt, (str, bytes, dict)) or not hasattr(prompt, "__iter__"):
                    raise TypeError(f"request {request_id!r}: 'prompt_token_ids' must be a list of token ids, "
                                    f"got {checks.shown(prompt)}")
                prompt = list(prompt)
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
                if not isinstance(prompt, str):
                    raise TypeError(f"request {request_id!r}: 'prompt' must be a str, got {checks.shown(prompt)}")
            else:
                raise ValueError(f"request {request_id!r}: a prompt dict needs 'prompt' or 'prompt_token_ids', "
                                 f"got keys {sorted(map(str, prompt))}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"request {request_id!r}: this engine has no tokenizer (skip_tokenizer_init): "
                                 f"pass the prompt as token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"request {request_id!r}: the prompt is not valid Unicode text: character "
                                 f"{err.start} is {prompt[err.start]!r}, a lone surrogate") from None
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise ValueError(f"request {request_id!r}: a tensor prompt must be 1-D token ids, got shape "
                                 f"{tuple(prompt.shape)}")
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)) or type(prompt).__module__ == "numpy":
            ids = list(prompt) if not hasattr(prompt, "tolist") else prompt.tolist()
            if not isinstance(ids, list):
                raise TypeError(f"request {request_id!r}: prompt must be a str, a list of token ids or a prompt "
                                f"dict, got {checks.shown(prompt)}")
            bad = [] if all(type(t) is int for t in ids) else \
                [t for t in ids if not isinstance(t, numbers.Integral) or checks._is_bool(t)]   # numpy ints pass
            if bad:
                raise TypeError(f"request {request_id!r}: token ids must be integers, got {checks.shown(bad[0])} "
                                f"among {checks.brief(ids)}")
            return None, [int(t) for t in ids]
        raise TypeError(f"request {request_id!r}: prompt must be a str, a list of token ids or a prompt dict, "
                        f"got {checks.shown(prompt)}")

    def _check_request(self, request_id: str, token_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model.spec.vocab_size
        if not token_ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty (0 tokens); a prompt needs at least "
                             f"one token")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id!r}: token id {bad[0]} is outside the vocabulary "
                             f"(0..{vocab - 1})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"request {request_id!r}: the prompt has {len(token_ids)} tokens; this engine's "
                             f"max_model_len is {self.max_model_len}, so a prompt may have at most "
                             f"{self.max_model_len - 1} tokens")
        if params.n > self.args.max_num_seqs:
            raise ValueError(f"request {request_id!r}: n={params.n} samples, but at most max_num_seqs="
                             f"{self.args.max_num_seqs} sequences run at once")
        if params.top_k > vocab:
            raise ValueError(f"request {request_id!r}: top_k must be at most the vocabulary size ({vocab}), or "
                             f"0 / -1 for no limit, got {params.top_k}")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"request {request_id!r}: stop_token_ids must be token ids of the vocabulary "
                             f"(0..{vocab - 1}), got {bad[0]}: it could never be sampled")
        if not self.args.enable_chunked_prefill and len(token_ids) > self.args.max_num_batched_tokens:
            raise ValueError(f"request {request_id!r}: the prompt has {len(token_ids)} tokens, more than "
                             f"max_num_batched_tokens={self.args.max_num_batched_tokens}, and chunked "
                             f"prefill is off: enable it or raise the budget")
        if self.tokenizer is None and params.stop_strings:
            raise ValueError(f"request {request_id!r}: stop strings need a tokenizer (skip_tokenizer_init is "
                             f"set): use stop_token_ids")

    def _max_model_len(self) -> int:
        spec = self.model.spec
        limit = spec.max_position_embeddings or 2048
        if spec.sliding_window is not None:
            limit = min(limit, spec.sliding_window)
        if self.args.max_model_len is None:
            return limit
        if self.args.max_model_len > limit:
            raise ValueError(f"max_model_len={self.args.max_model_len} is more than the model allows "
                             f"({limit} positions{'; kvlab does not implement sliding windows' if spec.sliding_window else ''})")
        return self.args.max_model_len

    def _fit_max_model_len_to_pool(self) -> None:
        """One sequence of max_model_len tokens must fit the KV pool alone (vLLM refuses to start
        otherwise). A max_model_len the user set is refused; the model's own is lowered, with a warning."""
        capacity = self.runner.num_blocks * self.args.block_size
        if capacity >= self.max_model_len:
            return
        blocks = f"{self.runner.num_blocks} block{'s' if self.runner.num_blocks != 1 else ''}"
        pool = f"the KV pool holds {blocks} x {self.args.block_size} tokens = {capacity} tokens"
        if self.args.max_model_len is not None:
            raise ValueError(f"max_model_len={self.max_model_len} does not fit: {pool}, less than one sequence of "
                             f"max_model_len needs; give the pool more (num_kv_blocks, kv_cache_memory_bytes, "
                             f"gpu_memory_utilization) or lower max_model_len")
        if capacity < 2:
            raise ValueError(f"{pool}: a sequence needs at least 2 (a prompt token and a generated one); give the "
                             f"pool more (num_kv_blocks, kv_cache_memory_bytes, block_size)")
        logger.warning("%s, less than the model's maximum of %d: max_model_len is lowered to %d (set "
                       "max_model_len or give the pool more to choose otherwise)", pool, self.max_model_len,
                       capacity)
        self.max_model_len = capacity
