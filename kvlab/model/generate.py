"""Greedy decoding with kvlab's own model: with a KV cache, or recomputing everything.

The loop every engine runs, in its simplest form: one prefill over the prompt,
then one decode step per new token. With the cache, a decode step feeds only the
newest token (its K/V join the cache; its query attends to all of it). Without,
each step re-runs the whole sequence so far: same tokens, growing cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvlab.cache import ContiguousKVCache
from kvlab.model.transformer import Transformer


@dataclass
class Generation:
    token_ids: list[list[int]]                           # new tokens per prompt (cut after EOS)
    step_times: list[float] = field(default_factory=list)  # seconds per step; step 0 is the prefill (TTFT)


def greedy_generate(model: Transformer, input_ids: torch.Tensor | list[int], max_new_tokens: int,
                    use_cache: bool = True, eos_token_id: int | None = None,
                    cache: ContiguousKVCache | None = None) -> Generation:
    """Greedy decoding of a batch of equal-length prompts, input_ids (B, T).

    Stops after max_new_tokens, or when every row has produced eos_token_id.
    `cache` plugs in any attention function with ContiguousKVCache's interface;
    by default a contiguous cache sized for prompt + max_new_tokens.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    ids = torch.as_tensor(input_ids, device=model.embed_tokens.device)
    ids = ids[None] if ids.dim() == 1 else ids                       # (B, T)
    B, T = ids.shape
    if use_cache and cache is None:
        cache = ContiguousKVCache.for_spec(model.spec, B, T + max_new_tokens, model.embed_tokens.dtype, ids.device)

    new_tokens, step_times = [], []
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    seq = ids
    for step in range(max_new_tokens):
        start = time.perf_counter()
        if not use_cache:                                            # recompute the whole sequence
            logits = model(seq)
        elif step == 0:                                              # prefill: the whole prompt at once
            logits = model(ids, attn=cache)
        else:                                                        # decode: only the newest token
            positions = torch.full((B, 1), seq.shape[1] - 1, device=ids.device)
            logits = model(seq[:, -1:], positions=positions, attn=cache)
        token = logits[:, -1].argmax(dim=-1)                         # (B,)
        step_times.append(time.perf_counter() - start)
        new_tokens.append(token)
        seq = torch.cat([seq, token[:, None]], dim=1)
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                break
    out = torch.stack(new_tokens, dim=1).tolist()                   # (B, steps)
    if eos_token_id is not None:
        out = [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in out]
    return Generation(token_ids=out, step_times=step_times)
