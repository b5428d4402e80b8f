"""Solutions to chapter 02's exercises (notebooks/exercises/02_prefill_vs_decode.ipynb)."""

from __future__ import annotations

import torch

from kvlab.model.attention import sdpa


class KVCache:
    """K and V of every token so far, per layer, grown by concatenation: an attention function."""

    def __init__(self, num_layers: int):
        self.k = [None] * num_layers                 # per layer: (B, S, Hkv, D), S = tokens cached so far
        self.v = [None] * num_layers

    def __call__(self, layer_idx, q, k, v, positions):
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = k, v
        else:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], k], dim=1)     # append along the tokens
            self.v[layer_idx] = torch.cat([self.v[layer_idx], v], dim=1)
        K, V = self.k[layer_idx], self.v[layer_idx]
        key_pos = torch.arange(K.shape[1], device=q.device)                   # (S,) position of each cached key
        mask = key_pos[None, None, :] <= positions[:, :, None]                # (B, T, S): causal, by position
        return sdpa(q, K, V, mask=mask)                                       # (B, T, Hq, D), GQA inside


def greedy_decode(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Prefill once, then one token per step through the cache; the new tokens only."""
    cache = KVCache(model.spec.num_layers)
    logits = model(torch.tensor([prompt_ids]), attn=cache)                   # prefill: (1, P, vocab)
    new = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        new.append(token)
        if len(new) == max_new_tokens:
            break
        position = len(prompt_ids) + len(new) - 1                             # where the new token sits
        logits = model(torch.tensor([[token]]), positions=torch.tensor([[position]]), attn=cache)
    return new
