"""Benchmark of the paged-attention decode kernel against its baselines, on a CUDA GPU.

    python -m kvlab.bench.kernels --out data/bench/paged_attention_h100.json
    python -m kvlab.bench.kernels --out /tmp/explore.json --explore   # sweep tile/warps/stages/splits
    python -m kvlab.bench.kernels --check-cost     # what paged_attention's checks cost (GPU, or CPU)

Decode attention reads every cached K/V byte once and does ~2 FLOPs per byte:
it is memory-bound, so the figure of merit is GB/s of K/V read per call,

    kv_bytes = 2 (K and V) * batch * context * num_kv_heads * head_dim * bytes_per_element,

against the ceiling of a large device-to-device copy (bytes read + written). In one
process, on the same inputs, it times (median of `triton.testing.do_bench`, which
flushes the L2 cache before each call):

    triton           the kernel (kvlab.kernels.paged_attention_launch, no checks) on the paged
                     cache (scattered block table)
    gather_sdpa      the torch way on a paged cache: gather K/V through the block table
                     into a contiguous copy, then scaled_dot_product_attention
    sdpa_contiguous  scaled_dot_product_attention on the same K/V laid out contiguously
                     (the no-paging ideal; best of the SDPA back-ends that accept it)
    copy             a 1 GiB device-to-device copy (the bandwidth ceiling)

and checks the kernel against the references first (fresh random inputs, poisoned output).
Results go to JSON with the card's name and the date; KERNEL_NOTES.md beside this file
keeps the history of kernel versions.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from kvlab.bench import results
from kvlab.kernels import paged_attention_reference, store_kv, store_kv_launch, store_kv_reference
from kvlab.kernels.paged_attention import KernelConfig

# the module (kvlab.kernels.paged_attention as an attribute is the function of that name)
pa = importlib.import_module("kvlab.kernels.paged_attention")

# (batch, context) shapes of the issue: fp16, 32 query heads, 8 KV heads, head_dim 128, block 16
SHAPES = [(64, 4096), (16, 16384), (256, 1024), (1, 32768), (8, 2048)]


@dataclass(frozen=True)
class DecodeShape:
    """One decode step's attention problem; every sequence has `context` cached tokens."""

    batch: int
    context: int
    num_heads: int = 32       # Llama-3-8B-like attention: 32 query heads
    num_kv_heads: int = 8     # sharing 8 KV heads (GQA, group of 4)
    head_dim: int = 128
    block_size: int = 16      # vLLM's default block size
    dtype: str = "float16"

    def __post_init__(self):
        if self.batch < 1 or self.context < 1:
            raise ValueError("batch and context must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V a decode step must read: the numerator of GB/s."""
        elem = torch.finfo(self.torch_dtype).bits // 8
        return 2 * self.batch * self.context * self.num_kv_heads * self.head_dim * elem


def make_inputs(shape: DecodeShape, device: str | torch.device = "cuda", seed: int = 0) -> dict:
    """Random q and a paged K/V cache whose blocks are scattered (a random permutation)."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, n, hkv, d, bs = shape.batch, shape.context, shape.num_kv_heads, shape.head_dim, shape.block_size
    blocks_per_seq = math.ceil(n / bs)
    num_blocks = b * blocks_per_seq
    dt = shape.torch_dtype
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g, device=device, dtype=dt)   # paged, layout of kvlab.paged
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g, device=device, dtype=dt)
    perm = torch.randperm(num_blocks, generator=g, device=device)              # scattered blocks
    block_tables = perm.view(b, blocks_per_seq).to(torch.int32)                # (B, blocks_per_seq)
    seq_lens = torch.full((b,), n, dtype=torch.int32, device=device)
    q = torch.randn(b, shape.num_heads, d, generator=g, device=device, dtype=dt)   # (B, Hq, D)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens)


def random_problem(seq_lens, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                   dtype=torch.float32, device="cpu", seed=0, spare_blocks=3) -> dict:
    """A small decode problem with sequences of different lengths: random q and cache, each
    sequence's blocks drawn from a random permutation of the pool (scattered), unused table
    entries -1. Keyword arguments of paged_attention / paged_attention_reference."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(math.ceil(n / block_size) for n in seq_lens))
    num_blocks = len(seq_lens) * max_blocks + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)          # the layout of kvlab.paged
    k_cache = torch.randn(shape, generator=g).to(device, dtype)
    v_cache = torch.randn(shape, generator=g).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    for i, n in enumerate(seq_lens):
        for j in range(math.ceil(n / block_size)):
            block_tables[i, j] = perm.pop()
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=g).to(device, dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables.to(device),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device))


