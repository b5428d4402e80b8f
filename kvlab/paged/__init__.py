"""Paged KV cache: block allocator, block tables, copy-on-write, prefix caching,
the cache tensors, and the attention function that lets kvlab's model run on them.

    BlockAllocator   which blocks each sequence owns (numbers only)
    PagedKVCache     the K/V tensors those numbers index, (num_blocks, block_size, Hkv, D) per layer
    PagedAttention   the model's attention function over the cache (decode kernel pluggable)
    runner           forward_step / prefill / decode_step / greedy_generate_paged (+ blocks_to_append)
"""

from kvlab.paged.block_allocator import BlockAllocator, OutOfBlocksError, block_hash
from kvlab.paged.kv_cache import PagedKVCache, slot_mapping
from kvlab.paged.attention import PagedAttention, PagedBatch, gather_decode_attention, prefill_attention
from kvlab.paged.runner import blocks_to_append, decode_step, forward_step, greedy_generate_paged, make_paged, prefill

__all__ = ["BlockAllocator", "OutOfBlocksError", "block_hash", "PagedKVCache", "slot_mapping",
           "PagedAttention", "PagedBatch", "prefill_attention", "gather_decode_attention", "forward_step", "prefill",
           "blocks_to_append", "decode_step", "make_paged", "greedy_generate_paged"]
