"""Prefill attention on a paged KV cache: chunks of many queries, a torch reference, then a Triton kernel.

Decode is one query per sequence (kvlab.kernels.paged_attention). An engine step also
carries prompt *chunks*: row r brings q_len[r] new tokens whose keys and values are
already stored in the cache (the engine writes them first), after context[r] tokens
computed in earlier steps or found in the prefix cache. Query j of the chunk sits at
position context[r] + j and sees keys 0 .. context[r] + j: causal, aligned to the end of
the row's keys ("lower right"), read through the row's block table.

Layout (the contract with the engine):

    q:            (num_tokens, num_heads, head_dim)      the chunks' queries, one after another
    k_cache:      (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache:      (num_blocks, block_size, num_kv_heads, head_dim)
    block_tables: int32 (num_rows, max_blocks)
    query_start:  int32 (num_rows + 1,)                   row r's queries are q[query_start[r]:query_start[r + 1]]
    context_lens: int32 (num_rows,)                       keys before the chunk
    out:          (num_tokens, num_heads, head_dim)

Without this kernel the engine gathers each row's keys into a padded (rows, T, S) copy and
runs SDPA with a dense causal mask (kvlab.engine.attention.gathered_attention): the mask
alone is rows x T x S booleans built on the host, and the padding makes every row as long
as the longest. The kernel reads the keys in place, only up to each query tile's causal
limit, with no mask in memory: FlashAttention's tiling (kvlab.kernels.flash_reference)
over a block table. vLLM's "prefix prefill" kernel (context_attention_fwd) does the same
job; its newer unified kernel also folds decode rows into one launch.
"""

from __future__ import annotations

import math
import os

import torch

from kvlab import checks
from kvlab.kernels.paged_attention import LOG2E, check_block_tables, check_launchable

import triton  # noqa: E402,I001  (kvlab.kernels has set TRITON_INTERPRET=1 first where there is no GPU)
import triton.language as tl  # noqa: E402

BLOCK_M = 64          # queries per program
BLOCK_N = 64          # keys per loop iteration


# ----------------------------------------------------------------------------- reference

def prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                                scale: float | None = None) -> torch.Tensor:
    """Row by row: gather the row's keys and values through its block table, build the lower-right
    causal mask, softmax in fp32. Slow and plain: what the kernel must equal."""
    check_prefill_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale)
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    starts = query_start.tolist()
    for r, context in enumerate(context_lens.tolist()):
        a, b = starts[r], starts[r + 1]
        n_keys = context + b - a
        pos = torch.arange(n_keys, device=q.device)
        blocks = block_tables[r, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float()                   # (S, Hkv, D)
        v = v_cache[blocks, pos % block_size].float()
        group = num_heads // num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)   # (S, Hq, D)
        scores = torch.einsum("thd,shd->hts", q[a:b].float(), k) * scale               # (Hq, T, S)
        visible = pos[None, :] <= context + torch.arange(b - a, device=q.device)[:, None]   # (T, S)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[a:b] = torch.einsum("hts,shd->thd", scores.softmax(-1), v).to(q.dtype)
    return out


def check_prefill_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale=None) -> None:
    """Every argument, with what is allowed; values too (one device-to-host copy)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("query_start", query_start), ("context_lens", context_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be (num_tokens, num_heads, head_dim) and k_cache, v_cache equal (num_blocks, "
                         f"block_size, num_kv_heads, head_dim); got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q's head_dim ({q.shape[2]}) must equal the cache's ({k_cache.shape[3]}) and its "
                         f"num_heads ({q.shape[1]}) be a multiple of num_kv_heads ({k_cache.shape[2]})")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (torch.float16, torch.bfloat16,
                                                                          torch.float32):
        raise TypeError(f"q, k_cache, v_cache must share one dtype of float16, bfloat16, float32; got "
                        f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    num_rows = block_tables.shape[0] if block_tables.dim() == 2 else -1
    if query_start.dtype != torch.int32 or context_lens.dtype != torch.int32 or block_tables.dtype != torch.int32:
        raise TypeError("block_tables, query_start and context_lens must be int32")
    if query_start.shape != (num_rows + 1,) or context_lens.shape != (num_rows,):
        raise ValueError(f"for block_tables of {num_rows} rows, query_start must be ({num_rows + 1},) and "
                         f"context_lens ({num_rows},); got {tuple(query_start.shape)}, {tuple(context_lens.shape)}")
    starts = query_start.tolist()
    if starts[0] != 0 or starts[-1] != q.shape[0] or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"query_start must rise from 0 to num_tokens ({q.shape[0]}); got {starts}")
    if (context_lens < 0).any():
        raise ValueError(f"context_lens must be >= 0; got {context_lens.tolist()}")
    seq_lens = context_lens + (query_start[1:] - query_start[:-1])
    check_block_tables(block_tables, seq_lens.to(torch.int32), k_cache.shape[0], k_cache.shape[1])
    if scale is not None:
        checks.in_range("scale", scale, 0, math.inf, "a positive finite number or None", low_open=True,
                        high_open=True)


# ----------------------------------------------------------------------------- the kernel
# One program: BLOCK_M queries of one row, one query head. It walks the row's keys BLOCK_N at a
# time up to the causal limit of its last query, online softmax as in the decode kernel.

@triton.jit
def _prefill_attention_kernel(
    q_ptr,             # (num_tokens, num_heads, head_dim)
    k_cache_ptr,       # (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    v_cache_ptr,
    block_tables_ptr,  # int32 (num_rows, max_blocks)
    query_start_ptr,   # int32 (num_rows + 1,)
    context_lens_ptr,  # int32 (num_rows,)
    out_ptr,           # (num_tokens, num_heads, head_dim)
    qk_scale,          # scale * log2(e)
    max_tokens,        # max_blocks * BLOCK_SIZE: what a table row covers
    num_blocks,        # blocks in the pool
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bts,
    stride_ot, stride_oh,
    GROUP: tl.constexpr,       # query heads per KV head
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,       # head_dim rounded up to a power of two >= 16
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,      # fp32 before tl.dot (the CPU interpreter needs it for bf16)
    IEEE: tl.constexpr,        # fp32 inputs: exact fp32 dot instead of tf32
):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + row)
    q_len = tl.load(query_start_ptr + row + 1) - q_start
    if tile * BLOCK_M < q_len:                               # rows shorter than the longest: nothing to do
        context = tl.load(context_lens_ptr + row)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)      # query index within the chunk
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        mask_m = offs_m < q_len
        mask_d = offs_d < HEAD_DIM
        kv_head = head // GROUP
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)            # (BLOCK_M, D_PAD)
        if UPCAST:
            q = q.to(tl.float32)
        query_pos = context + offs_m                         # (BLOCK_M,) positions in the sequence

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        end = tl.minimum(context + tl.minimum((tile + 1) * BLOCK_M, q_len), max_tokens)   # the tile's causal limit
        bt_row = block_tables_ptr + row * stride_bts
        for n0 in range(0, end, BLOCK_N):
            tok = n0 + offs_n
            mask_n = tok < end
            block = tl.load(bt_row + tok // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
            slot = tok % BLOCK_SIZE
            in_pool = (block >= 0) & (block < num_blocks)    # by contract always; never read outside the pool
            mask_kv = (mask_n & in_pool)[:, None] & mask_d[None, :]
            k = tl.load(k_cache_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks
                        + kv_head * stride_kh + offs_d[None, :], mask=mask_kv, other=0.0)   # (BLOCK_N, D_PAD)
            v = tl.load(v_cache_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs
                        + kv_head * stride_vh + offs_d[None, :], mask=mask_kv, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            visible = mask_n[None, :] & (tok[None, :] <= query_pos[:, None])          # causal, lower right
            s = tl.where(visible, s * qk_scale, float("-inf"))                         # (BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))       # finite: key 0 is in the first tile
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def prefill_attention_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                             max_query_len: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Launch the kernel with no checks and no host sync; returns `out`. The caller (the engine)
    guarantees what `prefill_attention` checks, and passes max_query_len, the longest chunk
    (it sizes the grid: the host knows it, the device would need a sync to tell)."""
    num_rows = context_lens.shape[0]
    if num_rows == 0 or q.shape[0] == 0:
        return out
    num_heads, head_dim = q.shape[1:]
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (num_rows, triton.cdiv(max_query_len, BLOCK_M), num_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start, context_lens, out,
        scale * LOG2E, block_tables.shape[1] * block_size, num_blocks,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        UPCAST=interpret or q.dtype == torch.float32, IEEE=q.dtype == torch.float32,
        num_warps=4,
    )
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start: torch.Tensor, context_lens: torch.Tensor, scale: float | None = None,
                      *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill attention with the Triton kernel, every argument checked (see the module docstring)."""
    check_prefill_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be like q, {tuple(q.shape)} {q.dtype} on {q.device}, unit stride in its last "
                         f"dimension; got {tuple(out.shape)} {out.dtype} on {out.device}")
    check_launchable(dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, query_start=query_start,
                          context_lens=context_lens, out=out))
    max_query_len = int((query_start[1:] - query_start[:-1]).max()) if context_lens.numel() else 0
    scale = q.shape[2] ** -0.5 if scale is None else scale
    return prefill_attention_launch(q, k_cache, v_cache, block_tables.contiguous(), query_start, context_lens,
                                    max_query_len, scale, out)