def gather_kv(k_cache, v_cache, block_tables, context):
    """Gather through the block table: copies of K and V, (B, context, Hkv, D) in memory,
    returned as (B, Hkv, context, D) views."""
    idx = block_tables.long()
    k = k_cache[idx].flatten(1, 2)[:, :context]          # (B, blocks * block_size, Hkv, D) -> (B, N, Hkv, D)
    v = v_cache[idx].flatten(1, 2)[:, :context]
    return k.transpose(1, 2), v.transpose(1, 2)          # (B, Hkv, N, D) views, as SDPA takes them


def sdpa_decode(q, k, v):
    """q (B, Hq, D); k, v (B, Hkv, N, D) -> (B, Hq, D), GQA inside SDPA."""
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def gather_sdpa(q, k_cache, v_cache, block_tables, seq_lens, context):
    """The torch baseline on a paged cache (all sequences `context` long)."""
    k, v = gather_kv(k_cache, v_cache, block_tables, context)
    return sdpa_decode(q, k, v)


def _rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


# --------------------------------------------------------------------------- correctness

TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}   # relative (norm) error


def correctness_cases() -> list[tuple]:
    """(dtype, group, head_dim, block_size, seq_lens, num_splits) cases for the GPU check: every
    compiled variant costs a second or two, so fewer than the CPU tests (which cover the grid)."""
    cases = []
    for group, head_dim, bs in ((1, 64, 16), (1, 128, 16), (4, 64, 16), (4, 128, 16), (8, 64, 16),
                                (8, 128, 16), (3, 64, 32)):
        for splits in (None, 5):
            cases.append(("float16", group, head_dim, bs, [1, bs - 1, bs, bs + 1, 3000], splits))
    for dtype in ("bfloat16", "float32"):
        for splits in (None, 5):
            cases.append((dtype, 4, 128, 16, [1, 15, 16, 17, 3000], splits))
    return cases


def check_correctness(device="cuda", seed=0, cases=None) -> list[dict]:
    """Kernel vs reference on fresh random inputs for each case; output poisoned with NaN."""
    rows = []
    torch.manual_seed(seed)
    for dtype, group, head_dim, bs, lens, splits in cases or correctness_cases():
        dt = getattr(torch, dtype)
        hkv = 2
        max_blocks = math.ceil(max(lens) / bs)
        num_blocks = len(lens) * max_blocks + 7
        k_cache = torch.randn(num_blocks, bs, hkv, head_dim, device=device, dtype=dt)
        v_cache = torch.randn_like(k_cache)
        block_tables = torch.stack([torch.randperm(num_blocks, device=device)[:max_blocks]
                                    for _ in lens]).int()
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        q = torch.randn(len(lens), hkv * group, head_dim, device=device, dtype=dt)
        out = torch.full_like(q, float("nan"))
        pa.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, out=out, num_splits=splits)
        ref = paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens)
        err = _rel_err(out, ref)
        ok = bool(torch.isfinite(out).all()) and err <= TOLERANCE[dtype]
        rows.append(dict(dtype=dtype, group=group, head_dim=head_dim, block_size=bs, splits=splits,
                         rel_err=err, ok=ok))
    # store_kv: exact
    for dtype in ("float16", "bfloat16", "float32"):
        dt = getattr(torch, dtype)
        k_cache = torch.randn(64, 16, 8, 128, device=device, dtype=dt)
        v_cache = torch.randn_like(k_cache)
        key, value = torch.randn(2, 300, 8, 128, device=device, dtype=dt)
        slots = torch.randperm(64 * 16, device=device)[:300]
        slots[::7] = -1
        k2, v2 = k_cache.clone(), v_cache.clone()
        store_kv(key, value, k_cache, v_cache, slots)
        store_kv_reference(key, value, k2, v2, slots)
        rows.append(dict(dtype=dtype, kernel="store_kv", ok=bool(torch.equal(k_cache, k2) and torch.equal(v_cache, v2))))
    return rows


