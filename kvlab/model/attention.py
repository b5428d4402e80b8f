"""The one place where a kvlab model does attention: a pluggable function.

Every layer of `kvlab.Transformer` computes its new tokens' queries, keys and
values, applies RoPE, and hands them to an *attention function*:

    out = attn(layer_idx, q, k, v, positions)

    q:         (B, T, num_heads, head_dim)     queries of the T new tokens
    k, v:      (B, T, num_kv_heads, head_dim)  their keys and values (after RoPE)
    positions: (B, T) int64                    position of each new token in its sequence
    out:       (B, T, num_heads, head_dim)

The function decides where keys and values live. `causal_attention` (below)
keeps nothing: the T tokens are the whole sequence. `kvlab.cache.ContiguousKVCache`
writes them into a contiguous per-request slab and attends over everything
cached so far; `kvlab.paged` writes them into blocks through a block table and
attends with a torch reference or a Triton kernel. The model code never changes:
this is the seam that the later chapters plug into (vLLM's `Attention` layer and
nano-vllm's `Context` play the same role).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionFn(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor: ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with GQA on (B, T, H, D) tensors.

    q: (B, T, Hq, D); k, v: (B, S, Hkv, D); mask: bool (B, T, S), True where a query may look.
    Each group of Hq // Hkv query heads shares one KV head.
    """
    group = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))        # (B, H, T, D)
    if group > 1:
        k = k.repeat_interleave(group, dim=1)                # (B, Hq, S, D)
        v = v.repeat_interleave(group, dim=1)
    if mask is not None:
        mask = mask[:, None]                                 # (B, 1, T, S): same mask for every head
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return out.transpose(1, 2)                               # (B, T, Hq, D)


def causal_attention(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """No cache: the T new tokens are the whole sequence, token t sees tokens 0..t."""
    return sdpa(q, k, v, is_causal=True)
