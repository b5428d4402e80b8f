"""Running a model on the paged cache: one forward step, and greedy generation.

The allocator already holds every sequence's token ids, so one step of any kind
(prefill of a prompt, a prefill that starts after a prefix-cache hit, a decode
step, or a mix) reads the same way:

    for each sequence: its new tokens are its last `num_new` tokens
    pending copy-on-write copies -> cache.copy_blocks
    slot mapping, block tables, lengths -> PagedBatch -> PagedAttention -> model

This is the smallest loop that shows the paged cache at work; kvlab.engine adds
a scheduler (admission, preemption) around the same pieces.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from kvlab.paged.attention import DecodeAttentionFn, PagedAttention, PagedBatch
from kvlab.paged.block_allocator import BlockAllocator, OutOfBlocksError
from kvlab.paged.kv_cache import PagedKVCache


def forward_step(model, attn: PagedAttention, allocator: BlockAllocator, seq_ids: Sequence[Hashable],
                 num_new: Sequence[int]) -> torch.Tensor:
    """Run the model on the last num_new[i] tokens of each sequence (already in the allocator);
    return the logits of each sequence's last token, (B, vocab)."""
    device = attn.cache.device
    attn.cache.copy_blocks(allocator.pop_copies())        # copy-on-write before any new write
    tables, lens, rows, poss = [], [], [], []
    for sid, n in zip(seq_ids, num_new):
        tokens = allocator.token_ids(sid)
        tables.append(allocator.block_table(sid))
        lens.append(len(tokens))
        rows.append(tokens[len(tokens) - n:])
        poss.append(list(range(len(tokens) - n, len(tokens))))
    batch = PagedBatch.build(tables, lens, num_new, allocator.block_size, device=device)
    t = batch.slot_mapping.shape[1]
    ids = torch.tensor([r + [0] * (t - len(r)) for r in rows], device=device)          # (B, T), right-padded
    positions = torch.tensor([p + [0] * (t - len(p)) for p in poss], device=device)   # (B, T)
    logits = model(ids, positions=positions, attn=attn.set_batch(batch))             # (B, T, vocab)
    last = torch.tensor([n - 1 for n in num_new], device=device)
    return logits[torch.arange(len(rows), device=device), last]                     # (B, vocab)


def prefill(model, attn: PagedAttention, allocator: BlockAllocator, seq_ids: Sequence[Hashable]) -> torch.Tensor:
    """Prefill freshly allocated sequences: only the tokens the prefix cache did not supply."""
    num_new = [allocator.num_tokens(s) - allocator.num_cached_tokens(s) for s in seq_ids]
    return forward_step(model, attn, allocator, seq_ids, num_new)


def decode_step(model, attn: PagedAttention, allocator: BlockAllocator, seq_ids: Sequence[Hashable],
                token_ids: Sequence[int]) -> torch.Tensor:
    """Append one token to each sequence and run it: the logits that pick the next one.

    Checks first that every sequence can take its token (OutOfBlocksError, nothing appended,
    if the step needs more free blocks than there are): appending to some sequences and then
    failing would leave them a token whose K/V was never written."""
    if len(seq_ids) != len(token_ids) or len(set(seq_ids)) != len(seq_ids):
        raise ValueError(f"need one token per sequence and distinct sequences, got {len(seq_ids)} ids "
                         f"({len(set(seq_ids))} distinct) and {len(token_ids)} tokens")
    needed = blocks_to_append(allocator, seq_ids)
    if needed > allocator.num_free_blocks:
        raise OutOfBlocksError(f"a decode step of {len(seq_ids)} sequences needs {needed} free blocks, "
                               f"only {allocator.num_free_blocks} are free; nothing was appended")
    for sid, tok in zip(seq_ids, token_ids):
        allocator.append_token(sid, tok)
    return forward_step(model, attn, allocator, seq_ids, [1] * len(seq_ids))


