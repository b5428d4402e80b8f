"""The paged KV cache tensors: one pool of blocks per layer, indexed by slots.

`BlockAllocator` hands out numbers; this module holds the memory those numbers
name. Per layer, keys and values are each a tensor

    (num_blocks, block_size, num_kv_heads, head_dim)

the layout FlashAttention's paged KV (`flash_attn_with_kvcache(..., block_table=)`),
vLLM's FlashAttention and Triton backends and nano-vllm all use, because:

* one block of one layer is one contiguous chunk (block_size * num_kv_heads *
  head_dim elements): copy-on-write is a single block copy, and a kernel loads a
  block's keys with one strided read;
* viewed as (num_blocks * block_size, num_kv_heads, head_dim) the pool is a flat
  array of *slots*, slot = block_id * block_size + offset, so writing a step's new
  keys is one scatter through a slot mapping (vLLM's `reshape_and_cache_flash`,
  nano-vllm's `store_kvcache`);
* within a token the heads and head_dim are contiguous, so the head_dim vector a
  query head dots with is contiguous (coalesced loads on a GPU).

All layers live in one allocation, `kv` of shape (2, num_layers, num_blocks,
block_size, num_kv_heads, head_dim), so the cache's size is one number and a
block copy touches every layer at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PagedKVCache:
    """K/V tensors for `num_blocks` blocks of `block_size` slots, for every layer."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device=None):
        for name, value in [("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # (2, L, num_blocks, block_size, Hkv, D): [0] keys, [1] values. Zeros, so that a slot
        # never written reads as 0 rather than as leftover memory.
        self.kv = torch.zeros(2, num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                              dtype=dtype, device=device)

    @classmethod
    def from_spec(cls, spec, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                  device=None) -> "PagedKVCache":
        """A cache shaped for a model's ModelSpec (num_layers, num_kv_heads, head_dim)."""
        return cls(spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim,
                   dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def k_cache(self, layer_idx: int) -> torch.Tensor:
        """(num_blocks, block_size, num_kv_heads, head_dim), a view."""
        return self.kv[0, layer_idx]

    def v_cache(self, layer_idx: int) -> torch.Tensor:
        """(num_blocks, block_size, num_kv_heads, head_dim), a view."""
        return self.kv[1, layer_idx]

    def write(self, layer_idx: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values: k[i], v[i] go to slot slot_mapping[i].

        slot_mapping: int64 (N,), slot = block_id * block_size + offset, -1 = padding (skipped)
        k, v: (N, num_kv_heads, head_dim)

        On a GPU this is kvlab's Triton kernel, launched without value checks (one launch per
        layer, no host sync, capturable in a CUDA graph): the slots must come from the block
        allocator, as the engine's do. The torch scatter below is its reference and the CPU path.
        """
        if self.kv.is_cuda:
            from kvlab.kernels import store_kv_launch

            store_kv_launch(k.to(self.dtype), v.to(self.dtype), self.k_cache(layer_idx), self.v_cache(layer_idx),
                            slot_mapping)
            return
        valid = slot_mapping >= 0
        if not bool(valid.all()):
            slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
        flat = self.kv.view(2, self.num_layers, self.num_blocks * self.block_size,
                            self.num_kv_heads, self.head_dim)      # (2, L, slots, Hkv, D)
        flat[0, layer_idx].index_copy_(0, slot_mapping, k.to(self.dtype))
        flat[1, layer_idx].index_copy_(0, slot_mapping, v.to(self.dtype))

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Perform copy-on-write copies (source, destination), every layer, keys and values.
        One block at a time, in order: a later copy may read a block an earlier one wrote
        (fork after copy-on-write in the same step)."""
        for src, dst in copies:
            self.kv[:, :, dst] = self.kv[:, :, src]         # (2, L, block_size, Hkv, D)

    def gather(self, layer_idx: int, block_table: Sequence[int] | torch.Tensor,
               num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's keys and values, logically contiguous again: (num_tokens, Hkv, D) each.
        The slow, obviously correct read (tests and notebooks use it to look inside)."""
        table = torch.as_tensor(block_table, dtype=torch.long, device=self.device)
        nb = -(-num_tokens // self.block_size)
        k = self.k_cache(layer_idx)[table[:nb]].flatten(0, 1)[:num_tokens]   # (n, Hkv, D)
        v = self.v_cache(layer_idx)[table[:nb]].flatten(0, 1)[:num_tokens]
        return k, v

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_layers={self.num_layers}, num_blocks={self.num_blocks}, "
                f"block_size={self.block_size}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype}, {self.nbytes / 2**20:.1f} MiB)")

