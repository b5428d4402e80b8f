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

import os

import torch

from kvlab import checks
from kvlab.kernels.paged_attention import (
    KERNEL_DTYPES, LOG2E, REFERENCE_DTYPES, check_block_tables, check_launchable, check_out, check_paged_tensors,
    check_scale, dot_constexprs, load_kv_tile, online_softmax_step,
)

import triton  # noqa: E402,I001  (kvlab.kernels has set TRITON_INTERPRET=1 first where there is no GPU)
import triton.language as tl  # noqa: E402

BLOCK_M = 64          # queries per program
BLOCK_N = 64          # keys per loop iteration


# ----------------------------------------------------------------------------- reference

def prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                                scale: float | None = None) -> torch.Tensor:
    """Row by row: gather the row's keys and values through its block table, build the lower-right
    causal mask, softmax in fp32. Slow and plain: what the kernel must equal.

    Checks everything the kernel's public function checks (`check_prefill_attention`, then
    `check_prefill_lengths`), except what only Triton needs: float64 is allowed, strides are free.
    """
    scale = check_prefill_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale,
                                    dtypes=REFERENCE_DTYPES)
    check_prefill_lengths(q, k_cache, block_tables, query_start, context_lens)
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1:3]
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


# ----------------------------------------------------------------------------- the contract, checked
# As for the decode kernel (kvlab.kernels.paged_attention): shapes, dtypes and devices first, with
# no device-to-host copy, through the same shared checks; then the values (copies to the host).

def check_prefill_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale=None,
                            dtypes: tuple = KERNEL_DTYPES) -> float:
    """Check the arguments' types, shapes, dtypes and devices (no device-to-host copy) and return
    the softmax scale to use (1 / sqrt(head_dim) when scale is None). Raises TypeError or
    ValueError saying what is wrong and what is allowed."""
    check_paged_tensors(dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                             query_start=query_start, context_lens=context_lens),
                        dict(q=(3, "(num_tokens, num_heads, head_dim)"), block_tables=(2, "(num_rows, max_blocks)"),
                             query_start=(1, "(num_rows + 1,)"), context_lens=(1, "(num_rows,)")), dtypes)
    num_rows = block_tables.shape[0]
    if query_start.shape[0] != num_rows + 1 or context_lens.shape[0] != num_rows:
        raise ValueError(f"for block_tables of {num_rows} rows, query_start must be ({num_rows + 1},) and "
                         f"context_lens ({num_rows},); got {tuple(query_start.shape)}, {tuple(context_lens.shape)}")
    return check_scale(scale, q.shape[2])


def check_prefill_lengths(q, k_cache, block_tables, query_start, context_lens) -> int:
    """Check the values the kernel indexes with and return the longest chunk (max_query_len):
    query_start rises from 0 to num_tokens, every context_lens[r] >= 0, and each row's keys
    (context + chunk) fit its table row and name blocks of the cache (`check_block_tables`).
    Device-to-host copies (syncs on a GPU)."""
    starts = query_start.tolist()
    if starts[0] != 0 or starts[-1] != q.shape[0] or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"query_start must rise from 0 to num_tokens ({q.shape[0]}), row r's queries being "
                         f"q[query_start[r]:query_start[r + 1]]; got {checks.brief(starts)}")
    chunks = query_start[1:] - query_start[:-1]                                      # (R,) queries per row
    if context_lens.numel() and int(context_lens.min()) < 0:
        r = int(torch.nonzero(context_lens < 0)[0, 0])
        raise ValueError(f"context_lens[{r}] = {int(context_lens[r])}: context_lens must be >= 0 "
                         f"(keys cached before the chunk)")
    check_block_tables(block_tables, (context_lens + chunks).to(torch.int32), k_cache.shape[0], k_cache.shape[1])
    return int(chunks.max()) if chunks.numel() else 0


# ----------------------------------------------------------------------------- the kernel
# One program: BLOCK_M queries of one row, one query head. It walks the row's keys BLOCK_N at a
# time up to the causal limit of its last query, with the decode kernel's two steps
# (kvlab.kernels.paged_attention): `load_kv_tile` through the block table, then
# `online_softmax_step` with the causal mask as what each query may see.

