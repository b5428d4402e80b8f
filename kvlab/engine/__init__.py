"""kvlab's inference engine: continuous batching on the paged KV cache, with vLLM's API.

    EngineArgs       every knob, its default and help; the CLI flags  config.py
    SamplingParams   how a request samples and when it stops         sampling_params.py
    Sequence, Request   a request's state between steps               sequence.py
    Scheduler        the one policy: admit, chunk, decode, preempt    scheduler.py
                     -> SchedulerOutput (plain data for the runner)
    InputBatch       the runner's persistent rows                     input_batch.py
    AttentionMetadata, EngineAttention   one step's flattened batch   attention.py
    ModelRunner      KV pool, forward pass, CUDA graphs               model_runner.py
                     -> ModelRunnerOutput (sampled ids per sequence)
    sample           temperature / top-k / top-p, per-request seeds   sampler.py
    OutputProcessor  text, stop strings, RequestOutputs               output_processor.py
    IncrementalDetokenizer   text as tokens arrive                    detokenizer.py
    LLMEngine        add_request / step / abort_request (sync/async)  llm_engine.py
    LLM              generate / stream (vLLM's offline API)           llm.py
    replay           the scheduler on a request trace, no model       replay.py
"""

from kvlab.engine.config import EngineArgs
from kvlab.engine.llm import LLM
from kvlab.engine.llm_engine import LLMEngine
from kvlab.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput, StepStats
from kvlab.engine.sampling_params import RequestOutputKind, SamplingParams
from kvlab.engine.scheduler import Scheduler, SchedulerOutput

__all__ = ["CompletionOutput", "EngineArgs", "EngineStats", "LLM", "LLMEngine", "RequestMetrics", "RequestOutput",
           "RequestOutputKind", "SamplingParams", "Scheduler", "SchedulerOutput", "StepStats"]
