"""Writing new keys and values into a paged KV cache through a slot mapping.

Every forward step produces K and V for its new tokens; before attention can read
them they must land in the cache. With paging, token i of the batch goes to a
*slot*: slot = physical_block * block_size + offset_in_block, chosen by the block
allocator (kvlab.paged). A slot of -1 means "don't store" (padding tokens), as in
vLLM's `reshape_and_cache` and nano-vllm's `store_kvcache`.

    key, value:    (num_tokens, num_kv_heads, head_dim)
    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim), written in place
    slot_mapping:  int32 or int64 (num_tokens,), each -1 or a slot in 0..num_blocks * block_size - 1,
                   no slot twice

`store_kv` checks all of this (the slot values with one device-to-host copy, a sync on a
GPU) and calls `store_kv_launch`, which checks nothing, for callers that built the slot
mapping themselves (the engine). The reference runs the same checks.
"""

from __future__ import annotations

import torch

from kvlab.kernels.paged_attention import _require_tensors, check_launchable


# ----------------------------------------------------------------------------- reference

def store_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Plain torch: index the cache by (block, offset) and assign; slots of -1 are skipped.
    Checked like `store_kv` (any one dtype, any strides)."""
    check_store_kv(key, value, k_cache, v_cache, slot_mapping)
    check_slots(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[keep]                 # (n, Hkv, D) into (n, Hkv, D) cache rows
    v_cache[blocks, offsets] = value[keep]


# ----------------------------------------------------------------------------- Triton kernel

import triton  # noqa: E402  (kvlab.kernels has set TRITON_INTERPRET=1 first where there is no GPU)
import triton.language as tl  # noqa: E402


@triton.jit
def _store_kv_kernel(
    key_ptr,          # (num_tokens, num_kv_heads, head_dim) new keys
    value_ptr,        # (num_tokens, num_kv_heads, head_dim) new values
    k_cache_ptr,      # (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim) key cache, written
    v_cache_ptr,      # (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim) value cache, written
    slot_mapping_ptr, # int (num_tokens,) destination slot of each token, -1: skip
    num_slots,        # int: num_blocks * BLOCK_SIZE, slots in the pool
    stride_kt, stride_kh,             # key strides: token, head (head_dim stride is 1)
    stride_vt, stride_vh,             # value strides: token, head
    stride_kcb, stride_kcs, stride_kch,  # k_cache strides: block, slot, head
    stride_vcb, stride_vcs, stride_vch,  # v_cache strides: block, slot, head
    NUM_KV_HEADS: tl.constexpr,  # num_kv_heads
    H_PAD: tl.constexpr,         # num_kv_heads rounded up to a power of two
    HEAD_DIM: tl.constexpr,      # head_dim
    D_PAD: tl.constexpr,         # head_dim rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,    # tokens per cache block
):
    tok = tl.program_id(0)                    # one program per new token: all its heads at once
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    slots = offs_h * 0 + slot                          # (H_PAD,) the slot, once per head
    keep = (offs_h < NUM_KV_HEADS) & (slots >= 0) & (slots < num_slots)   # -1: store nothing; never outside the pool
    mask = keep[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch
             + offs_d[None, :], k, mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch
             + offs_d[None, :], v, mask=mask)


# ----------------------------------------------------------------------------- launcher

def check_store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Check types, shapes, dtypes and devices (no device-to-host copy); raise TypeError or
    ValueError saying what is wrong and what is allowed, before anything is written."""
    tensors = dict(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    _require_tensors(tensors)
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key and value must both be (num_tokens, num_kv_heads, head_dim), got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if tuple(key.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"key heads/head_dim {tuple(key.shape[1:])} != cache's {tuple(k_cache.shape[2:])}: "
                         f"they must be equal")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be ({key.shape[0]},), one slot per token, got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    dtypes = {key.dtype, value.dtype, k_cache.dtype, v_cache.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"key, value and the caches must share a dtype, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Every slot -1 (skip) or in 0..num_slots - 1, and no slot twice (which token would win
    is undefined). One device-to-host copy (a sync on a GPU)."""
    if slot_mapping.numel() == 0:
        return
    slots = slot_mapping.long()
    outside = (slots < -1) | (slots >= num_slots)
    ordered = slots.sort().values
    repeated = (ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0)
    bad_slot, bad_repeat = torch.stack([outside.sum(), repeated.sum()]).tolist()     # the one sync
    if bad_slot:
        i = int(torch.nonzero(outside)[0, 0])
        raise ValueError(f"slot_mapping[{i}] = {int(slots[i])}: each slot must be -1 (skip the token) or in "
                         f"0..{num_slots - 1} (num_blocks * block_size)")
    if bad_repeat:
        slot = int(ordered[1:][repeated][0])
        raise ValueError(f"slot_mapping names slot {slot} more than once (tokens "
                         f"{torch.nonzero(slots == slot)[:, 0].tolist()}): each token needs its own slot")


def store_kv_launch(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Launch the store kernel with no checks at all (no host sync: CUDA-graph capturable).
    For callers that built the slot mapping themselves, such as the engine.

    The caller guarantees what `store_kv` would otherwise check: key and value
    (num_tokens, num_kv_heads, head_dim); k_cache and v_cache (num_blocks, block_size,
    num_kv_heads, head_dim) with the same heads and head_dim; one dtype for all four;
    slot_mapping int32 or int64 (num_tokens,), each -1 or in 0..num_blocks * block_size - 1,
    no slot twice; all on one CUDA device (or the CPU under TRITON_INTERPRET=1), unit stride
    in the last dimension. Broken, the result is undefined, but nothing is written outside
    the pool (slots outside it are skipped).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_cache.shape[0] * k_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, H_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1],
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key[i], value[i] into the caches at slot_mapping[i] (skip where -1), in place:
    every argument checked (the slots with one device-to-host copy, a sync on a GPU), then
    `store_kv_launch`. The checks cost ~21 µs per call on the CPU (2-core machine, 4 tokens into
    64 blocks of 16), beside ~9 ms for the interpreted kernel."""
    check_store_kv(key, value, k_cache, v_cache, slot_mapping)
    check_launchable(dict(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping))
    check_slots(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    store_kv_launch(key, value, k_cache, v_cache, slot_mapping)
