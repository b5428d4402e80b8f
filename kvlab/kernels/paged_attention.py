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
    seq_lens:     int32 (num_seqs)                       tokens cached per sequence (0 gives zeros)
    out:          (num_seqs, num_heads, head_dim)

Token t of sequence s sits at k_cache[block_tables[s, t // block_size], t % block_size].
Query head h reads KV head h // (num_heads // num_kv_heads) (GQA; MHA and MQA are the
two ends of it).

Two entry points run the kernel: `paged_attention` checks everything (types, shapes,
dtypes, and the values: lengths within the table, block ids within the cache, which costs
one device-to-host copy) and then calls `paged_attention_launch`, which checks nothing, for
callers that built the metadata themselves and must not sync (the engine's decode step,
CUDA graphs). The reference runs the same checks.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvlab import checks

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)


# ----------------------------------------------------------------------------- reference

def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              scale: float | None = None) -> torch.Tensor:
    """Plain torch, obviously correct: gather every sequence's K/V through its block table
    into a contiguous (padded) tensor, then softmax(q K^T * scale) V in fp32, with the
    positions past each sequence's length masked out. A sequence of length 0 gives zeros.

    It reads the whole gathered copy (and writes it first): the "gather + attention" cost
    that the Triton kernel avoids. Entries of block_tables past a sequence's last block
    are never read, so they may hold anything (-1, stale ids); neither are the cache slots
    past a sequence's length (a NaN there does not leak in). A NaN or inf in q, or in the
    K/V a sequence does attend to, propagates to its output, as in the kernel.

    Checks everything the kernel's public function checks (`check_paged_attention`, then
    `check_block_tables`), except what only Triton needs: any floating dtype is allowed
    (float64 too), and strides are free.
    """
    scale = check_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, dtypes=REFERENCE_DTYPES)
    longest = check_block_tables(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1])
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if longest == 0:                                     # nothing to attend to (also: no sequences)
        return torch.zeros_like(q)
    group = num_heads // num_kv_heads
    nb = -(-longest // block_size)                       # blocks of the longest sequence
    lens = seq_lens.long()

    used = torch.arange(nb, device=q.device) < (lens[:, None] + block_size - 1) // block_size
    blocks = torch.where(used, block_tables[:, :nb].long(), 0)      # (S, nb): unused entries never read
    valid = torch.arange(nb * block_size, device=q.device) < lens[:, None]              # (S, N)
    k = k_cache[blocks].flatten(1, 2).float()            # (S, N = nb * block_size, Hkv, D)
    v = v_cache[blocks].flatten(1, 2).float()            # (S, N, Hkv, D)
    v = v.masked_fill(~valid[:, :, None, None], 0.0)     # slots past the length: never read
    k = k.repeat_interleave(group, dim=2)                # (S, N, Hq, D): query head h reads KV head h // group
    v = v.repeat_interleave(group, dim=2)

    scores = torch.einsum("shd,snhd->shn", q.float(), k) * scale               # (S, Hq, N)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    probs = probs.masked_fill((lens == 0)[:, None, None], 0.0)  # no key at all: zeros (softmax of -inf is NaN)
    out = torch.einsum("shn,snhd->shd", probs, v)                             # (S, Hq, D)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------- the contract, checked
#
# Shapes, dtypes and devices are checked on the host for free. Values (block ids, lengths)
# live on the device: reading them is a device-to-host copy, which on a GPU waits for the
# queue to drain. So the checks are split: check_paged_attention (metadata only, no sync)
# and check_block_tables (one sync). The public functions run both; the launchers run
# neither, for callers that built the metadata themselves (the engine) and must not sync.

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


CACHE_LAYOUT = "(num_blocks, block_size, num_kv_heads, head_dim)"


def _require_tensors(tensors: dict) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _names(names: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_paged_tensors(tensors: dict[str, torch.Tensor], layouts: dict[str, tuple[int, str]],
                        dtypes: tuple = KERNEL_DTYPES) -> None:
    """What the decode and the prefill kernel both ask of their tensors, checked with no
    device-to-host copy. `tensors` holds q, k_cache, v_cache, then the int32 index tensors
    (block_tables and the kernel's own); `layouts` gives q's and each index tensor's
    (dimensions, layout) for the messages. Checks: torch tensors of those dimensions; k_cache
    and v_cache of one shape CACHE_LAYOUT, their head_dim q's (1..256), their KV heads dividing
    q's heads; q, k_cache, v_cache of one dtype among `dtypes`; the index tensors int32; one
    device. Raises TypeError or ValueError naming the argument and saying what is allowed.
    How many rows each tensor has is the caller's to check (the kernels differ)."""
    _require_tensors(tensors)
    layouts = dict(k_cache=(4, CACHE_LAYOUT), v_cache=(4, CACHE_LAYOUT), **layouts)
    for name, (ndim, layout) in layouts.items():
        if tensors[name].dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(tensors[name].shape)}")
    q, k_cache, v_cache = tensors["q"], tensors["k_cache"], tensors["v_cache"]
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads, kv_head_dim = k_cache.shape[1:]
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    if kv_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {kv_head_dim}: they must be equal")
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim must be in 1..256, got {head_dim}")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    if block_size < 1:
        raise ValueError("block_size (k_cache.shape[1]) must be >= 1")
    if q.dtype not in dtypes:
        raise ValueError(f"q dtype must be one of {', '.join(_DTYPE_NAMES[d] for d in dtypes)}, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    index = [name for name in tensors if name not in ("q", "k_cache", "v_cache")]
    if any(tensors[name].dtype != torch.int32 for name in index):
        raise ValueError(f"{_names(index)} must be int32, got {', '.join(str(tensors[n].dtype) for n in index)}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale to use: 1 / sqrt(head_dim) when scale is None, else a positive finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return checks.in_range("scale", scale, 0, math.inf, "a positive finite number or None", low_open=True,
                           high_open=True)


def check_out(out, q: torch.Tensor) -> torch.Tensor:
    """Where a kernel writes its result: a new tensor like q when out is None, else out, which
    must have q's shape, dtype and device and unit stride in its last dimension."""
    if out is None:
        return torch.empty_like(q)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if not (out.shape == q.shape and out.dtype == q.dtype and out.device == q.device and out.stride(-1) == 1):
        raise ValueError(f"out must be a tensor of q's shape {tuple(q.shape)}, dtype {q.dtype} and device "
                         f"{q.device}, contiguous in its last dimension; got {tuple(out.shape)}, {out.dtype}, "
                         f"{out.device}, strides {out.stride()}")
    return out


def check_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None,
                          dtypes: tuple = KERNEL_DTYPES) -> float:
    """Check the decode kernel's arguments' types, shapes, dtypes and devices (no device-to-host
    copy) and return the softmax scale to use (1 / sqrt(head_dim) when scale is None). Raises
    TypeError or ValueError saying what is wrong and what is allowed."""
    check_paged_tensors(dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens),
                        dict(q=(3, "(num_seqs, num_heads, head_dim)"), block_tables=(2, "(num_seqs, max_blocks)"),
                             seq_lens=(1, "(num_seqs,)")), dtypes)
    num_seqs = q.shape[0]
    if block_tables.shape[0] != num_seqs or seq_lens.shape[0] != num_seqs:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)} "
                         f"must have num_seqs = {num_seqs} rows, one per query")
    return check_scale(scale, q.shape[2])


