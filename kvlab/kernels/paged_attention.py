"""Decode attention on a paged KV cache: a torch reference, then a Triton kernel.

Decode is one new query token per sequence attending to everything that
sequence has cached. In a paged cache (vLLM's PagedAttention, Kwon et al. 2023)
a sequence's keys and values are not contiguous: they live in fixed-size
blocks scattered over one big pool, and a per-sequence *block table* lists
which physical block holds logical block 0, 1, 2, ...

Layout (the contract with kvlab.paged):

    q:            (num_seqs, num_heads, head_dim)        one query token per sequence
    k_cache:      (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache:      (num_blocks, block_size, num_kv_heads, head_dim)
    block_tables: int32 (num_seqs, max_blocks)           physical block of each logical block
    seq_lens:     int32 (num_seqs)                       tokens cached per sequence (>= 1)
    out:          (num_seqs, num_heads, head_dim)

Token t of sequence s sits at k_cache[block_tables[s, t // block_size], t % block_size].
Query head h reads KV head h // (num_heads // num_kv_heads) (GQA; MHA and MQA are the
two ends of it).
"""

from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------- reference

def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              scale: float | None = None) -> torch.Tensor:
    """Plain torch, obviously correct: gather each sequence's K/V through its block table,
    then softmax(q K^T * scale) V in fp32. Slow (one Python iteration per sequence); it is
    the yardstick for the kernel, and the default decode attention of kvlab.paged on CPU."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    block_size = k_cache.shape[1]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q)
    for s in range(num_seqs):
        n = int(seq_lens[s])
        nb = (n + block_size - 1) // block_size
        blocks = block_tables[s, :nb].long()
        k = k_cache[blocks].reshape(nb * block_size, num_kv_heads, head_dim)[:n]  # (n, Hkv, D)
        v = v_cache[blocks].reshape(nb * block_size, num_kv_heads, head_dim)[:n]  # (n, Hkv, D)
        k = k.float().repeat_interleave(group, dim=1)                              # (n, Hq, D)
        v = v.float().repeat_interleave(group, dim=1)                              # (n, Hq, D)
        scores = torch.einsum("hd,nhd->hn", q[s].float(), k) * scale               # (Hq, n)
        probs = scores.softmax(dim=-1)
        out[s] = torch.einsum("hn,nhd->hd", probs, v).to(q.dtype)                  # (Hq, D)
    return out
