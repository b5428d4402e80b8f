"""Attention over the paged cache for one engine step: the metadata and the attention function.

An engine step runs one forward pass over a *flattened* batch: every token scheduled
in the step, of every sequence, one after another, with no padding:

    input_ids   [ d0 d1 d2 | p0 p0 p0 p0 p0 | p1 p1 p1 ]      (N,)  3 decodes, 2 prefill chunks
    positions   [ 40 17 93 |  0  1  2  3  4 | 32 33 34 ]      (N,)  each token's place in its sequence

Projections, MLP and norms do not care which sequence a token belongs to: they run on
(N, hidden) at once. Only attention does, and it is told by `AttentionMetadata` (vLLM's
`AttentionMetadata`, nano-vllm's `Context`), built once per step as a few flat tensors:

    slot_mapping      (N,)  where each new token's K/V go in the pool (block * block_size + offset)
    decode rows       the first `num_decode_tokens` tokens: one query each (a decode, or a
                      one-token chunk) attending to its whole sequence in the cache:
                      block_tables (D, max_blocks), seq_lens (D,): the paged-attention kernel's
                      arguments (kvlab.kernels)
    prefill rows      the rest: chunks of several queries; token j of a chunk that starts at
                      context c sees keys 0 .. c + j (earlier chunks and prefix-cache hits
                      included, all read from the cache)

Each layer, `EngineAttention` (the model's attention function, kvlab.model.attention)
first writes the step's new K/V into the pool through slot_mapping (so a chunk reads its
own keys back from the cache), then attends. On a GPU (backend "triton") decode rows go
through the paged decode kernel and prefill rows through the paged prefill kernel
(kvlab.kernels.prefill_attention: block_tables (P, max_blocks), query_start (P + 1,),
context_lens (P,)), both reading the cache in place. On the CPU (backend "torch": the
interpreter is slow) both go through "gather + SDPA" (below): a padded (rows, T, S) layout
whose gather indices and causal mask are built once per step, not per layer. The logits
are computed only at `logits_indices`, the last token of each row that samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kvlab.kernels import paged_attention_launch
from kvlab.kernels.prefill_attention import prefill_attention_launch
from kvlab.paged.kv_cache import PagedKVCache


@dataclass
class GatheredLayout:
    """Rows of queries attending over keys gathered from the cache, padded to (R, T, S).

    q_index    int64 (R, T): flat token index of query j of row r (padding repeats the row's last)
    kv_slots   int64 (R, S): cache slot of key p of row r (padding: slot 0, masked out)
    mask       bool (R, 1, T, S): key p visible to query j (causal, within the row's length)
    out_index  int64 (n,): position in the flattened (R * T) output of each real query, in token order
    """
    q_index: torch.Tensor
    kv_slots: torch.Tensor
    mask: torch.Tensor
    out_index: torch.Tensor

    @classmethod
    def build(cls, first_token: np.ndarray, num_tokens: np.ndarray, context: np.ndarray,
              tables: np.ndarray, block_size: int, device) -> "GatheredLayout":
        """first_token, num_tokens, context: (R,) ints per row (where its queries start in the flat
        batch, how many, how many keys precede them); tables (R, max_blocks) int32."""
        r = len(num_tokens)
        t, s = int(num_tokens.max()), int((context + num_tokens).max())
        j = np.minimum(np.arange(t)[None, :], num_tokens[:, None] - 1)           # (R, T) padded -> last
        q_index = first_token[:, None] + j
        query_pos = context[:, None] + j                                         # (R, T)
        key_pos = np.arange(s)                                                   # (S,)
        blocks = tables[:, np.minimum(key_pos // block_size, tables.shape[1] - 1)]   # (R, S)
        kv_slots = blocks.astype(np.int64) * block_size + key_pos % block_size
        mask = key_pos[None, None, :] <= query_pos[:, :, None]                   # (R, T, S) causal
        out_index = (np.arange(r)[:, None] * t + np.arange(t)[None, :])[np.arange(t)[None, :] < num_tokens[:, None]]
        as_t = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype,
                                                                               non_blocking=True)
        return cls(as_t(q_index, torch.long), as_t(kv_slots, torch.long), as_t(mask[:, None], torch.bool),
                   as_t(out_index, torch.long))


def gathered_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       layout: GatheredLayout, scale: float | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the queries in `layout` over keys and values gathered from the paged cache.
    q (n, Hq, D) in flat token order -> (n, Hq, D), written into `out` if given. The gathered copy
    costs an extra write and read of the keys; the Triton kernels read them in place."""
    r, t = layout.q_index.shape
    num_kv_heads, head_dim = k_cache.shape[-2:]
    qp = q[layout.q_index]                                              # (R, T, Hq, D)
    k = k_cache.view(-1, num_kv_heads, head_dim)[layout.kv_slots]       # (R, S, Hkv, D)
    v = v_cache.view(-1, num_kv_heads, head_dim)[layout.kv_slots]
    attn = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2).to(q.dtype),
                                          v.transpose(1, 2).to(q.dtype), attn_mask=layout.mask,
                                          scale=scale, enable_gqa=True)  # (R, Hq, T, D)
    padded = attn.transpose(1, 2).reshape(r * t, *q.shape[1:])        # (R*T, Hq, D)
    return torch.index_select(padded, 0, layout.out_index, out=out)     # (n, Hq, D)


