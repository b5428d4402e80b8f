"""The paged prefill kernel (kvlab.kernels.prefill_attention) against its torch reference, and the
reference against plain causal attention on contiguous keys: chunks after a context (earlier
chunks, prefix-cache hits), GQA, block sizes, scattered blocks, rows of very different lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvlab.kernels.prefill_attention import prefill_attention, prefill_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # the CPU runs the kernel interpreted
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def make_case(rows, num_heads=6, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32, seed=0):
    """rows: [(context, q_len)]. Fills a scattered cache with every row's keys (context + chunk),
    returns the kernel's arguments and, per row, its contiguous keys and values."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // block_size) for c, n in rows]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=g)
    max_blocks = max(need)
    tables = torch.full((len(rows), max_blocks), -1, dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    used = 0
    for r, n_blocks in enumerate(need):
        tables[r, :n_blocks] = order[used:used + n_blocks].int()
        used += n_blocks
    q = torch.randn(sum(n for _, n in rows), num_heads, head_dim, generator=g)
    starts = torch.tensor([0] + torch.tensor([n for _, n in rows]).cumsum(0).tolist(), dtype=torch.int32)
    context = torch.tensor([c for c, _ in rows], dtype=torch.int32)
    to = lambda t: t.to(DEVICE, dtype if t.is_floating_point() else t.dtype)
    return to(q), to(k_cache), to(v_cache), to(tables), to(starts), to(context)


CASES = {
    "one prompt, no context": [(0, 37)],
    "chunks after a context": [(16, 20), (5, 1), (0, 70), (33, 64)],
    "a long row beside short ones": [(0, 130), (7, 3), (100, 2)],
}


@pytest.mark.parametrize("rows", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("block_size", [1, 16])
def test_reference_equals_causal_attention_on_contiguous_keys(rows, block_size):
    """The reference, row by row, equals SDPA over the row's keys with the lower-right causal mask."""
    q, k_cache, v_cache, tables, starts, context = make_case(rows, block_size=block_size)
    out = prefill_attention_reference(q, k_cache, v_cache, tables, starts, context)
    for r, (c, n) in enumerate(rows):
        pos = torch.arange(c + n, device=q.device)
        blocks = tables[r, pos // block_size].long()
        k, v = k_cache[blocks, pos % block_size], v_cache[blocks, pos % block_size]       # (S, Hkv, D)
        qr = q[int(starts[r]):int(starts[r + 1])]
        mask = torch.ones(n, c + n, dtype=torch.bool, device=q.device).tril(c)         # query j sees keys <= c + j
        ref = F.scaled_dot_product_attention(qr.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[int(starts[r]):int(starts[r + 1])], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", CASES.values(), ids=CASES.keys())
def test_kernel_equals_reference(rows, dtype):
    args = make_case(rows, dtype=dtype)
    torch.testing.assert_close(prefill_attention(*args), prefill_attention_reference(*args), **TOL[dtype])


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size",
                         [(9, 3, 64, 16), (4, 4, 16, 8), (8, 1, 48, 32)], ids=["smollm2 shape", "MHA", "MQA, head 48"])
def test_kernel_equals_reference_across_shapes(num_heads, num_kv_heads, head_dim, block_size):
    args = make_case([(40, 66), (0, 5), (130, 17)], num_heads, num_kv_heads, head_dim, block_size, seed=1)
    torch.testing.assert_close(prefill_attention(*args), prefill_attention_reference(*args), **TOL[torch.float32])


def test_the_kernel_reads_only_what_each_query_may_see():
    """Keys after a query's position, and blocks of other rows, do not change its output: poisoning
    them with huge values leaves the result equal."""
    q, k_cache, v_cache, tables, starts, context = make_case([(10, 30), (0, 20)])
    out = prefill_attention(q, k_cache, v_cache, tables, starts, context)
    # row 0's query 0 sees keys 0..10; poison keys 11.. of row 0 and check its first query is unchanged
    k2, v2 = k_cache.clone(), v_cache.clone()
    for pos in range(11, 40):
        b, o = int(tables[0, pos // 16]), pos % 16
        k2[b, o], v2[b, o] = 1e4, 1e4
    out2 = prefill_attention(q, k2, v2, tables, starts, context)
    torch.testing.assert_close(out2[0], out[0], **TOL[torch.float32])
    assert not torch.allclose(out2[29], out[29])                   # the last query does see them
    torch.testing.assert_close(out2[30:], out[30:], **TOL[torch.float32])   # row 1 never reads row 0's blocks


@pytest.mark.parametrize("change, match", [
    (dict(starts=torch.tensor([0, 5], dtype=torch.int32)), "query_start must rise from 0 to num_tokens"),
    (dict(context=torch.tensor([-1], dtype=torch.int32)), "context_lens must be >= 0"),
    (dict(context=torch.tensor([400], dtype=torch.int32)), "every length must lie in"),
    (dict(starts=torch.tensor([0, 37], dtype=torch.int64)), "must be int32"),
    (dict(scale=-1.0), "scale"),
])
def test_bad_arguments_say_what_is_allowed(change, match):
    q, k_cache, v_cache, tables, starts, context = make_case([(0, 37)])
    starts = change.get("starts", starts).to(q.device)
    context = change.get("context", context).to(q.device)
    with pytest.raises((ValueError, TypeError), match=match):
        prefill_attention(q, k_cache, v_cache, tables, starts, context, change.get("scale"))


def _bad_prefill_inputs():
    """(error, message, what to change): the decode kernel's checks and messages (shared), then the
    prefill kernel's own (query_start, context_lens)."""
    q, k_cache, v_cache, tables, starts, context = make_case([(16, 20), (0, 5)])
    other = lambda t: dict(q=q, k_cache=k_cache, v_cache=v_cache, tables=tables, starts=starts, context=context) | t
    bad_table = tables.clone()
    bad_table[1, 0] = 99                        # row 1 (5 keys) reads entry 0: a block the cache does not have
    return [
        (TypeError, "query_start must be a torch.Tensor, got list", other(dict(starts=starts.tolist()))),
        (ValueError, r"q must have 3 dimensions \(num_tokens, num_heads, head_dim\)", other(dict(q=q[0]))),
        (ValueError, "q, k_cache, v_cache must share a dtype", other(dict(q=q.half()))),
        (ValueError, "q dtype must be one of float16, bfloat16, float32, got torch.float64",
         other(dict(q=q.double(), k_cache=k_cache.double(), v_cache=v_cache.double()))),
        (ValueError, r"num_heads \(5\) must be a positive multiple of num_kv_heads \(2\)", other(dict(q=q[:, :5]))),
        (ValueError, "q head_dim 16 != cache head_dim 32", other(dict(q=q[..., :16]))),
        (ValueError, "block_tables, query_start and context_lens must be int32", other(dict(context=context.long()))),
        (ValueError, r"context_lens \(2,\); got \(3,\), \(1,\)", other(dict(context=context[:1]))),
        (ValueError, r"block_tables\[1, 0\] = 99: .* cache \(0\.\.", other(dict(tables=bad_table))),
        (ValueError, r"query_start must rise from 0 to num_tokens \(25\)",
         other(dict(starts=torch.tensor([0, 30, 25], dtype=torch.int32, device=q.device)))),
        (ValueError, r"context_lens\[1\] = -3: context_lens must be >= 0",
         other(dict(context=torch.tensor([16, -3], dtype=torch.int32, device=q.device)))),
        (ValueError, "scale must be a positive finite number or None, got nan", other(dict(scale=float("nan")))),
    ]


@pytest.mark.parametrize("error, match, args", _bad_prefill_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_kernel_and_reference_check_like_the_decode_kernel_and_write_nothing(error, match, args):
    """The prefill kernel's argument checks are the decode kernel's (one shared function, one
    wording), its reference checks the same contract, and a rejected call leaves `out` untouched."""
    scale = args.pop("scale", None)
    call = (args["q"], args["k_cache"], args["v_cache"], args["tables"], args["starts"], args["context"], scale)
    out = torch.full((25, 6, 32), float("nan"), device=DEVICE)
    with pytest.raises(error, match=match):
        prefill_attention(*call, out=out)
    assert torch.isnan(out).all()
    if "float64" not in match:                  # float64 is a torch-only luxury: the reference takes it
        with pytest.raises(error, match=match):
            prefill_attention_reference(*call)


def test_reference_takes_float64_and_out_is_checked_like_decode():
    q, k_cache, v_cache, tables, starts, context = make_case([(16, 20), (0, 5)])
    args64 = (q.double(), k_cache.double(), v_cache.double(), tables, starts, context)
    torch.testing.assert_close(prefill_attention_reference(*args64).float(),
                               prefill_attention_reference(q, k_cache, v_cache, tables, starts, context))
    with pytest.raises(ValueError, match="out must be a tensor of q's shape"):
        prefill_attention(q, k_cache, v_cache, tables, starts, context, out=torch.empty(25, 6, 16, device=DEVICE))
    out = torch.empty_like(q)
    assert prefill_attention(q, k_cache, v_cache, tables, starts, context, out=out) is out
