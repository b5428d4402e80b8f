"""The engine's attention over a flattened batch, against dense causal attention on contiguous
tensors: decode rows and prefill chunks (one after a cached prefix) in one step, blocks scattered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvlab.engine.attention import AttentionMetadata, EngineAttention, GatheredLayout
from kvlab.model.attention import sdpa
from kvlab.paged import BlockAllocator, PagedKVCache

HQ, HKV, D, BS = 4, 2, 8, 4


def step_inputs(dtype=torch.float64, seed=0):
    """Five sequences: three decode (one new token after 7, 12 and 1 cached), a prompt chunk of 6
    after 5 cached tokens (an earlier chunk or a prefix-cache hit), a fresh prompt of 9."""
    g = torch.Generator().manual_seed(seed)
    cached, new = [7, 12, 1, 5, 0], [1, 1, 1, 6, 9]
    total = [c + n for c, n in zip(cached, new)]
    cache = PagedKVCache(1, 32, BS, HKV, D, dtype=dtype)
    alloc = BlockAllocator(32, BS, free_order=torch.randperm(32, generator=g).tolist())
    tables = np.zeros((5, 8), dtype=np.int32)
    q = [torch.randn(t, HQ, D, generator=g, dtype=dtype) for t in total]
    k = [torch.randn(t, HKV, D, generator=g, dtype=dtype) for t in total]
    v = [torch.randn(t, HKV, D, generator=g, dtype=dtype) for t in total]
    for i, t in enumerate(total):
        table = alloc.allocate_sequence(i, list(range(t)))
        tables[i, :len(table)] = table
        if cached[i]:                                      # written by earlier steps
            slots = torch.tensor([alloc.slot(i, p) for p in range(cached[i])])
            cache.write(0, slots, k[i][:cached[i]], v[i][:cached[i]])
    flat = lambda xs: torch.cat([x[c:] for x, c in zip(xs, cached)])
    slots = torch.tensor([alloc.slot(i, p) for i in range(5) for p in range(cached[i], total[i])])
    return cache, tables, np.array(cached), np.array(new), q, k, v, flat(q), flat(k), flat(v), slots


def dense_reference(q, k, v, cached):
    """Each sequence alone, contiguous, causal: its new queries' outputs, flattened in batch order."""
    return torch.cat([sdpa(qi[None], ki[None], vi[None], is_causal=True)[0][c:] for qi, ki, vi, c in
                      zip(q, k, v, cached)])


def metadata(backend, cache, tables, cached, new, slots, device="cpu"):
    nd = int((new == 1).sum())
    starts = np.cumsum(new) - new
    md = AttentionMetadata(slots, nd)
    if backend == "triton":
        md.decode_block_tables = torch.from_numpy(tables[:nd].copy())
        md.decode_seq_lens = torch.from_numpy((cached + new)[:nd].astype(np.int32))
        md.prefill_block_tables = torch.from_numpy(tables[nd:].copy())
        md.prefill_query_start = torch.from_numpy(np.concatenate([[0], np.cumsum(new[nd:])]).astype(np.int32))
        md.prefill_context_lens = torch.from_numpy(cached[nd:].astype(np.int32))
        md.prefill_max_query_len = int(new[nd:].max())
    else:
        md.decode_layout = GatheredLayout.build(starts[:nd], new[:nd], cached[:nd], tables[:nd], BS, device)
        md.prefill_layout = GatheredLayout.build(starts[nd:] - starts[nd], new[nd:], cached[nd:], tables[nd:], BS,
                                                 device)
    return md


def test_gathered_attention_equals_dense_causal_attention():
    cache, tables, cached, new, q, k, v, qf, kf, vf, slots = step_inputs()
    attn = EngineAttention(cache, "torch")
    attn.metadata = metadata("torch", cache, tables, cached, new, slots)
    out = attn(0, qf, kf, vf, None)
    torch.testing.assert_close(out, dense_reference(q, k, v, cached))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through Triton's interpreter; tests/test_gpu.py "
                    "runs the engine's kernel path on a GPU")
def test_triton_kernels_equal_dense_causal_attention():
    """fp32 (the interpreter's dot is exact enough): decode rows through the decode kernel, prefill
    rows (one after 5 cached tokens) through the prefill kernel, against dense causal attention."""
    cache, tables, cached, new, q, k, v, qf, kf, vf, slots = step_inputs(torch.float32, seed=1)
    triton = EngineAttention(cache, "triton")
    triton.metadata = metadata("triton", cache, tables, cached, new, slots)
    out = triton(0, qf, kf, vf, None)
    torch.testing.assert_close(out, dense_reference(q, k, v, cached), atol=1e-5, rtol=1e-5)


def test_gathered_layout_pads_and_masks_as_documented():
    """Two rows: 3 queries after 2 cached keys, 1 query after 4. Padded to (2, 3, 5)."""
    tables = np.array([[5, 9], [2, 7]], dtype=np.int32)
    lay = GatheredLayout.build(np.array([0, 3]), np.array([3, 1]), np.array([2, 4]), tables, 4, "cpu")
    assert lay.q_index.tolist() == [[0, 1, 2], [3, 3, 3]]                     # padding repeats the last query
    assert lay.kv_slots[0].tolist() == [20, 21, 22, 23, 36]                     # block 5, then block 9
    assert lay.mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert lay.mask[1, 0, 0].int().tolist() == [1, 1, 1, 1, 1]
    assert lay.out_index.tolist() == [0, 1, 2, 3]


def test_engine_attention_rejects_a_bad_backend():
    with pytest.raises(ValueError, match="'triton' or 'torch'"):
        EngineAttention(PagedKVCache(1, 2, 2, 1, 2), "flash")
