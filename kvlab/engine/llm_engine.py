"""LLMEngine: requests in, one batched step at a time, outputs out (vLLM's LLMEngine).

    engine = LLMEngine(EngineConfig(model="smollm2-135m"))
    engine.add_request("r0", "The factory production line optimization requires",
                       SamplingParams(temperature=0, max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():          # what each request produced in this step
            ...
    engine.abort_request("r0")             # anywhere in its life; its blocks are freed

`step()` is the whole loop of a serving engine: the scheduler picks the batch
(kvlab.engine.scheduler), the runner runs one forward pass over it and samples
(kvlab.engine.model_runner), the scheduler appends the tokens and frees what finished,
and the engine detokenizes incrementally, applies stop strings and returns a
RequestOutput for every request that progressed (all of it, only the new part, or only
at the end: SamplingParams.output_kind). `stats` keeps one StepStats per step.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch

from kvlab.engine.config import EngineConfig
from kvlab.engine.detokenizer import IncrementalDetokenizer
from kvlab.engine.model_runner import ModelRunner
from kvlab.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, StepStats
from kvlab.engine.sampling_params import RequestOutputKind, SamplingParams
from kvlab.engine.scheduler import Scheduler, sample_generator
from kvlab.engine.sequence import Request, Sequence, SequenceStatus
from kvlab.paged.block_allocator import BlockAllocator

MAX_STEP_STATS = 100_000       # keep the last this many steps' stats (a server runs for days)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from kvlab.model.loading import LoadedModel, load_model
        from kvlab.model.transformer import Transformer

        self.config = config
        t0 = time.perf_counter()
        lm = config.model if isinstance(config.model, LoadedModel) else \
            load_model(config.model, device=config.device, dtype=config.dtype)
        self.loaded_model = lm
        self.tokenizer = None if config.skip_tokenizer_init else lm.tokenizer
        if self.tokenizer is None and not config.skip_tokenizer_init:
            raise ValueError(f"model {lm.name!r} has no tokenizer: pass skip_tokenizer_init=True and prompts "
                             f"as token ids")
        self.model = Transformer.from_hf(lm.hf_model)
        self.eos_token_id = getattr(lm.hf_model.config, "eos_token_id", None)
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0]
        self.load_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.max_model_len = self._max_model_len()
        self.model.check_positions(self.max_model_len - 1)          # once, not per step: RoPE table, window
        self.runner = ModelRunner(self.model, config, self.max_model_len)
        if self.runner.num_blocks * config.block_size < self.max_model_len:
            self.max_model_len = self.runner.num_blocks * config.block_size   # one request must fit the pool alone
        order = None
        if config.block_order_seed is not None:
            g = torch.Generator().manual_seed(config.block_order_seed)
            order = torch.randperm(self.runner.num_blocks, generator=g).tolist()
        self.allocator = BlockAllocator(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                                        free_order=order)
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.watermark, config.enable_chunked_prefill,
                                   self.eos_token_id)
        self.init_time = time.perf_counter() - t0             # KV sizing, allocation, CUDA graph capture
        self.stats: deque[StepStats] = deque(maxlen=MAX_STEP_STATS)
        self.record_schedule = False                          # keep each step's (seq, tokens) list: timelines
        self.on_schedule = None                               # called with each SchedulerOutput before the forward
                                                              # pass (tools that show the decision: ui.engine's x-ray)
        self.num_steps = 0

    @classmethod
    def from_engine_args(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig(**kwargs))

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. prompt: text, a list of token ids, or {"prompt": text} /
        {"prompt_token_ids": ids} (vLLM's prompt dicts). Bad input raises ValueError (or
        TypeError) naming the request and what is allowed, and leaves the engine unchanged."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {request_id!r} ({type(request_id).__name__})")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request {request_id!r}: that id is already in the engine; ids must be unique")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"request {request_id!r}: params must be a kvlab.SamplingParams, got "
                            f"{type(params).__name__}")
        text, token_ids = self._tokenize(request_id, prompt)
        self._check_request(request_id, token_ids, params)
        now = time.perf_counter() if arrival_time is None else arrival_time
        request = Request(request_id, text, token_ids, params, RequestMetrics(arrival_time=now))
        request.new_sequence(0, token_ids, sample_generator(params, 0, self.runner.device))
        self.scheduler.add(request)

    def abort_request(self, request_id: str | list[str]) -> None:
        """Stop a request now, wherever it is (waiting, prefilling, decoding); its blocks are freed.
        An unknown id raises ValueError."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        unknown = [r for r in ids if r not in self.scheduler.requests]
        if unknown:
            raise ValueError(f"unknown request id(s) {unknown}: not in the engine (never added, finished, "
                             f"or aborted already)")
        for r in ids:
            request = self.scheduler.abort(r)
            request.metrics.finished_time = time.perf_counter()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        t1 = time.perf_counter()
        running, waiting, used = len(self.scheduler.running), len(self.scheduler.waiting), self.allocator.num_used_blocks
        if self.on_schedule is not None:
            self.on_schedule(out)
        if out.is_empty:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could schedule nothing although requests are waiting: "
                                   "a request larger than the KV pool slipped past add_request")
            return []
        result = self.runner.execute(out)
        t2 = time.perf_counter()
        finished = self.scheduler.update(out, result.sampled)
        outputs = self._process_outputs(out, result, finished)
        t3 = time.perf_counter()
        self.num_steps += 1
        self.stats.append(StepStats(
            step=self.num_steps, time=t0, num_running=running, num_waiting=waiting, num_decode_seqs=out.num_decodes,
            num_prefill_seqs=len(out.scheduled) - out.num_decodes, num_scheduled_tokens=out.num_batched_tokens,
            num_blocks_used=used, num_preempted=len(out.preempted),
            schedule_time=t1 - t0, prepare_time=result.prepare_time, forward_time=result.forward_time,
            device_time=result.device_time, output_time=t3 - t2, cuda_graph=result.cuda_graph,
            piecewise_graph=result.piecewise,
            scheduled=[(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] if self.record_schedule else []))
        return outputs

    # ------------------------------------------------------------------ internals
    def _process_outputs(self, out, result, finished: list[Sequence]) -> list[RequestOutput]:
        now = time.perf_counter()
        touched: dict[str, Request] = {}                  # requests that have something to report
        final_only = RequestOutputKind.FINAL_ONLY
        for seq, token in result.sampled.items():
            request = seq.request
            if request.params.output_kind is not final_only:
                touched[request.request_id] = request
            if result.logprobs and seq in result.logprobs:
                chosen, tops = result.logprobs[seq]
                seq.cumulative_logprob += chosen
                seq.logprobs.append({token: chosen, **tops})
            m = request.metrics
            m.num_generation_tokens += 1
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if self.tokenizer is not None:
                self._detokenize(seq)
                if seq.finished:
                    touched[request.request_id] = request     # a stop string ended it
        for seq in finished:
            touched[seq.request.request_id] = seq.request
        outputs = []
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                self.scheduler.pop_finished_request(request.request_id)
            o = self._request_output(request)
            if o is not None:
                outputs.append(o)
        return outputs

    def _detokenize(self, seq: Sequence) -> None:
        """Add the sequence's newest token to its text; end it if a stop string appeared."""
        if self.tokenizer is None:
            return
        if seq.detokenizer is None:                  # a sample forked in this step starts its own
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.request.prompt_token_ids,
                                                     seq.params.skip_special_tokens)
        final = seq.finished                         # the scheduler ended it (EOS, length, stop token)
        new = seq.detokenizer.add([seq.token_ids[-1]], final=final)
        seq.text += new
        stops = seq.params.stop_strings
        if stops and new and not final:
            window = seq.text[-(len(new) + seq.params.max_stop_string_len - 1):]   # where a stop string can end
            offset = len(seq.text) - len(window)
            hits = [(window.find(s), s) for s in stops if s in window]
            if hits:
                idx, s = min(hits)
                seq.text = seq.text[:offset + idx]               # the stop string is not part of the text
                self.scheduler.finish(seq, "stop", s)

    def _request_output(self, request: Request) -> RequestOutput | None:
        kind = request.params.output_kind
        done = request.finished
        if kind == RequestOutputKind.FINAL_ONLY and not done:
            return None
        completions = []
        for seq in sorted(request.sequences, key=lambda s: s.index):
            text, ids = seq.text, seq.output_token_ids
            if not seq.finished and seq.params.stop_strings:     # hold back what may become a stop string
                text = text[:max(0, len(text) - seq.params.max_stop_string_len + 1)]
            if kind == RequestOutputKind.DELTA:
                new_text, new_ids = text[seq.num_text_sent:], ids[seq.num_tokens_sent:]
                seq.num_text_sent, seq.num_tokens_sent = len(text), len(ids)
                text, ids = new_text, new_ids
                lps = seq.logprobs[len(seq.logprobs) - len(ids):] if seq.params.logprobs is not None else None
            else:
                lps = list(seq.logprobs) if seq.params.logprobs is not None else None
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(ids),
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=lps, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions, done,
                             request.metrics, request.metrics.num_cached_tokens)

    def _tokenize(self, request_id: str, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"request {request_id!r}: a prompt dict needs 'prompt' or 'prompt_token_ids', "
                                 f"got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"request {request_id!r}: this engine has no tokenizer (skip_tokenizer_init): "
                                 f"pass the prompt as token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise TypeError(f"request {request_id!r}: token ids must be ints, got {ids[:8]!r}")
            return None, ids
        raise TypeError(f"request {request_id!r}: prompt must be a str, a list of token ids or a prompt dict, "
                        f"got {type(prompt).__name__}")

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
                             f"max_model_len is {self.max_model_len} (the model's maximum, capped by the KV pool of "
                             f"{self.allocator.num_blocks} blocks x {self.config.block_size}), so a prompt may "
                             f"have at most {self.max_model_len - 1} tokens")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"request {request_id!r}: n={params.n} samples, but at most max_num_seqs="
                             f"{self.config.max_num_seqs} sequences run at once")
        if not self.config.enable_chunked_prefill and len(token_ids) > self.config.max_num_batched_tokens:
            raise ValueError(f"request {request_id!r}: the prompt has {len(token_ids)} tokens, more than "
                             f"max_num_batched_tokens={self.config.max_num_batched_tokens}, and chunked "
                             f"prefill is off: enable it or raise the budget")
        if self.tokenizer is None and params.stop_strings:
            raise ValueError(f"request {request_id!r}: stop strings need a tokenizer (skip_tokenizer_init is "
                             f"set): use stop_token_ids")

    def _max_model_len(self) -> int:
        spec = self.model.spec
        limit = spec.max_position_embeddings or 2048
        if spec.sliding_window is not None:
            limit = min(limit, spec.sliding_window)
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len={self.config.max_model_len} is more than the model allows "
                             f"({limit} positions{'; kvlab does not implement sliding windows' if spec.sliding_window else ''})")
        return self.config.max_model_len
