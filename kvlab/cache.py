"""The contiguous KV cache: one slab per request, reserved up front.

This is the "before" picture of the course (HF's static cache, FasterTransformer,
Orca): each request owns `max_seq_len` slots in every layer whether it uses them
or not. Decoding with it is fast and simple: step t writes the new token's key
and value at position t and attends over positions 0..t. Chapter 04 measures
what the up-front reservation wastes; chapter 05 replaces it with pages.

It plugs into the model as its attention function (see kvlab.model.attention).
"""

from __future__ import annotations

import torch

from kvlab.model.attention import sdpa
from kvlab.model.spec import ModelSpec


class ContiguousKVCache:
    """K and V for `batch_size` requests of up to `max_seq_len` tokens, every layer.

    Layout, per layer: k[layer], v[layer] of shape (batch_size, max_seq_len, num_kv_heads, head_dim):
    a request's tokens are contiguous, each token's heads side by side. The model's
    new keys land at their positions; nothing is ever moved.
    """

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        for name, value in dict(num_layers=num_layers, batch_size=batch_size, max_seq_len=max_seq_len,
                                num_kv_heads=num_kv_heads, head_dim=head_dim).items():
            if value <= 0:
                raise ValueError(f"ContiguousKVCache: {name} must be positive, got {value}")
        self.max_seq_len = max_seq_len
        shape = (batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_spec(cls, spec: ModelSpec, batch_size: int, max_seq_len: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> "ContiguousKVCache":
        return cls(spec.num_layers, batch_size, max_seq_len, spec.num_kv_heads, spec.head_dim, dtype, device)

    @property
    def nbytes(self) -> int:
        """Bytes reserved by the cache tensors (all layers, K and V)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' K/V at their positions, then attend over everything cached."""
        B, T = positions.shape
        if positions.max() >= self.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond the cache's max_seq_len {self.max_seq_len}")
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)
        k_cache[rows, positions] = k                              # (B, T, Hkv, D) into (B, S, Hkv, D)
        v_cache[rows, positions] = v
        seen = int(positions.max()) + 1                           # slots 0..seen-1 may be visible
        key_pos = torch.arange(seen, device=positions.device)
        mask = key_pos[None, None, :] <= positions[:, :, None]    # (B, T, S): causal, by position
        return sdpa(q, k_cache[:B, :seen], v_cache[:B, :seen], mask=mask)
