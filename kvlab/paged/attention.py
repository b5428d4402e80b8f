"""Paged attention for kvlab's model: the attention function that plugs into the seam.

`kvlab.model.attention` says every layer calls `attn(layer_idx, q, k, v, positions)`.
`PagedAttention` is such a function. For one forward pass it is told, by a
`PagedBatch`, where each new token's K/V goes (a slot mapping) and where each
sequence's earlier tokens live (block tables, lengths) — nano-vllm's `Context`,
vLLM's `AttentionMetadata`. Each layer then

1. writes the new keys and values into the pool through the slot mapping
   (all rows of the batch first, so a sequence whose prompt hit another one's
   freshly allocated prefix blocks reads them in the same pass);
2. attends:
   * decode (one new token per row): calls the *decode attention function*,
     `kvlab.kernels.paged_attention_reference` by default. Any function with its
     signature plugs in, the Triton kernel `kvlab.kernels.paged_attention` included:

         decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None) -> out
         q, out: (num_seqs, num_heads, head_dim); k_cache, v_cache: (num_blocks, block_size,
         num_kv_heads, head_dim); block_tables: int32 (num_seqs, max_blocks); seq_lens: int32

   * prefill (several new tokens per row, possibly after a prefix-cache hit, so the
     queries also look at cached blocks): gathers each row's keys/values through its
     block table in torch and runs masked SDPA (key position <= query position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvlab.kernels import paged_attention_reference
from kvlab.model.attention import sdpa

DecodeAttentionFn = Callable[..., torch.Tensor]


@dataclass
class PagedBatch:
    """Where the tokens of one forward pass go and what they attend to. B rows, T new tokens
    per row at most (rows with fewer are right-padded)."""
    slot_mapping: torch.Tensor   # int64 (B, T): slot of each new token; -1 = padding, not written
    block_tables: torch.Tensor   # int32 (B, max_blocks): physical block of each logical block (pad 0)
    seq_lens: torch.Tensor       # int32 (B,): tokens in the cache once this pass has written its own

    def __post_init__(self):
        if self.slot_mapping.dim() != 2 or self.block_tables.dim() != 2 or self.seq_lens.dim() != 1:
            raise ValueError("PagedBatch wants slot_mapping (B, T), block_tables (B, max_blocks) "
                             f"and seq_lens (B,), got {tuple(self.slot_mapping.shape)}, "
                             f"{tuple(self.block_tables.shape)}, {tuple(self.seq_lens.shape)}")
        b = self.slot_mapping.shape[0]
        if self.block_tables.shape[0] != b or self.seq_lens.shape[0] != b:
            raise ValueError(f"PagedBatch rows disagree: slot_mapping {b}, block_tables "
                             f"{self.block_tables.shape[0]}, seq_lens {self.seq_lens.shape[0]}")

    @classmethod
    def build(cls, block_tables: Sequence[Sequence[int]], seq_lens: Sequence[int],
              num_new: Sequence[int], block_size: int, device=None) -> "PagedBatch":
        """From plain lists: row i's new tokens are its last num_new[i] positions."""
        b = len(block_tables)
        if not (len(seq_lens) == len(num_new) == b) or b == 0:
            raise ValueError(f"need one block table, length and new-token count per row, got "
                             f"{b}, {len(seq_lens)}, {len(num_new)}")
        t = max(num_new)
        slots = torch.full((b, t), -1, dtype=torch.long)
        max_blocks = max(len(tb) for tb in block_tables)
        tables = torch.zeros(b, max_blocks, dtype=torch.int32)
        for i, (table, n, new) in enumerate(zip(block_tables, seq_lens, num_new)):
            if not 1 <= new <= n or len(table) * block_size < n:
                raise ValueError(f"row {i}: {new} new tokens of {n} do not fit a table of "
                                 f"{len(table)} blocks of {block_size}")
            table_t = torch.as_tensor(table, dtype=torch.long)
            tables[i, :len(table)] = table_t.to(torch.int32)
            pos = torch.arange(n - new, n)
            slots[i, :new] = table_t[pos // block_size] * block_size + pos % block_size
        return cls(slots.to(device), tables.to(device),
                   torch.as_tensor(list(seq_lens), dtype=torch.int32, device=device))


class PagedAttention:
    """An attention function (kvlab.model.attention.AttentionFn) over a PagedKVCache.

        attn = PagedAttention(cache)                                    # torch reference
        attn = PagedAttention(cache, decode_attention=kvlab.kernels.paged_attention)  # Triton
        attn.set_batch(PagedBatch.build(...)); logits = model(ids, positions, attn=attn)
    """

    def __init__(self, cache, decode_attention: DecodeAttentionFn | None = None):
        self.cache = cache
        self.decode_attention = decode_attention or paged_attention_reference
        self.batch: PagedBatch | None = None

    def set_batch(self, batch: PagedBatch) -> "PagedAttention":
        self.batch = batch
        return self

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if batch is None:
            raise ValueError("PagedAttention has no batch: call set_batch(PagedBatch) before the forward pass")
        b, t = q.shape[:2]
        if tuple(batch.slot_mapping.shape) != (b, t):
            raise ValueError(f"the batch's slot_mapping is {tuple(batch.slot_mapping.shape)} but the "
                             f"model passed {b} rows of {t} tokens")
        self.cache.write(layer_idx, batch.slot_mapping.reshape(-1),
                         k.reshape(b * t, *k.shape[2:]), v.reshape(b * t, *v.shape[2:]))
        k_cache, v_cache = self.cache.k_cache(layer_idx), self.cache.v_cache(layer_idx)
        if t == 1:                                            # decode: one query per sequence
            out = self.decode_attention(q[:, 0].contiguous(), k_cache, v_cache, batch.block_tables,
                                        batch.seq_lens)       # (B, Hq, D)
            return out[:, None]                               # (B, 1, Hq, D)
        return prefill_attention(q, positions, k_cache, v_cache, batch.block_tables, batch.seq_lens)


def gather_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """Decode attention with the decode kernel's signature, done as "gather through the block
    table, then SDPA" (the prefill path with one query per sequence). An alternative to the
    reference that is faster on CPU; the Triton kernel avoids the gathered copy altogether."""
    if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"gather_decode_attention supports only the default scale 1/sqrt(head_dim), got {scale}")
    positions = (seq_lens.long() - 1)[:, None]                                # (B, 1): the newest token
    return prefill_attention(q[:, None], positions, k_cache, v_cache, block_tables, seq_lens)[:, 0]


def prefill_attention(q: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor) -> torch.Tensor:
    """Several queries per sequence over everything cached (new tokens already written).

    q: (B, T, Hq, D); positions: (B, T); caches (num_blocks, block_size, Hkv, D);
    block_tables int32 (B, max_blocks); seq_lens (B,). Key p is visible to a query at
    position x iff p <= x and p < seq_len."""
    block_size = k_cache.shape[1]
    s = int(seq_lens.max())
    pos = torch.arange(s, device=q.device)                                   # (S,)
    tables = block_tables.long()
    slots = tables[:, pos // block_size] * block_size + pos % block_size     # (B, S)
    k_all = k_cache.flatten(0, 1)[slots].to(q.dtype)                         # (B, S, Hkv, D)
    v_all = v_cache.flatten(0, 1)[slots].to(q.dtype)
    mask = (pos[None, None, :] <= positions[:, :, None]) & \
           (pos[None, None, :] < seq_lens[:, None, None].long())             # (B, T, S)
    mask |= ~mask.any(dim=-1, keepdim=True)      # padded queries: any finite row, ignored later
    return sdpa(q, k_all, v_all, mask=mask)                                  # (B, T, Hq, D)