@dataclass
class AttentionMetadata:
    """Where one step's tokens go and what they attend to (see the module docstring)."""
    slot_mapping: torch.Tensor           # int64 (N,)
    num_decode_tokens: int               # the first rows: one query each
    decode_block_tables: torch.Tensor | None = None   # int32 (D, max_blocks)  (kernel path)
    decode_seq_lens: torch.Tensor | None = None       # int32 (D,)             (kernel path)
    decode_layout: GatheredLayout | None = None       # (torch path)
    prefill_layout: GatheredLayout | None = None      # rows with several queries (torch path)
    prefill_block_tables: torch.Tensor | None = None  # int32 (P, max_blocks)  (kernel path)
    prefill_query_start: torch.Tensor | None = None   # int32 (P + 1,)         (kernel path)
    prefill_context_lens: torch.Tensor | None = None  # int32 (P,)             (kernel path)
    prefill_max_query_len: int = 0                    # the longest chunk: the kernel's grid


class EngineAttention:
    """The attention function (kvlab.model.attention.AttentionFn) of the engine's forward pass.
    Set `metadata` before each pass; q, k, v arrive flattened: (N, heads, head_dim)."""

    def __init__(self, cache: PagedKVCache, backend: str):
        if backend not in ("triton", "torch"):
            raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
        self.cache = cache
        self.backend = backend
        self.scale = cache.head_dim ** -0.5                 # softmax(q k^T / sqrt(head_dim))
        self.metadata: AttentionMetadata | None = None

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out: where to write (N, Hq, D), e.g. the static buffer of piecewise CUDA graphs."""
        md = self.metadata
        self.cache.write(layer_idx, md.slot_mapping, k, v)             # every new token's K/V first
        k_cache, v_cache = self.cache.k_cache(layer_idx), self.cache.v_cache(layer_idx)
        out = torch.empty_like(q) if out is None else out
        nd = md.num_decode_tokens
        if nd:
            self._decode(q[:nd], k_cache, v_cache, out[:nd])
        if md.prefill_layout is not None:
            gathered_attention(q[nd:], k_cache, v_cache, md.prefill_layout, out=out[nd:])
        elif md.prefill_context_lens is not None:
            prefill_attention_launch(q[nd:], k_cache, v_cache, md.prefill_block_tables, md.prefill_query_start,
                                     md.prefill_context_lens, md.prefill_max_query_len, self.scale, out[nd:])
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
        md = self.metadata
        if self.backend == "torch":
            gathered_attention(q, k_cache, v_cache, md.decode_layout, out=out)
        else:
            paged_attention_launch(q, k_cache, v_cache, md.decode_block_tables, md.decode_seq_lens, self.scale, out)