def blocks_to_append(allocator: BlockAllocator, seq_ids: Sequence[Hashable]) -> int:
    """Free blocks that appending one token to each of seq_ids (distinct) takes, from the
    allocator's public state. A sequence whose last block is full takes a new one. A partly
    filled last block shared by r tables is copied by each writer but the last one left
    holding it: k of its sharers appending take min(k, r - 1) blocks."""
    bs = allocator.block_size
    needed = 0
    writers: dict[int, int] = {}                  # shared, partly filled last block -> sharers appending
    for sid in seq_ids:
        if allocator.num_tokens(sid) % bs == 0:
            needed += 1
        else:
            last = allocator.block_table(sid)[-1]
            if allocator.ref_count(last) > 1:
                writers[last] = writers.get(last, 0) + 1
    return needed + sum(min(k, allocator.ref_count(b) - 1) for b, k in writers.items())


def make_paged(model, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
               free_order: Sequence[int] | None = None,
               decode_attention: DecodeAttentionFn | None = None,
               kv_dtype: torch.dtype | None = None) -> tuple[BlockAllocator, PagedKVCache, PagedAttention]:
    """An allocator, a cache shaped for model.spec, and the attention function over it."""
    allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching, free_order=free_order)
    cache = PagedKVCache.from_spec(model.spec, num_blocks, block_size,
                                   dtype=kv_dtype or model.embed_tokens.dtype, device=model.embed_tokens.device)
    return allocator, cache, PagedAttention(cache, decode_attention)


def greedy_generate_paged(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                          block_size: int = 16, num_blocks: int | None = None,
                          eos_token_id: int | None = None, seed: int | None = None,
                          decode_attention: DecodeAttentionFn | None = None,
                          paged: tuple[BlockAllocator, PagedKVCache, PagedAttention] | None = None,
                          free_finished: bool = True) -> list[list[int]]:
    """Greedy decoding of prompts of any lengths together, from a paged cache.

    All prompts are prefilled in one pass, then decoded one token a step; a sequence
    that emits eos_token_id stops and frees its blocks at once. seed: scatter the free
    queue with a seeded permutation (blocks end up anywhere in the pool). decode_attention:
    the decode kernel (default the torch reference; kvlab.kernels.paged_attention is the
    Triton one). paged: an existing (allocator, cache, attn) from make_paged instead.
    free_finished=False keeps finished sequences (ids ("greedy", i)) and their blocks, to look
    at their block tables and cached K/V afterwards. Returns the new tokens of each prompt (cut after EOS)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if paged is None:
        if num_blocks is None:           # enough for every sequence at full length
            num_blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
        order = None
        if seed is not None:
            order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        paged = make_paged(model, num_blocks, block_size, free_order=order, decode_attention=decode_attention)
    allocator, _, attn = paged
    seq_ids = [("greedy", i) for i in range(len(prompts))]
    # all prompts or none: an upper bound (prefix-cache hits on blocks in use would need fewer)
    needed = sum(allocator.blocks_needed(len(p)) for p in prompts)
    if needed > allocator.num_free_blocks:
        raise OutOfBlocksError(f"{len(prompts)} prompts need {needed} free blocks, only "
                               f"{allocator.num_free_blocks} are free; nothing was allocated")
    for sid, prompt in zip(seq_ids, prompts):
        allocator.allocate_sequence(sid, prompt)
    outputs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    logits = prefill(model, attn, allocator, seq_ids)
    for step in range(max_new_tokens):
        next_tokens = logits.argmax(dim=-1).tolist()
        still = []
        for i, tok in zip(live, next_tokens):
            outputs[i].append(tok)
            if (eos_token_id is not None and tok == eos_token_id) or step == max_new_tokens - 1:
                if free_finished:
                    allocator.free_sequence(seq_ids[i])      # blocks are free again at once
            else:
                still.append((i, tok))
        if not still:
            break
        live = [i for i, _ in still]
        logits = decode_step(model, attn, allocator, [seq_ids[i] for i in live], [t for _, t in still])
    return outputs
