"""Solutions to chapter 03's exercises (notebooks/exercises/03_kv_cache_memory.ipynb)."""

from __future__ import annotations

from kvlab.memory import KV_DTYPE_BITS

BITS = dict(KV_DTYPE_BITS)          # dtype name -> bits per element (the notebook gives this table)


def kv_bytes_per_token(spec, kv_dtype: str) -> int:
    """Bytes of K and V one token adds, over all layers."""
    if spec.attention == "mla":
        elements = spec.num_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim)   # latent + RoPE key, no V
    else:
        elements = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim        # K and V per KV head
    return -(-elements * BITS[kv_dtype] // 8)                                     # whole bytes, rounded up


def max_requests(spec, gpu_bytes: int, context_len: int, weight_dtype: str = "bfloat16", kv_dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.9, reserve_bytes: int = 2**30) -> int:
    """Requests of context_len tokens whose caches fit at once on one GPU."""
    usable = int(gpu_bytes * gpu_memory_utilization)
    weights = -(-spec.num_params * BITS[weight_dtype] // 8)
    budget = max(0, usable - weights - reserve_bytes)
    cached = min(context_len, spec.sliding_window) if spec.sliding_window else context_len
    return budget // (kv_bytes_per_token(spec, kv_dtype) * cached)


def kv_bytes_per_token_tp(spec, kv_dtype: str, tensor_parallel: int) -> int:
    """One GPU's bytes of KV per token when the heads are split over tensor_parallel GPUs."""
    if spec.attention == "mla":
        return kv_bytes_per_token(spec, kv_dtype)                 # the latent is shared by all heads: whole
    heads = max(1, spec.num_kv_heads // tensor_parallel)          # more GPUs than KV heads: one replicated head
    return -(-spec.num_layers * 2 * heads * spec.head_dim * BITS[kv_dtype] // 8)
