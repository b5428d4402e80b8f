"""kvlab: how LLM inference engines work, and a small real one.

Names are imported lazily: `import kvlab` loads torch (to decide how Triton will
run, see below) but not transformers, Triton, matplotlib or ipywidgets until a
chapter asks for them.
"""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"


def _use_triton_interpreter_without_gpu() -> None:
    """Triton reads TRITON_INTERPRET once, when it is imported, and transformers imports it
    early; so decide here, first: with no CUDA GPU, kvlab's Triton kernels run interpreted."""
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_use_triton_interpreter_without_gpu()

# public name -> module that defines it (DESIGN.md's API)
_EXPORTS = {
    "ModelSpec": "kvlab.model.spec",
    "list_presets": "kvlab.model.presets",
    "load_model": "kvlab.model.loading",
    "LoadedModel": "kvlab.model.loading",
    "list_models": "kvlab.model.loading",
    "Transformer": "kvlab.model.transformer",
    "ContiguousKVCache": "kvlab.cache",
    "kv_bytes_per_token": "kvlab.memory",
    "kv_cache_bytes": "kvlab.memory",
    "memory_plan": "kvlab.memory",
    "MemoryPlan": "kvlab.memory",
    "list_gpus": "kvlab.memory",
    "simulate_allocation": "kvlab.fragmentation",
    "BlockAllocator": "kvlab.paged",
    "PagedKVCache": "kvlab.paged",
    "SamplingParams": "kvlab.engine",
    "LLM": "kvlab.engine",
    "LLMEngine": "kvlab.engine",
    "EngineArgs": "kvlab.engine",
    "RequestOutput": "kvlab.engine",
    "CompletionOutput": "kvlab.engine",
}
_SUBMODULES = ("model", "cache", "memory", "workloads", "fragmentation", "paged", "kernels", "engine", "serve",
               "bench", "ui", "exercises", "cli")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kvlab.{name}")
    raise AttributeError(f"module 'kvlab' has no attribute {name!r}")


def __dir__():
    return __all__
