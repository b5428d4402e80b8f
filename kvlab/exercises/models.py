"""The models the checks run, loaded once per process (the first check that needs one pays ~1 s).

    smollm2()      SmolLM2-135M-Instruct, the course's real model, as (LoadedModel, kvlab.Transformer):
                   the checks that promise equality with the real model (01's heads, 02's greedy tokens)
    tiny_llama()   tiny-llama-random (2 layers, hidden 64, 4 query / 2 KV heads): where the model
                   only has to be a real Llama-shaped network, and fast
"""

from __future__ import annotations

import functools

PROMPT = "The factory production line optimization requires"     # the course's running example


def _load(name: str):
    """kvlab.load_model without transformers' "Loading weights" bar (it would land in a check's output)."""
    import kvlab
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        lm = kvlab.load_model(name, device="cpu", dtype="float32")
    finally:
        if shown:
            logging.enable_progress_bar()
    return lm, kvlab.Transformer.from_hf(lm.hf_model)


@functools.lru_cache(maxsize=None)
def smollm2():
    return _load("smollm2-135m")


@functools.lru_cache(maxsize=None)
def tiny_llama():
    return _load("tiny-llama-random")
