"""Notebook 06's teaching kernels: the Triton primer's toy kernels against torch, and the tiled
FlashAttention reference against plain attention (torch's SDPA and the T x T way)."""

import pytest
import torch
import torch.nn.functional as F

from kvlab.kernels import triton_primer
from kvlab.kernels.flash_reference import (DIAGONAL, FULL, SKIPPED, flash_attention_reference, naive_attention,
                                           tile_map)

# ---- the Triton primer ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, block", [(1, 16), (100, 32), (256, 64), (1000, 128)])
def test_add_equals_torch_with_a_partial_last_tile(n, block):
    x, y = torch.randn(n), torch.randn(n)
    assert torch.equal(triton_primer.add(x, y, block=block), x + y)


@pytest.mark.parametrize("width, block_rows", [(5, 4), (32, 2), (33, 8)])
def test_gather_rows_equals_indexing(width, block_rows):
    src = torch.randn(20, width)
    index = torch.tensor([7, 0, 19, 7, 3, 12, 1], dtype=torch.int32)     # repeats and any order, like a block table
    assert torch.equal(triton_primer.gather_rows(src, index, block_rows=block_rows), src[index.long()])
    wide = torch.randn(20, 2 * width)[:, :width]                        # a row stride larger than the width
    assert torch.equal(triton_primer.gather_rows(wide, index, block_rows), wide[index.long()])


@pytest.mark.parametrize("call, error, message", [
    (lambda: triton_primer.add(torch.randn(4), torch.randn(5)), ValueError, "one shape and dtype"),
    (lambda: triton_primer.add([1.0], torch.randn(1)), TypeError, "x and y must be torch tensors"),
    (lambda: triton_primer.add(torch.randn(4), torch.randn(4), block=48), ValueError, "block must be a power of two"),
    (lambda: triton_primer.gather_rows(torch.randn(4, 3), torch.tensor([4], dtype=torch.int32)), ValueError,
     "index entries must lie in 0..3"),
    (lambda: triton_primer.gather_rows(torch.randn(4, 3), torch.tensor([1])), ValueError, "1-D int32"),
    (lambda: triton_primer.gather_rows(torch.randn(4, 3), torch.tensor([1], dtype=torch.int32), 3), ValueError,
     "block_rows must be a power of two"),
])
def test_primer_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---- FlashAttention, tile by tile ----------------------------------------------------------------

def qkv(t_q, t_k, heads=3, d=16, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, t_q, d, generator=g, dtype=dtype),
            torch.randn(batch, heads, t_k, d, generator=g, dtype=dtype) * 3,   # peaky scores: the max matters
            torch.randn(batch, heads, t_k, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("t, block_m, block_n", [(64, 16, 16), (100, 32, 16), (100, 16, 64), (7, 64, 64), (1, 4, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_tiled_equals_sdpa_and_naive(t, block_m, block_n, causal):
    q, k, v = qkv(t, t)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)          # torch's own, independent
    flash = flash_attention_reference(q, k, v, causal=causal, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(flash.double(), ref, rtol=1e-5, atol=1e-5)   # computed in fp32 inside
    torch.testing.assert_close(naive_attention(q, k, v, causal=causal).double(), ref, rtol=1e-5, atol=1e-5)


def test_tiled_equals_naive_when_a_prompt_chunk_follows_cached_keys():
    """40 new queries after 60 cached keys (chunked prefill): query i is position 60 + i."""
    q, k, v = qkv(40, 100, dtype=torch.float32)
    full_q = torch.cat([torch.zeros(2, 3, 60, 16), q], dim=2)                  # the same queries at the end
    ref = F.scaled_dot_product_attention(full_q, k, v, is_causal=True)[:, :, 60:]
    torch.testing.assert_close(flash_attention_reference(q, k, v, block_m=16, block_n=32), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(naive_attention(q, k, v), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t_q, t_k, bm, bn", [(64, 64, 16, 16), (100, 100, 32, 16), (40, 100, 16, 32), (5, 5, 8, 8)])
def test_tile_map_by_brute_force(t_q, t_k, bm, bn):
    codes = tile_map(t_q, t_k, bm, bn)
    visible = torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)         # (T_q, T_k): who sees whom
    for i in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            tile = visible[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            expected = SKIPPED if not tile.any() else FULL if tile.all() else DIAGONAL
            assert codes[i, j] == expected, (i, j)
    assert (tile_map(t_q, t_k, bm, bn, causal=False) == FULL).all()


def test_stats_count_the_skipped_half():
    """T = 8 tiles of 16: 28 tiles above the diagonal skipped, 8 on it masked, 28 below computed in full."""
    q, k, v = qkv(128, 128, heads=1, batch=1)
    _, stats = flash_attention_reference(q, k, v, block_m=16, block_n=16, return_stats=True)
    assert (stats.tiles_skipped, stats.tiles_masked, stats.tiles_computed) == (28, 8, 36)
    assert stats.scores_computed == 36 * 16 * 16 and stats.scores_naive == 128 * 128
    assert stats.largest_score_tile == 256


@pytest.mark.parametrize("call, error, message", [
    (lambda q, k, v: flash_attention_reference(q[0], k, v), ValueError, "q must be a floating"),
    (lambda q, k, v: flash_attention_reference(q, k[:, :2], v), ValueError, "must agree"),
    (lambda q, k, v: flash_attention_reference(q, k, v, block_m=0), ValueError, "block_m must be a positive integer"),
    (lambda q, k, v: flash_attention_reference(q, k, v, block_n=True), ValueError, "block_n must be"),
    (lambda q, k, v: flash_attention_reference(q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: flash_attention_reference(k, q, q), ValueError, "at least as many keys as queries"),
    (lambda q, k, v: naive_attention(q, k.long(), v), ValueError, "k must be a floating"),
])
def test_flash_bad_input(call, error, message):
    q, k, v = qkv(8, 16)
    with pytest.raises(error, match=message):
        call(q, k, v)
