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
    """Plain torch, obviously correct: gather every sequence's K/V through its block table
    into a contiguous (padded) tensor, then softmax(q K^T * scale) V in fp32, with the
    positions past each sequence's length masked out. A sequence of length 0 gives zeros.

    It reads the whole gathered copy (and writes it first): the "gather + attention" cost
    that the Triton kernel avoids. Entries of block_tables past a sequence's last block
    are never read, so they may hold anything (-1, stale ids).
    """
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    seq_lens = seq_lens.long().to(q.device)

    used = torch.arange(max_blocks, device=q.device) < (seq_lens[:, None] + block_size - 1) // block_size
    blocks = torch.where(used, block_tables.long().to(q.device), 0)          # (S, max_blocks)
    k = k_cache[blocks].flatten(1, 2).float()            # (S, max_blocks * block_size, Hkv, D)
    v = v_cache[blocks].flatten(1, 2).float()            # (S, N, Hkv, D)
    k = k.repeat_interleave(group, dim=2)                # (S, N, Hq, D): query head h reads KV head h // group
    v = v.repeat_interleave(group, dim=2)

    scores = torch.einsum("shd,snhd->shn", q.float(), k) * scale               # (S, Hq, N)
    valid = torch.arange(k.shape[1], device=q.device) < seq_lens[:, None]     # (S, N)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)      # a row with no valid key: all zeros
    out = torch.einsum("shn,snhd->shd", probs, v)                             # (S, Hq, D)
    return out.to(q.dtype)