def check_block_tables(block_tables: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int,
                       block_size: int) -> int:
    """Check the values the kernel indexes with, and return the longest sequence's length:
    every length in 0..max_blocks * block_size, and the block ids each sequence reads (its
    first ceil(len / block_size) table entries) in 0..num_blocks - 1. Entries past those are
    never read and may hold anything (-1 as padding). One device-to-host copy (a sync on a GPU)."""
    num_seqs, max_blocks = block_tables.shape
    if num_seqs == 0:
        return 0
    limit = max_blocks * block_size
    lens = seq_lens.long()
    needed = (lens.clamp(0, limit) + block_size - 1) // block_size                   # (S,) entries read
    read = torch.arange(max_blocks, device=lens.device) < needed[:, None]           # (S, max_blocks)
    outside = read & ((block_tables < 0) | (block_tables >= num_blocks))
    lo, hi, bad = torch.stack([lens.min(), lens.max(), outside.sum()]).tolist()      # the one sync
    if lo < 0 or hi > limit:
        s = int(torch.nonzero((lens < 0) | (lens > limit))[0, 0])
        raise ValueError(f"seq_lens[{s}] = {int(lens[s])}: every length must lie in 0..{limit} "
                         f"(the table's {max_blocks} blocks of {block_size} tokens)")
    if bad:
        s, j = torch.nonzero(outside)[0].tolist()
        allowed = f"0..{num_blocks - 1}" if num_blocks else "none: the cache has no blocks"
        raise ValueError(f"block_tables[{s}, {j}] = {int(block_tables[s, j])}: sequence {s} ({int(lens[s])} tokens) "
                         f"reads table entries 0..{int(needed[s]) - 1}, and each must be a block of the cache "
                         f"({allowed})")
    return int(hi)


