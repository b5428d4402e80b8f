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
import inspect
import itertools
import numbers
import time
from collections.abc import Iterator, Sequence

from kvlab import checks
from kvlab.engine.config import EngineArgs
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
_FIELDS = [f for f in dataclasses.fields(EngineArgs) if f.name != "extra"]


class LLM:
    """Offline generation with vLLM's API. The keyword arguments are kvlab.EngineArgs' fields
    (help(kvlab.EngineArgs) says what each does), plus vLLM's that kvlab accepts and ignores.

    The LLM owns its engine (`llm.engine`, as vLLM's `llm.llm_engine`): generate() and stream()
    step it until their own requests are done. Requests someone else added to the same engine
    keep running beside them, and their outputs are kept for whoever steps the engine next
    (LLMEngine.defer_outputs): nothing is lost."""

    def __init__(self, model="smollm2-135m", tokenizer=None, **kwargs):
        if tokenizer is not None and tokenizer != model:
            raise ValueError("kvlab uses the model's own tokenizer; a separate `tokenizer` is not supported")
        fields = {f.name for f in _FIELDS}
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
                                f"{sorted((fields - {'model'}) | set(_VLLM_ONLY))}")
        self.args = EngineArgs(model=model, extra=extra, **engine_kwargs)     # every value checked, nothing loaded yet
        self.engine = LLMEngine(self.args)
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
        start, generated, mine = time.perf_counter(), 0, set(ids)
        try:
            while len(results) < len(ids):
                others = []
                for out in self.engine.step():
                    if out.request_id not in mine:
                        others.append(out)                     # someone else's request: kept for them
                    elif out.finished:
                        results[out.request_id] = out
                        generated += sum(len(o.token_ids) for o in out.outputs)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix_str(f"output {generated / (time.perf_counter() - start):.1f} tok/s")
                self.engine.defer_outputs(others)
        except BaseException:
            self._abort_left(ids, results)
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
                others, mine = [], []
                for out in self.engine.step():
                    (mine if out.request_id in pending else others).append(out)
                self.engine.defer_outputs(others)              # someone else's requests: kept for them
                for out in mine:
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out
        finally:                                          # the caller stopped early: free what is left
            self._abort_left(pending, {})

    # ------------------------------------------------------------------ internals
    def _abort_left(self, ids, results: dict) -> None:
        left = [i for i in ids if i not in results and self.engine.has_request(i)]
        if left:
            self.engine.abort_request(left)

    @staticmethod
    def _as_list(prompts) -> list:
        """One prompt (text, token ids, a prompt dict) or a list of them -> a list of prompts."""
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if hasattr(prompts, "ndim") and hasattr(prompts, "tolist"):     # a numpy array or a tensor of ids
            if prompts.ndim not in (1, 2):
                raise ValueError(f"prompts as an array must be 1-D (one prompt) or 2-D (one per row) token "
                                 f"ids, got {prompts.ndim} dimensions")
            return [prompts.tolist()] if prompts.ndim == 1 else prompts.tolist()
        if isinstance(prompts, (bytes, numbers.Number)) or prompts is None or not hasattr(prompts, "__iter__"):
            raise TypeError(f"prompts must be a str, a list of token ids, a prompt dict, or a list of these, "
                            f"got {checks.shown(prompts)}")
        prompts = list(prompts)
        if prompts and all(isinstance(t, numbers.Integral) and not checks._is_bool(t) for t in prompts):
            return [prompts]                                  # one prompt given as token ids
        return prompts

    @staticmethod
    def _params_per_prompt(prompts, sampling_params, kind) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if not isinstance(sampling_params, (list, tuple)):
            raise TypeError(f"sampling_params must be a kvlab.SamplingParams or a list of them (one per prompt), "
                            f"got {checks.shown(sampling_params)}")
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts; pass one, "
                             f"or one per prompt")
        out = []
        for p in sampling_params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params must be a kvlab.SamplingParams or a list of them, got a list "
                                f"holding {checks.shown(p)}")
            out.append(dataclasses.replace(p, output_kind=kind))
        return out

    def _add(self, prompts, params) -> list[str]:
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_id = str(next(self._counter))
                while self.engine.has_request(request_id):     # an id someone else chose
                    request_id = str(next(self._counter))
                self.engine.add_request(request_id, prompt, p)
                ids.append(request_id)
        except BaseException:
            if ids:
                self.engine.abort_request(ids)                 # all or nothing
            raise
        return ids


def _signature() -> inspect.Signature:
    """LLM(model, tokenizer=None, *, block_size=16, ...): EngineArgs' fields, for help() and editors."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="smollm2-135m"),
              inspect.Parameter("tokenizer", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    for f in _FIELDS:
        if f.name != "model":
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


LLM.__init__.__signature__ = _signature()