@triton.jit
def _prefill_attention_kernel(
    q_ptr,             # (num_tokens, num_heads, head_dim) the chunks' queries
    k_cache_ptr,       # (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim) keys, paged (the chunk's own included)
    v_cache_ptr,       # (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim) values, paged
    block_tables_ptr,  # int32 (num_rows, max_blocks) physical block of each logical block
    query_start_ptr,   # int32 (num_rows + 1,) row r's queries are q[query_start[r]:query_start[r + 1]]
    context_lens_ptr,  # int32 (num_rows,) keys cached before each row's chunk
    out_ptr,           # (num_tokens, num_heads, head_dim) output
    qk_scale,          # float: scale * log2(e), so that exp2 gives exp
    max_tokens,        # int: max_blocks * BLOCK_SIZE, what a block table row covers
    num_blocks,        # int: blocks in the pool
    stride_qt, stride_qh,                 # q strides: token, head (head_dim stride is 1)
    stride_kb, stride_ks, stride_kh,      # k_cache strides: block, slot, head
    stride_vb, stride_vs, stride_vh,      # v_cache strides: block, slot, head
    stride_bts,                           # block_tables row stride
    stride_ot, stride_oh,                 # out strides: token, head
    GROUP: tl.constexpr,       # query heads per KV head
    HEAD_DIM: tl.constexpr,    # head_dim
    D_PAD: tl.constexpr,       # head_dim rounded up to a power of two >= 16
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,     # queries per program
    BLOCK_N: tl.constexpr,     # keys per loop iteration
    UPCAST: tl.constexpr,      # q, K, V in fp32 before tl.dot (dot_constexprs: the CPU interpreter's bf16)
    IEEE: tl.constexpr,        # full-precision fp32 dots, not TF32 (dot_constexprs: fp32 caches)
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

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (log2 units)
        l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of 2^(score - m_i)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)         # running sum of 2^(score - m_i) * v
        end = tl.minimum(context + tl.minimum((tile + 1) * BLOCK_M, q_len), max_tokens)   # the tile's causal limit
        bt_row = block_tables_ptr + row * stride_bts
        for n0 in range(0, end, BLOCK_N):
            tok = n0 + offs_n                                # (BLOCK_N,) logical key positions
            mask_n = tok < end
            k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, bt_row, tok, mask_n, kv_head, offs_d, mask_d, num_blocks,
                                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, UPCAST)
            visible = mask_n[None, :] & (tok[None, :] <= query_pos[:, None])          # causal, lower right
            m_i, l_i, acc = online_softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc, IEEE)
        out = acc / l_i[:, None]                             # l_i > 0: every query sees key 0
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------- launchers

def prefill_attention_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                             max_query_len: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Launch the kernel with no checks at all (no host sync: CUDA-graph capturable); returns
    `out`. For callers that built the metadata themselves, such as the engine.

    The caller guarantees what `prefill_attention` would otherwise check:
      - q (num_tokens, num_heads, head_dim); k_cache, v_cache (num_blocks, block_size,
        num_kv_heads, head_dim), equal shapes; num_heads a multiple of num_kv_heads;
        head_dim in 1..256; q, k_cache, v_cache one dtype of float16, bfloat16, float32;
      - block_tables int32 (num_rows, max_blocks), query_start int32 (num_rows + 1,) rising
        from 0 to num_tokens, context_lens int32 (num_rows,) >= 0;
      - each row's keys, context_lens[r] + its chunk, at most max_blocks * block_size, and the
        table entries they read block ids in 0..num_blocks - 1;
      - max_query_len the longest chunk (it sizes the grid: the host knows it, the device would
        need a sync to tell);
      - scale a positive finite float; out (num_tokens, num_heads, head_dim), q's dtype;
      - all tensors on one CUDA device (or the CPU under TRITON_INTERPRET=1), each with
        unit stride in its last dimension.
    Broken, the result is undefined, but the kernel still reads nothing outside the block
    table row or the cache pool (lengths are clamped to the table, bad block ids are masked).
    """
    num_rows = context_lens.shape[0]
    if num_rows == 0 or q.shape[0] == 0:
        return out
    num_heads, head_dim = q.shape[1:]
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
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
        **dot_constexprs(q.dtype, os.environ.get("TRITON_INTERPRET") == "1"), num_warps=4,
    )
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start: torch.Tensor, context_lens: torch.Tensor, scale: float | None = None,
                      *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill attention with the Triton kernel (same contract as `prefill_attention_reference`):
    every argument checked, then `prefill_attention_launch`.

    out: where to write the result (num_tokens, num_heads, head_dim), q's dtype and device;
        None allocates it.

    The value checks read query_start, context_lens and block_tables on the host (syncs on a
    GPU); a hot loop that built its own metadata (the engine) calls `prefill_attention_launch`.
    """
    scale = check_prefill_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale)
    check_launchable(dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, query_start=query_start,
                          context_lens=context_lens))
    out = check_out(out, q)                              # (T, Hq, D)
    max_query_len = check_prefill_lengths(q, k_cache, block_tables, query_start, context_lens)
    return prefill_attention_launch(q, k_cache, v_cache, block_tables, query_start, context_lens, max_query_len,
                                    scale, out)