def check_launchable(tensors: dict[str, torch.Tensor]) -> None:
    """What every kvlab Triton launcher needs of its tensors beyond the contract: unit stride
    in the last dimension, one device, and that device a CUDA GPU or the CPU under the interpreter."""
    for name, t in tensors.items():
        if t.numel() > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensors must be on a CUDA GPU (or the CPU through the interpreter), got {device}")


# ----------------------------------------------------------------------------- Triton kernels
#
# One program instance = one (sequence, KV head, split). It loads the G = num_heads //
# num_kv_heads query heads that share this KV head as one (G_PAD, D) tile, then walks the
# sequence's keys and values BLOCK_N tokens at a time: the block table turns each token's
# logical position into (physical block, slot), so every K/V byte is read exactly once
# and shared by the whole query group (GQA). Softmax is computed online (running max m,
# running sum l, rescaled accumulator), in fp32, with exp2 and log2(e) folded into the scale.
#
# Split-K ("flash-decoding", Dao et al. 2023): with few sequences there are too few
# (sequence, KV head) programs to keep 132 SMs busy, so each sequence's tokens are cut into
# num_splits ranges handled by separate programs, each writing a partial (o, m, l); a
# second small kernel merges them: out = sum_i l_i 2^(m_i - M) o_i / sum_i l_i 2^(m_i - M).
#
# The loop's two steps are @triton.jit helpers that the paged prefill kernel
# (kvlab.kernels.prefill_attention) calls too: `load_kv_tile` (K and V of BLOCK_N tokens
# through the block table) and `online_softmax_step` (one tile's scores folded into m, l
# and the accumulator). Triton inlines them into each kernel (KERNEL_NOTES.md: the code
# compiled for an H100 stayed the same when the loop moved into them).

import triton  # noqa: E402  (kvlab.kernels has set TRITON_INTERPRET=1 first where there is no GPU)
import triton.language as tl  # noqa: E402


def dot_constexprs(dtype: torch.dtype, interpret: bool) -> dict:
    """How both attention kernels call tl.dot, decided in this one place:

    UPCAST  cast q, K and V to fp32 before tl.dot, only under the CPU interpreter: there a dot of
            bfloat16 tiles returns garbage (errors ~3e10; fp16 and fp32 are right), and fp32 for
            every dtype is simplest. On a GPU fp16 and bf16 tiles go to the tensor cores as they
            are (accumulating in fp32); an upcast would double the tiles' registers and leave
            the 16-bit tensor-core path.
    IEEE    an fp32 cache gets full-precision fp32 dots: Triton's default on a GPU is TF32, inputs
            rounded to a 10-bit mantissa (2^-11 ~ 5e-4 relative), far above the fp32 tests' 2e-5.
            The interpreter multiplies in full precision whatever it is asked (numpy matmul), so
            there it changes nothing.
    """
    return dict(UPCAST=interpret, IEEE=dtype == torch.float32)


