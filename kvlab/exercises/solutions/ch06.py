"""Solutions to chapter 06's exercises (notebooks/exercises/06_triton_kernel.ipynb)."""

from __future__ import annotations

import torch

import kvlab.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 where there is no GPU, before triton loads)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """Decode attention through block tables: q (S, Hq, D) -> (S, Hq, D)."""
    num_seqs, num_heads, _ = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for s in range(num_seqs):
        n = int(seq_lens[s])
        if n == 0:
            continue                                             # nothing to attend to: zeros
        blocks = block_tables[s, : -(-n // block_size)].long()   # this sequence's physical blocks, in order
        k = k_cache[blocks].flatten(0, 1)[:n]                    # (n, Hkv, D): its tokens, stale slots cut off
        v = v_cache[blocks].flatten(0, 1)[:n]
        for h in range(num_heads):
            weights = (k[:, h // group] @ q[s, h] * scale).softmax(dim=0)    # (n,)
            out[s, h] = weights @ v[:, h // group]
    return out


def merge_splits(o: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Merge partial softmaxes: o (S, D) normalized outputs, m (S,) max scores, l (S,) sums -> (D,)."""
    M = m.max()                                                  # the largest maximum (finite: some range has tokens)
    w = l * torch.exp(m - M)                                     # each range's softmax mass under the common max
    return (w[:, None] * o).sum(dim=0) / w.sum()


@triton.jit
def paged_attention_kernel(
    q_ptr,             # (num_seqs, num_heads, HEAD_DIM) queries, float32, contiguous
    k_cache_ptr,       # (num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM) keys, float32, contiguous
    v_cache_ptr,       # (num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM) values, float32, contiguous
    block_tables_ptr,  # int32 (num_seqs, max_blocks): physical block of each logical block
    seq_lens_ptr,      # int32 (num_seqs,): tokens cached per sequence
    out_ptr,           # (num_seqs, num_heads, HEAD_DIM) output, float32
    scale,             # float: the softmax scale, 1 / sqrt(HEAD_DIM)
    num_heads,         # int: query heads
    num_kv_heads,      # int: KV heads (it divides num_heads)
    max_blocks,        # int: columns of block_tables
    BLOCK_SIZE: tl.constexpr,   # tokens per cache block
    HEAD_DIM: tl.constexpr,     # head dimension (a power of two)
    BLOCK_N: tl.constexpr,      # tokens per loop iteration (a power of two)
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // (num_heads // num_kv_heads)                 # GQA: the KV head this query head reads
    seq_len = tl.load(seq_lens_ptr + seq)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (seq * num_heads + head) * HEAD_DIM + offs_d)          # (HEAD_DIM,)

    m_i = float("-inf")                                           # running max of the scores
    l_i = 0.0                                                     # running sum of exp(score - m_i)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)                  # running sum of exp(score - m_i) * v
    for n0 in range(0, seq_len, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)                          # (BLOCK_N,) token positions of this tile
        mask = tok < seq_len
        block = tl.load(block_tables_ptr + seq * max_blocks + tok // BLOCK_SIZE, mask=mask, other=0)
        slot = tok % BLOCK_SIZE
        row = (block * BLOCK_SIZE + slot) * num_kv_heads + kv_head               # (BLOCK_N,) cache rows
        k = tl.load(k_cache_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0)
        s = tl.sum(q[None, :] * k, axis=1) * scale                # (BLOCK_N,) scores
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)                               # rescales what was summed under the old max
        p = tl.exp(s - m_new)                                     # (BLOCK_N,)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)        # (HEAD_DIM,)
        m_i = m_new
    tl.store(out_ptr + (seq * num_heads + head) * HEAD_DIM + offs_d, acc / l_i)
