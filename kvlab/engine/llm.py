"""LLM: offline generation in one call, with vLLM's signature.

    from kvlab import LLM, SamplingParams        # or: from vllm import LLM, SamplingParams
    llm = LLM(model="smollm2-135m")
    outputs = llm.generate(["Hello, my name is", "The capital of France is"],
                           SamplingParams(temperature=0.8, top_p=0.95))
    for out in outputs:
        print(out.prompt, out.outputs[0].text)

`generate` adds every prompt to the engine and steps it until all are done (continuous
batching: a finished request's place goes to the next one at once), showing a tqdm bar;
outputs come back in the order of the prompts. `stream` yields text as it is produced.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence

from kvlab.engine.config import EngineConfig
from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.outputs import RequestOutput
from kvlab.engine.sampling_params import RequestOutputKind, SamplingParams

# vLLM keyword arguments kvlab accepts (scripts pass them), with the values it can honour
_VLLM_ONLY = {
    "trust_remote_code": None,       # accepted, never acted on: kvlab runs no code from a model repo
    "tensor_parallel_size": 1,       # kvlab runs on one device
    "pipeline_parallel_size": 1,
    "quantization": None,
    "disable_log_stats": None,
    "swap_space": None,
    "tokenizer_mode": None,
    "revision": None,
}


class LLM:
    def __init__(self, model="smollm2-135m", tokenizer=None, *, block_size: int = 16,
                 num_kv_blocks: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 device: str | None = None, dtype: str | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, max_model_len: int | None = None,
                 enforce_eager: bool = False, seed: int = 0, **kwargs):
        if tokenizer is not None and tokenizer != model:
            raise ValueError("kvlab uses the model's own tokenizer; a separate `tokenizer` is not supported")
        fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"extra"}
        engine_kwargs, extra = {}, {}
        for key, value in kwargs.items():
            if key in fields:
                engine_kwargs[key] = value
            elif key in _VLLM_ONLY:
                allowed = _VLLM_ONLY[key]
                if allowed is not None and value != allowed:
                    raise ValueError(f"{key}={value!r} is not supported: kvlab runs one model on one device "
                                     f"({key} must be {allowed})")
                extra[key] = value
            else:
                raise TypeError(f"LLM() got an unexpected keyword argument {key!r}; kvlab accepts "
                                f"{sorted(fields | set(_VLLM_ONLY))}")
        self.config = EngineConfig(model=model, block_size=block_size, num_kv_blocks=num_kv_blocks,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   device=device, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                                   enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
                                   enforce_eager=enforce_eager, seed=seed, extra=extra, **engine_kwargs)
        self.engine = LLMEngine(self.config)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or prompt dicts); outputs in prompt order."""
        prompts = self._as_list(prompts)
        params = self._params_per_prompt(prompts, sampling_params, RequestOutputKind.FINAL_ONLY)
        ids = self._add(prompts, params)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", unit="req", dynamic_ncols=True)
        start, generated = time.perf_counter(), 0
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        generated += sum(len(o.token_ids) for o in out.outputs)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix_str(f"output {generated / (time.perf_counter() - start):.1f} tok/s")
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in results and i in self.engine.scheduler.requests])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]

    def stream(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[RequestOutput]:
        """Yield each request's new text and tokens as steps produce them (RequestOutputs whose
        CompletionOutputs hold only what is new; `finished` marks the last one of a request).

            for out in llm.stream("Tell me a story", SamplingParams(max_tokens=64)):
                print(out.outputs[0].text, end="", flush=True)
        """
        prompts = self._as_list(prompts)
        params = self._params_per_prompt(prompts, sampling_params, RequestOutputKind.DELTA)
        ids = self._add(prompts, params)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:                                          # the caller stopped early: free what is left
            left = [i for i in pending if i in self.engine.scheduler.requests]
            if left:
                self.engine.abort_request(left)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):     # one prompt given as token ids
            return [prompts]
        return prompts

    @staticmethod
    def _params_per_prompt(prompts, sampling_params, kind) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts; pass one, "
                             f"or one per prompt")
        out = []
        for p in sampling_params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params must be kvlab.SamplingParams, got {type(p).__name__}")
            out.append(dataclasses.replace(p, output_kind=kind))
        return out

    def _add(self, prompts, params) -> list[str]:
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_id = str(next(self._counter))
                self.engine.add_request(request_id, prompt, p)
                ids.append(request_id)
        except BaseException:
            if ids:
                self.engine.abort_request(ids)                 # all or nothing
            raise
        return ids
