"""Solutions to chapter 01's exercises (notebooks/exercises/01_forward_pass.ipynb)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One causal attention head: q, k, v (T, D) -> (T, D)."""
    T, D = q.shape
    scores = q @ k.T / math.sqrt(D)                              # (T, T): query t against every key
    causal = torch.ones(T, T, dtype=torch.bool).tril()           # query t may see keys 0..t
    scores = scores.masked_fill(~causal, float("-inf"))
    weights = scores.softmax(dim=-1)                             # each row sums to 1 (softmax subtracts the max)
    return weights @ v                                           # (T, D)


def attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Every head of a layer with GQA: q (T, Hq, D), k and v (T, Hkv, D) -> (T, Hq, D)."""
    group = q.shape[1] // k.shape[1]                             # query heads per KV head
    return torch.stack([attention_head(q[:, h], k[:, h // group], v[:, h // group])
                        for h in range(q.shape[1])], dim=1)


def ffn(x: torch.Tensor, layer) -> torch.Tensor:
    """RMSNorm with the layer's ffn_norm, then SwiGLU: x (T, H) -> (T, H)."""
    norm = layer.ffn_norm
    h = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm.eps) * norm.weight   # each token alone
    return layer.down(F.silu(layer.gate(h)) * layer.up(h))        # (T, I) -> (T, H)