@triton.jit
def load_kv_tile(
    k_cache_ptr,      # (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim) keys, paged
    v_cache_ptr,      # (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim) values, paged
    bt_row,           # int32 pointer: this sequence's row of block_tables
    tok,              # (BLOCK_N,) logical token positions to load
    mask_n,           # (BLOCK_N,) which of them to load (the others read as zeros)
    kv_head,          # int: the KV head
    offs_d, mask_d,   # (D_PAD,) offsets within head_dim, and which lie below head_dim
    num_blocks,       # int: blocks in the pool
    stride_kb, stride_ks, stride_kh,      # k_cache strides: block, slot, head
    stride_vb, stride_vs, stride_vh,      # v_cache strides: block, slot, head
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    UPCAST: tl.constexpr,      # return fp32 tiles (dot_constexprs says when)
):
    """K and V of tokens `tok` of one sequence and one KV head, (BLOCK_N, D_PAD) each: the block
    table turns each logical position into (physical block, slot)."""
    block = tl.load(bt_row + tok // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    slot = tok % BLOCK_SIZE
    in_pool = (block >= 0) & (block < num_blocks)    # by contract always; never read outside the pool
    mask_kv = (mask_n & in_pool)[:, None] & mask_d[None, :]
    k = tl.load(k_cache_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks
                + kv_head * stride_kh + offs_d[None, :], mask=mask_kv, other=0.0)   # (BLOCK_N, D_PAD)
    v = tl.load(v_cache_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs
                + kv_head * stride_vh + offs_d[None, :], mask=mask_kv, other=0.0)   # (BLOCK_N, D_PAD)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def online_softmax_step(
    q,                # (M, D_PAD) queries (M: a GQA group, or a tile of a chunk's queries)
    k, v,             # (BLOCK_N, D_PAD) one tile of keys and values
    visible,          # bool, broadcasts to (M, BLOCK_N): which keys each query may see
    qk_scale,         # float: scale * log2(e), so that exp2 gives exp
    m_i,              # (M,) fp32 running max of the scores (log2 units)
    l_i,              # (M,) fp32 running sum of 2^(score - m_i)
    acc,              # (M, D_PAD) fp32 running sum of 2^(score - m_i) * v
    IEEE: tl.constexpr,        # full-precision fp32 dots, not TF32 (dot_constexprs says when)
):
    """Fold one tile into the online softmax; returns the new (m_i, l_i, acc). Each query must
    see a key in its first tile (decode: every tile has one; prefill: key 0), so m stays finite."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(visible, s * qk_scale, float("-inf"))                         # (M, BLOCK_N)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)                     # rescales what was summed so far
    p = tl.exp2(s - m_new[:, None])                  # (M, BLOCK_N)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv                  # (M, D_PAD)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr,            # (num_seqs, num_heads, head_dim) queries
    k_cache_ptr,      # (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim) keys, paged
    v_cache_ptr,      # (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim) values, paged
    block_tables_ptr, # int32 (num_seqs, max_blocks) physical block of each logical block
    seq_lens_ptr,     # int32 (num_seqs) tokens cached per sequence
    out_ptr,          # (num_seqs, num_heads, head_dim) output; written when not SPLIT
    part_o_ptr,       # fp32 (num_seqs, num_heads, num_splits, head_dim) normalized partial outputs
    part_m_ptr,       # fp32 (num_seqs, num_heads, num_splits) running max (log2 units) of each split
    part_l_ptr,       # fp32 (num_seqs, num_heads, num_splits) softmax denominator of each split
    qk_scale,         # float: scale * log2(e), so that exp2 gives exp
    tokens_per_split, # int: tokens each split covers (a multiple of BLOCK_N)
    num_splits,       # int: splits per sequence (the grid's third dimension)
    max_tokens,       # int: max_blocks * BLOCK_SIZE, what a block table row covers
    num_blocks,       # int: blocks in the pool
    stride_qs, stride_qh,                 # q strides (head_dim stride is 1)
    stride_kb, stride_ks, stride_kh,      # k_cache strides: block, slot, head
    stride_vb, stride_vs, stride_vh,      # v_cache strides: block, slot, head
    stride_bts,                           # block_tables row stride
    stride_os, stride_oh,                 # out strides
    GROUP: tl.constexpr,       # query heads per KV head
    G_PAD: tl.constexpr,       # GROUP rounded up to a power of two >= 16 (tl.dot's minimum)
    HEAD_DIM: tl.constexpr,    # head_dim
    D_PAD: tl.constexpr,       # head_dim rounded up to a power of two >= 16
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,     # tokens per loop iteration
    SPLIT: tl.constexpr,       # False: write out directly; True: write partials for the reduce kernel
    UPCAST: tl.constexpr,      # q, K, V in fp32 before tl.dot (dot_constexprs: the CPU interpreter's bf16)
    IEEE: tl.constexpr,        # full-precision fp32 dots, not TF32 (dot_constexprs: fp32 caches)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(tl.minimum(start + tokens_per_split, seq_len), max_tokens)   # never past the table row

    offs_g = tl.arange(0, G_PAD)                   # query head within the group
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)                 # token within the tile
    heads = kv_head * GROUP + offs_g               # (G_PAD,) query heads that read this KV head
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM

    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)            # (G_PAD, D_PAD)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)    # running max of the scores (log2 units)
    l_i = tl.zeros([G_PAD], tl.float32)                  # running sum of 2^(score - m_i)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)           # running sum of 2^(score - m_i) * v

    bt_row = block_tables_ptr + seq * stride_bts
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n                                  # (BLOCK_N,) logical token positions
        mask_n = tok < end
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, bt_row, tok, mask_n, kv_head, offs_d, mask_d, num_blocks,
                            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, UPCAST)
        m_i, l_i, acc = online_softmax_step(q, k, v, mask_n[None, :], qk_scale, m_i, l_i, acc, IEEE)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]     # an empty range gives zeros
    mask_out = mask_g[:, None] & mask_d[None, :]
    if not SPLIT:
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        row = (seq * (GROUP * tl.num_programs(1)) + heads) * num_splits + split   # (G_PAD,)
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_out)
        tl.store(part_m_ptr + row, m_i, mask=mask_g)
        tl.store(part_l_ptr + row, l_i, mask=mask_g)


@triton.jit
def _split_k_reduce_kernel(
    part_o_ptr,   # fp32 (num_seqs, num_heads, num_splits, head_dim) normalized partial outputs
    part_m_ptr,   # fp32 (num_seqs, num_heads, num_splits) max score of each split (-inf: empty)
    part_l_ptr,   # fp32 (num_seqs, num_heads, num_splits) softmax denominator of each split (0: empty)
    out_ptr,      # (num_seqs, num_heads, head_dim) output
    num_splits,   # int: splits per sequence
    stride_os, stride_oh,      # out strides
    S_PAD: tl.constexpr,       # num_splits rounded up to a power of two
    HEAD_DIM: tl.constexpr,    # head_dim
    D_PAD: tl.constexpr,       # head_dim rounded up to a power of two
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask_s = offs_s < num_splits
    row = (seq * tl.num_programs(1) + head) * num_splits + offs_s            # (S_PAD,)
    m = tl.load(part_m_ptr + row, mask=mask_s, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=mask_s, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)   # all splits empty: avoid -inf - -inf
    w = tl.where(l > 0, l * tl.exp2(m - m_max), 0.0)      # weight of each split's softmax mass
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)   # (S_PAD, D_PAD)
    w_sum = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(w_sum > 0, w_sum, 1.0)     # (D_PAD,)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# ----------------------------------------------------------------------------- launcher

@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the decode kernel (defaults measured on an H100: KERNEL_NOTES.md)."""

    block_n: int = 64          # tokens per loop iteration: a (64, 128) fp16 K tile is 16 KiB
    num_warps: int = 4         # 4 warps per program
    num_stages: int = 3        # loads kept in flight by Triton's software pipeline
    split_below: float = 2.0   # split-K when (seq, KV head) programs < this many per SM
    target_per_sm: float = 4.0 # ... into as many splits as make this many programs per SM
    min_split_tokens: int = 256  # never split a sequence into ranges shorter than this

    def __post_init__(self):
        for name in ("block_n", "num_warps", "num_stages", "min_split_tokens"):     # frozen: set once, here
            object.__setattr__(self, name, checks.positive_int(name, getattr(self, name)))
        for name in ("split_below", "target_per_sm"):
            object.__setattr__(self, name, checks.in_range(name, getattr(self, name), 0, math.inf,
                                                           "a positive finite number", low_open=True, high_open=True))
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16 (tl.dot's minimum), got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1 or self.min_split_tokens < 1:
            raise ValueError("num_stages and min_split_tokens must be >= 1")
        if not 0 < self.split_below <= self.target_per_sm:
            raise ValueError("need 0 < split_below <= target_per_sm")


DEFAULT_CONFIG = KernelConfig()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    return _num_sms_cuda(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _num_sms_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_tokens: int, sms: int,
                      config: KernelConfig = DEFAULT_CONFIG) -> int:
    """Split-K heuristic: split only when there are fewer than `split_below` (sequence, KV head)
    programs per SM, then into as many ranges as bring it to `target_per_sm` programs per SM,
    but no range shorter than `min_split_tokens` (each split costs a partial write and a merge),
    rounded down to a power of two."""
    num_seqs, max_tokens = checks.integer("num_seqs", num_seqs, 0), checks.integer("max_tokens", max_tokens, 0)
    num_kv_heads, sms = checks.positive_int("num_kv_heads", num_kv_heads), checks.positive_int("sms", sms)
    programs = num_seqs * num_kv_heads
    if programs >= config.split_below * sms:
        return 1
    wanted = math.ceil(config.target_per_sm * sms / max(programs, 1))
    wanted = min(wanted, max_tokens // config.min_split_tokens)
    return 1 << max(0, wanted.bit_length() - 1)      # a power of two; the H100 sweep was flat around
                                                     # the choice (4 and 8 within 0.2% at 16 x 16k; odd
                                                     # counts were not measured)


class _Plan(NamedTuple):
    """Everything about a launch that depends only on shapes, dtype and config (cached)."""
    num_splits: int
    tokens_per_split: int
    constexprs: dict
    reduce_constexprs: dict


@functools.lru_cache(maxsize=1024)
def _plan(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
          max_blocks: int, dtype: torch.dtype, sms: int, num_splits: int | None,
          config: KernelConfig, interpret: bool) -> _Plan:
    max_tokens = max_blocks * block_size                 # an upper bound on every seq_len
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_tokens, sms, config)
    block_n = config.block_n
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_tokens, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(max_tokens, tokens_per_split))    # drop ranges that cover nothing
    group = num_heads // num_kv_heads
    d_pad = max(16, triton.next_power_of_2(head_dim))
    constexprs = dict(
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=num_splits > 1,
        **dot_constexprs(dtype, interpret), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    reduce_constexprs = dict(S_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, D_PAD=d_pad,
                             num_warps=4)
    return _Plan(num_splits, tokens_per_split, constexprs, reduce_constexprs)


def paged_attention_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor, num_splits: int | None = None,
                           config: KernelConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Launch the decode kernel with no checks at all (no host sync: CUDA-graph capturable);
    returns `out`. For callers that built the metadata themselves, such as the engine.

    The caller guarantees what `paged_attention` would otherwise check:
      - q (num_seqs, num_heads, head_dim); k_cache, v_cache (num_blocks, block_size,
        num_kv_heads, head_dim), equal shapes; num_heads a multiple of num_kv_heads;
        head_dim in 1..256; q, k_cache, v_cache one dtype of float16, bfloat16, float32;
      - block_tables int32 (num_seqs, max_blocks), seq_lens int32 (num_seqs,);
      - every seq_lens[s] in 0..max_blocks * block_size, and block_tables[s, j] in
        0..num_blocks - 1 for j < ceil(seq_lens[s] / block_size) (later entries: anything);
      - scale a positive finite float; out (num_seqs, num_heads, head_dim), q's dtype;
      - all tensors on one CUDA device (or the CPU under TRITON_INTERPRET=1), each with
        unit stride in its last dimension.
    Broken, the result is undefined, but the kernel still reads nothing outside the block
    table row or the cache pool (lengths are clamped to the table, bad block ids are masked).
    """
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0:
        return out
    max_blocks = block_tables.shape[1]
    plan = _plan(num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks, q.dtype,
                 num_sms(q.device), num_splits, config, os.environ.get("TRITON_INTERPRET") == "1")
    num_splits = plan.num_splits
    if num_splits > 1:   # one fp32 workspace: partial outputs, then m, then l
        rows = num_seqs * num_heads * num_splits
        work = torch.empty(rows * (head_dim + 2), device=q.device, dtype=torch.float32)
        part_o = work[: rows * head_dim]                 # (S, Hq, splits, D) flattened
        part_m = work[rows * head_dim: rows * (head_dim + 1)]
        part_l = work[rows * (head_dim + 1):]
    else:
        part_o = part_m = part_l = out                   # unused
    _paged_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_m, part_l,
        scale * LOG2E, plan.tokens_per_split, num_splits, max_blocks * block_size, num_blocks,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        **plan.constexprs,
    )
    if num_splits > 1:
        _split_k_reduce_kernel[(num_seqs, num_heads)](
            part_o, part_m, part_l, out, num_splits, out.stride(0), out.stride(1),
            **plan.reduce_constexprs,
        )
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
                    *, out: torch.Tensor | None = None, num_splits: int | None = None,
                    config: KernelConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Decode attention on a paged KV cache with the Triton kernel (same contract as
    `paged_attention_reference`): every argument checked, then `paged_attention_launch`.

    out: where to write the result (num_seqs, num_heads, head_dim), q's dtype and device;
        None allocates it.
    num_splits: split-K ranges per sequence; None chooses by `choose_num_splits`.

    The value checks (lengths within the table, block ids within the cache) read block_tables
    and seq_lens on the host: one device-to-host copy, a sync on a GPU. What all the checks
    cost per call (`python -m kvlab.bench.kernels --check-cost`):
      CPU, interpreter, batch 4, context 64, 4/2 heads, head_dim 32, fp32 (2-core machine):
        30 µs of checks in a 42 ms call (the interpreter's kernel dwarfs them);
      CUDA GPU (an H200, 2026-11-29) at batch 64, context 4096, 32/8 heads, head_dim 128, fp16:
        379 µs per checked call against 251 µs for the launcher alone (the copy to the host and
        the sync cost ~130 µs: half the kernel's own time), so the engine never pays them.
    A hot loop that built its own metadata (the engine) calls `paged_attention_launch`.
    """
    scale = check_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    check_launchable(dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens))
    out = check_out(out, q)                              # (S, Hq, D)
    if num_splits is not None:
        num_splits = checks.positive_int("num_splits", num_splits, "a positive integer or None")
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig, got {type(config).__name__}")
    check_block_tables(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1])   # the one sync
    return paged_attention_launch(q, k_cache, v_cache, block_tables, seq_lens, scale, out, num_splits, config)
