"""Paged KV cache: the block allocator (block tables, reference counts, copy-on-write,
prefix caching) and the cache tensors its block ids index. Nothing here knows about models:
kvlab.engine wires these to kvlab's model (attention metadata, scheduler, runner).

    BlockAllocator   which blocks each sequence owns (numbers only)
    PagedKVCache     the K/V tensors those numbers index, (num_blocks, block_size, Hkv, D) per layer
"""

from kvlab.paged.block_allocator import BlockAllocator, OutOfBlocksError, block_hash
from kvlab.paged.kv_cache import PagedKVCache

__all__ = ["BlockAllocator", "OutOfBlocksError", "block_hash", "PagedKVCache"]