# --------------------------------------------------------------------------- timing

def _bench(fn, warmup=25, rep=100) -> float:
    """Eager: median ms of `do_bench` (L2 flushed before each call; CPU launch overhead shows
    when it exceeds the GPU time of a call, as it does for a ~20 µs decode step)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _bench_graph(fns, reps=30) -> float:
    """GPU time only: the calls `fns` (one per input set, so that a set is out of L2 by the time
    it is read again) captured back to back in a CUDA graph; median ms per call over replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2] / len(fns)


def _cpu_us(fn, n=200) -> float:
    """Host time to issue one call (launch overhead), GPU work not waited for."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t
    torch.cuda.synchronize()
    return t / n * 1e6


def _measure(fns, gb) -> dict:
    eager = _bench(fns[0])
    graph = _bench_graph(fns)
    return dict(ms=eager, gbps=gb / eager * 1e3, graph_ms=graph, graph_gbps=gb / graph * 1e3,
                cpu_us=_cpu_us(fns[0]))


def time_copy(nbytes=2**30) -> dict:
    x = torch.empty(nbytes // 2, device="cuda", dtype=torch.float16).normal_()
    y = torch.empty_like(x)
    r = _measure([lambda: y.copy_(x)], 2 * nbytes / 1e9)
    return dict(bytes=2 * nbytes, **r)


_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def time_shape(shape: DecodeShape, variants: list[tuple[str, KernelConfig, int | None]] | None = None,
               baselines: bool = True) -> dict:
    """Time kernel variants (label, config, num_splits; None: the launcher's choice) and the
    baselines on one shape, eager and in a CUDA graph, over input sets rotated so that L2
    never holds what a call reads; check each kernel output against contiguous SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n_sets = min(8, max(2, math.ceil(2**29 / shape.kv_bytes)))
    sets = [make_inputs(shape, seed=i) for i in range(n_sets)]
    gb = shape.kv_bytes / 1e9
    res: dict = dict(shape=asdict(shape), kv_bytes=shape.kv_bytes, input_sets=n_sets, kernel=[], baselines={})
    contiguous = [tuple(t.contiguous() for t in gather_kv(x["k_cache"], x["v_cache"], x["block_tables"],
                                                         shape.context)) for x in sets]   # (B, Hkv, N, D)
    ref = sdpa_decode(sets[0]["q"], *contiguous[0])
    if baselines:
        best = None
        for name in _BACKENDS:
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    fns = [lambda x=x, kv=kv: sdpa_decode(x["q"], *kv) for x, kv in zip(sets, contiguous)]
                    r = _measure(fns, gb)
            except Exception as e:  # back-end refuses this problem
                res["baselines"][f"sdpa_contiguous[{name}]"] = dict(error=str(e).splitlines()[0][:200])
                continue
            res["baselines"][f"sdpa_contiguous[{name}]"] = r
            if best is None or r["graph_ms"] < best[1]["graph_ms"]:
                best = (name, r)
        res["baselines"]["sdpa_contiguous"] = dict(best[1], backend=best[0])
        del contiguous
        torch.cuda.empty_cache()
        with sdpa_kernel(getattr(SDPBackend, best[0])):
            fns = [lambda x=x: gather_sdpa(x["q"], x["k_cache"], x["v_cache"], x["block_tables"],
                                           x["seq_lens"], shape.context) for x in sets]
            res["baselines"]["gather_sdpa"] = dict(_measure(fns, gb), backend=best[0])
    else:
        del contiguous
    torch.cuda.empty_cache()
    for label, config, splits in variants or [("default", pa.DEFAULT_CONFIG, None)]:
        x = sets[0]
        call_args = (x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"])
        row = dict(label=label, config=asdict(config), num_splits=splits)
        out = torch.full_like(x["q"], float("nan"))
        try:
            pa.paged_attention(*call_args, out=out, num_splits=splits, config=config)
            torch.cuda.synchronize()
        except Exception as e:  # e.g. out of shared memory for a large tile
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            res["kernel"].append(row)
            continue
        row["rel_err_vs_sdpa"] = _rel_err(out, ref)
        row["all_written"] = bool(torch.isfinite(out).all())
        again = [pa.paged_attention(*call_args, num_splits=splits, config=config) for _ in range(5)]
        row["deterministic"] = all(torch.equal(a, out) for a in again)   # a moving result is a race
        row["num_splits_used"] = splits if splits is not None else pa.choose_num_splits(
            shape.batch, shape.num_kv_heads, x["block_tables"].shape[1] * shape.block_size,
            pa.num_sms(x["q"].device), config)
        # timed: the kernel as the engine launches it (no checks: their device-to-host copy could
        # not be captured in a CUDA graph; --check-cost measures them)
        scale = shape.head_dim ** -0.5
        fns = [lambda x=x: pa.paged_attention_launch(x["q"], x["k_cache"], x["v_cache"], x["block_tables"],
                                                     x["seq_lens"], scale, torch.empty_like(x["q"]), splits, config)
               for x in sets]
        row.update(_measure(fns, gb))
        res["kernel"].append(row)
    del sets
    torch.cuda.empty_cache()
    return res


def explore_variants(shape: DecodeShape) -> list[tuple[str, KernelConfig, int | None]]:
    """Sweep: the launcher's choice, 4 pipeline stages, then every sensible split count."""
    d = pa.DEFAULT_CONFIG
    out = [("default", d, None), ("stages4", replace(d, num_stages=4), None)]
    programs = shape.batch * shape.num_kv_heads
    for s in (1, 2, 4, 8, 16, 32, 64, 128):
        if programs * s <= 2048 and shape.context // s >= 128 and programs < 512:
            out.append((f"splits{s}", d, s))
    return out


def run_checks(x: dict) -> None:
    """Only the checks `paged_attention` runs before it launches (inputs as from make_inputs)."""
    args = (x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"])
    pa.check_paged_attention(*args)
    pa.check_launchable(dict(zip(("q", "k_cache", "v_cache", "block_tables", "seq_lens"), args)))
    pa.check_block_tables(x["block_tables"], x["seq_lens"], *x["k_cache"].shape[:2])


def host_overhead(shape=DecodeShape(8, 2048), n=300) -> dict:
    """Where the host time of one eager call goes (µs per call), and a cProfile of full calls."""
    import cProfile
    import io
    import pstats

    x = make_inputs(shape)
    args = (x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"])
    scale = shape.head_dim ** -0.5
    res = dict(shape=asdict(shape))

    def launch(splits=None):   # what the engine issues: allocate out, launch (the checks: "check" below)
        return pa.paged_attention_launch(*args, scale, torch.empty_like(x["q"]), splits)

    for _ in range(3):                                   # compile first
        launch()
        launch(1)
    torch.cuda.synchronize()
    res["full_call"] = _cpu_us(launch, n)
    res["full_call_no_split"] = _cpu_us(lambda: launch(1), n)
    res["check"] = _cpu_us(lambda: run_checks(x), n)     # includes a device-to-host copy (waits for the GPU)
    res["choose_num_splits"] = _cpu_us(lambda: pa.choose_num_splits(8, 8, 2048, pa.num_sms(x["q"].device)), n)
    res["empty_like"] = _cpu_us(lambda: torch.empty_like(x["q"]), n)
    k, v = gather_kv(x["k_cache"], x["v_cache"], x["block_tables"], shape.context)
    k, v = k.contiguous(), v.contiguous()
    sdpa_decode(x["q"], k, v)
    res["sdpa"] = _cpu_us(lambda: sdpa_decode(x["q"], k, v), n)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        launch()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    res["profile"] = buf.getvalue()
    return res


# the check-cost shapes: the GPU's is the (batch 64, context 4096, default heads); the
# CPU's is small, since Triton's interpreter runs every program of the kernel in Python
CHECK_COST_SHAPES = {"cuda": DecodeShape(64, 4096),
                     "cpu": DecodeShape(4, 64, num_heads=4, num_kv_heads=2, head_dim=32, dtype="float32")}


def check_cost(device: str | None = None, shape: DecodeShape | None = None, n: int | None = None) -> dict:
    """What `paged_attention`'s checks cost: µs per call of the checked function and of the
    unchecked `paged_attention_launch`, called n times back to back on the same inputs (wall
    clock, the device synchronized before and after, so a GPU's sync per checked call counts),
    and of the checks alone. Best of 5 repetitions."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = shape or CHECK_COST_SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    n = n or (100 if device.startswith("cuda") else 3)
    x = make_inputs(shape, device)
    args = (x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"])
    out = torch.empty_like(x["q"])
    scale = shape.head_dim ** -0.5
    calls = {"checked": lambda: pa.paged_attention(*args, scale, out=out),
             "launch": lambda: pa.paged_attention_launch(*args, scale, out),
             "checks_only": lambda: run_checks(x)}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    res = dict(device=torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu (Triton interpreter)",
               shape=asdict(shape), calls_per_repeat=n)
    for name, fn in calls.items():
        fn()                                              # compile, warm up
        best = math.inf
        for _ in range(5):
            sync()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            best = min(best, (time.perf_counter() - t) / n)
        res[f"{name}_us"] = best * 1e6
    res["overhead_us"] = res["checked_us"] - res["launch_us"]
    return res


def time_store_kv(num_tokens=256, shape=DecodeShape(64, 4096)) -> dict:
    """store_kv for one decode step of `num_tokens` sequences into a big cache (bytes: read + write)."""
    inp = make_inputs(shape)
    dt = shape.torch_dtype
    key = torch.randn(num_tokens, shape.num_kv_heads, shape.head_dim, device="cuda", dtype=dt)
    value = torch.randn_like(key)
    slots = torch.randperm(inp["k_cache"].shape[0] * shape.block_size, device="cuda")[:num_tokens]
    ms = _bench(lambda: store_kv_launch(key, value, inp["k_cache"], inp["v_cache"], slots))   # the kernel, unchecked
    nbytes = 2 * 2 * key.numel() * key.element_size()
    return dict(num_tokens=num_tokens, ms=ms, gbps=nbytes / ms / 1e6)


# --------------------------------------------------------------------------- reading results

RESULTS = "paged_attention_h100.json"       # the committed H100 run: kvlab.bench.results.load(RESULTS)
LABELS = {"triton": "Triton paged kernel", "gather_sdpa": "gather + SDPA (torch on a paged cache)",
          "sdpa_contiguous": "SDPA on a contiguous cache (no paging)"}


def bandwidth_rows(result: dict, key: str = "graph_gbps") -> list[dict]:
    """Per shape: GB/s of the kernel (launcher's default), gather + SDPA, contiguous SDPA."""
    rows = []
    for r in result["shapes"]:
        k = next(k for k in r["kernel"] if k["label"] == "default")
        rows.append(dict(batch=r["shape"]["batch"], context=r["shape"]["context"], splits=k["num_splits_used"],
                         kv_mb=r["kv_bytes"] / 1e6, triton=k[key], gather_sdpa=r["baselines"]["gather_sdpa"][key],
                         sdpa_contiguous=r["baselines"]["sdpa_contiguous"][key]))
    return rows


def plot_bandwidth(result: dict, key: str = "graph_gbps", ax=None):
    """Grouped bars: GB/s of K/V read per call, per shape and implementation; the copy ceiling dashed."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = bandwidth_rows(result, key)
    ax = ax or plt.subplots(figsize=(9, 4))[1]
    x = np.arange(len(rows))
    for i, name in enumerate(("triton", "gather_sdpa", "sdpa_contiguous")):
        ax.bar(x + (i - 1) * 0.27, [r[name] for r in rows], 0.27, label=LABELS[name])
    ax.axhline(result["copy"]["gbps"], ls="--", c="k", lw=1, label=f"1 GiB copy ({result['copy']['gbps']:.0f} GB/s)")
    ax.set_xticks(x, [f"batch {r['batch']}\nctx {r['context']}" for r in rows])
    ax.set_ylabel("GB/s of K/V read")
    mode = "GPU time (CUDA graph)" if key == "graph_gbps" else "eager (do_bench, host launch included)"
    ax.set_title(f"{result['card']}, {result['date'][:10]}: decode attention, {mode}", fontsize=10)
    ax.set_ylim(0, 1.3 * result["copy"]["gbps"])
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    return ax


def plot_split_sweep(result: dict, ax=None):
    """GB/s (GPU time) against the number of split-K ranges, for the shapes that were swept."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 4))[1]
    for r in result["shapes"]:
        pts = sorted((k["num_splits"], k["graph_gbps"]) for k in r["kernel"]
                     if k["label"].startswith("splits") and "graph_gbps" in k)
        if len(pts) < 3:
            continue
        default = next(k for k in r["kernel"] if k["label"] == "default")
        line, = ax.plot(*zip(*pts), marker="o", label=f"batch {r['shape']['batch']}, ctx {r['shape']['context']}")
        ax.plot(default["num_splits_used"], default["graph_gbps"], marker="*", ms=16, c=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("splits per sequence (num_splits)")
    ax.set_ylabel("GB/s of K/V read (GPU time)")
    ax.set_title(f"split-K on {result['card']} (star: the heuristic's choice)", fontsize=10)
    ax.legend(fontsize=8)
    return ax


def summarize(result: dict, variants: bool = True) -> None:
    """Add kernel/baseline ratios to each shape (for the "default" kernel row) and print tables."""
    copy = result["copy"]
    for mode, key in (("eager (do_bench, L2 flushed)", "gbps"), ("CUDA graph (GPU time)", "graph_gbps")):
        print(f"\n{mode}: GB/s of K/V read per call; copy {copy['gbps']:.0f} GB/s (eager)")
        print(f"{'batch':>5} {'ctx':>6} {'splits':>6} {'triton':>7} {'gather':>7} {'sdpa':>7}"
              f"  {'tr/sdpa':>7} {'tr/gath':>7} {'tr/copy':>7}")
        for r in result["shapes"]:
            k = next(k for k in r["kernel"] if k["label"] == "default")
            sd, ga = r["baselines"]["sdpa_contiguous"][key], r["baselines"]["gather_sdpa"][key]
            ratios = dict(vs_sdpa=k[key] / sd, vs_gather=k[key] / ga, vs_copy=k[key] / copy["gbps"])
            r.setdefault("ratios", {})[key] = ratios
            print(f"{r['shape']['batch']:>5} {r['shape']['context']:>6} {k['num_splits_used']:>6} {k[key]:>7.0f}"
                  f" {ga:>7.0f} {sd:>7.0f}  {ratios['vs_sdpa']:>7.2f} {ratios['vs_gather']:>7.2f}"
                  f" {ratios['vs_copy']:>7.2f}")
    if variants and result.get("explore"):
        print("\nvariants: label splits eager graph cpu_us err deterministic")
        for r in result["shapes"]:
            print(f"({r['shape']['batch']}, {r['shape']['context']}) sdpa {r['baselines']['sdpa_contiguous']['graph_gbps']:.0f}"
                  f" [{r['baselines']['sdpa_contiguous']['backend']}, cpu {r['baselines']['sdpa_contiguous']['cpu_us']:.0f} us]")
            for k in r["kernel"]:
                if "error" in k:
                    print(f"   {k['label']:>16} ERROR {k['error'][:80]}")
                    continue
                print(f"   {k['label']:>16} {k['num_splits_used']:>4} {k['gbps']:>6.0f} {k['graph_gbps']:>6.0f}"
                      f" {k['cpu_us']:>5.0f} {k['rel_err_vs_sdpa']:.1e} {k['deterministic']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON file to write (required, except with --check-cost)")
    ap.add_argument("--explore", action="store_true", help="sweep kernel configs and split counts")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness grid")
    ap.add_argument("--check-cost", action="store_true",
                    help="only measure what paged_attention's checks cost per call, checked vs "
                         "paged_attention_launch (a CUDA GPU, or the CPU's interpreter at a small shape)")
    args = ap.parse_args(argv)
    if args.check_cost:
        res = check_cost()
        print(f"{res['device']}, shape {res['shape']}: checked {res['checked_us']:.1f} µs, "
              f"launch {res['launch_us']:.1f} µs, checks alone {res['checks_only_us']:.1f} µs per call")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return res
    if not args.out:
        ap.error("--out is required (except with --check-cost)")
    if not torch.cuda.is_available():
        raise SystemExit("kvlab.bench.kernels needs a CUDA GPU (the notebook plots the committed JSON instead)")
    import triton
    from tqdm.auto import tqdm

    props = torch.cuda.get_device_properties(0)
    result = dict(
        card=torch.cuda.get_device_name(0), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        sm_count=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, python=platform.python_version(),
        default_config=asdict(pa.DEFAULT_CONFIG), explore=args.explore,
        commit=os.environ.get("KVLAB_COMMIT") or results.git_commit(),
        method=("GB/s = K/V bytes read per call / time. 'gbps': eager, median of triton.testing.do_bench "
                "(L2 flushed before each call; host launch overhead shows where it exceeds GPU time). "
                "'graph_gbps': GPU time, calls captured in a CUDA graph over rotated input sets. "
                "'cpu_us': host time to issue one call. Ratios use the eager 1 GiB copy as the ceiling."),
        goals=dict(vs_sdpa=0.90, vs_gather=3.0, vs_copy_at_1x32768=0.70),
    )
    if not args.no_check:
        checks = check_correctness()
        result["checks"] = checks
        bad = [c for c in checks if not c["ok"]]
        print(f"correctness: {len(checks) - len(bad)}/{len(checks)} cases pass"
              + (f"; worst failures: {bad[:5]}" if bad else ""))
    result["host_overhead"] = host_overhead()
    print({k: round(v, 1) for k, v in result["host_overhead"].items() if isinstance(v, float)})
    print(result["host_overhead"]["profile"][-3500:])
    result["copy"] = time_copy()
    print(f"copy: {result['copy']['gbps']:.0f} GB/s")
    result["store_kv"] = time_store_kv()
    result["shapes"] = []
    for b, n in tqdm(SHAPES, desc="shapes"):
        shape = DecodeShape(b, n)
        r = time_shape(shape, explore_variants(shape) if args.explore else None)
        result["shapes"].append(r)
        with open(args.out, "w") as f:       # keep what is done if a later shape fails
            json.dump(result, f, indent=1)
    summarize(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
