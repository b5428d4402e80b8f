"""Writing new keys and values into a paged KV cache through a slot mapping.

Every forward step produces K and V for its new tokens; before attention can read
them they must land in the cache. With paging, token i of the batch goes to a
*slot*: slot = physical_block * block_size + offset_in_block, chosen by the block
allocator (kvlab.paged). A slot of -1 means "don't store" (padding tokens), as in
vLLM's `reshape_and_cache` and nano-vllm's `store_kvcache`.

    key, value:    (num_tokens, num_kv_heads, head_dim)
    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim), written in place
    slot_mapping:  int32 or int64 (num_tokens,)
"""

from __future__ import annotations

import torch

from kvlab.kernels.paged_attention import check_launchable


# ----------------------------------------------------------------------------- reference

def store_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Plain torch: index the cache by (block, offset) and assign; slots < 0 are skipped."""
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
    keep = (offs_h < NUM_KV_HEADS) & (offs_h * 0 + slot >= 0)     # (H_PAD,); slot -1: store nothing
    mask = keep[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch
             + offs_d[None, :], k, mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch
             + offs_d[None, :], v, mask=mask)


# ----------------------------------------------------------------------------- launcher

def _check(key, value, k_cache, v_cache, slot_mapping):
    """Raise ValueError, saying what is wrong and what is allowed, before anything is written."""
    tensors = dict(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key and value must both be (num_tokens, num_kv_heads, head_dim), got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if tuple(key.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"key heads/head_dim {tuple(key.shape[1:])} != cache's {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be ({key.shape[0]},), one slot per token, got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    dtypes = {key.dtype, value.dtype, k_cache.dtype, v_cache.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"key, value and the caches must share a dtype, got {sorted(map(str, dtypes))}")
    check_launchable(tensors)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key[i], value[i] into the caches at slot_mapping[i] (skip where < 0), in place.
    Slots must lie below num_blocks * block_size (not checked: that would need a device sync)."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, H_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1],
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
