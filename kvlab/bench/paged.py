"""Benchmark of the paged KV cache on this machine: `python -m kvlab.bench.paged`.

Two measurements, each beside its baseline in the same process:

1. Allocator throughput: 256 sequences get prompts, then rounds of appends across all
   of them, forks (half of which copy-on-write at their first append) and frees;
   operations per second for each verb. The baseline is one dict update per operation
   (the cost of Python bookkeeping at its cheapest).
2. One decode step of the real model at batch 8: kvlab's engine on the paged cache against
   kvlab's model on the contiguous cache (the baseline). The engine's step is split into
   the attention calls (K/V write + attention, summed over layers), the scheduler, building
   the step's inputs, and handling its outputs. It runs twice, with each decode attention:
   "torch" (gather through the block table, then SDPA) and "triton" (the kernel, through
   Triton's interpreter on a CPU): which one the engine uses on a CPU is decided by this.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections import Counter

import torch

from kvlab.paged import BlockAllocator


# ----------------------------------------------------------------------------- allocator

def bench_allocator(num_seqs: int = 256, block_size: int = 16, rounds: int = 64, seed: int = 0) -> dict:
    """Ops/s of allocate_sequence, append_token, fork, free_sequence on a realistic mix."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(32000) for _ in range(rng.randint(16, 256))] for _ in range(num_seqs)]
    need = sum(-(-(len(p) + 2 * rounds) // block_size) for p in prompts) * 2
    alloc = BlockAllocator(need, block_size)
    times: Counter = Counter()
    counts: Counter = Counter()

    def timed(name, fn, *args):
        t = time.perf_counter()
        fn(*args)
        times[name] += time.perf_counter() - t
        counts[name] += 1

    for i, p in enumerate(prompts):
        timed("allocate", alloc.allocate_sequence, i, p)
    live = list(range(num_seqs))
    t0 = time.perf_counter()
    for r in range(rounds):                                     # appends across all sequences
        for s in live:
            alloc.append_token(s, r)
    times["append"] += time.perf_counter() - t0
    counts["append"] += rounds * len(live)
    children = [(s, num_seqs + s) for s in live[::2]]          # fork half of them
    for parent, child in children:
        timed("fork", alloc.fork, parent, child)
    live += [c for _, c in children]
    t0 = time.perf_counter()
    for r in range(rounds):                                     # appends, copy-on-write included
        for s in live:
            alloc.append_token(s, r)
    times["append"] += time.perf_counter() - t0
    counts["append"] += rounds * len(live)
    copies = len(alloc.pop_copies())
    for s in live:
        timed("free", alloc.free_sequence, s)
    assert alloc.num_free_blocks == alloc.num_blocks

    d: dict = {}                                                # baseline: one dict update per op
    t0 = time.perf_counter()
    n_base = sum(counts.values())
    for i in range(n_base):
        d[i & 1023] = i
    base = n_base / (time.perf_counter() - t0)
    ops = {k: counts[k] / times[k] for k in counts}
    total = sum(counts.values()) / sum(times.values())
    return dict(num_seqs=num_seqs, block_size=block_size, counts=dict(counts), copies=copies,
                ops_per_s=ops, total_ops_per_s=total, dict_update_ops_per_s=base)


# ----------------------------------------------------------------------------- decode step

class TimedAttention:
    """Wraps an attention function and adds up the seconds spent in it; `metadata` (the engine's
    per-step attention metadata) passes through to the wrapped function."""

    def __init__(self, inner):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "seconds", 0.0)

    def __call__(self, *args):
        t = time.perf_counter()
        out = self.inner(*args)
        object.__setattr__(self, "seconds", self.seconds + time.perf_counter() - t)
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name == "seconds":
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)


def _engine_decode_steps(lm, backend: str, ids: torch.Tensor, block_size: int, steps: int, order_seed: int):
    """Median seconds of the engine's decode step (and its attention calls, scheduling, input
    building, output handling) with `batch` sequences of `context` cached tokens."""
    from kvlab import LLM, SamplingParams

    batch, context = ids.shape
    llm = LLM(model=lm, attention_backend=backend, block_size=block_size, max_num_seqs=batch,
              max_num_batched_tokens=max(batch * context, batch), num_kv_blocks=batch * -(-(context + steps + 4)
                                                                                           // block_size) + 8,
              block_order_seed=order_seed, enable_prefix_caching=False, fused_kernels=False)
    engine = llm.engine
    for i in range(batch):
        engine.add_request(str(i), ids[i].tolist(), SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True))
    engine.step()                                                      # the prefill of every prompt
    timed = TimedAttention(engine.runner.attn)
    engine.runner.attn = timed
    rows = {k: [] for k in ("step", "attention", "schedule", "prepare", "forward", "output")}
    for step in range(steps + 1):                                       # 1 warm-up step
        timed.seconds = 0.0
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        st = engine.stats[-1]
        if step:
            for k, v in zip(rows, (dt, timed.seconds, st.schedule_time, st.prepare_time, st.forward_time,
                                   st.output_time)):
                rows[k].append(v)
    engine.abort_request([str(i) for i in range(batch)])
    return {k: statistics.median(v) for k, v in rows.items()}


def bench_decode(model_name: str = "smollm2-135m", batch: int = 8, context: int = 256, block_size: int = 16,
                 steps: int = 12, triton_steps: int = 2, seed: int = 0) -> dict:
    """Median decode-step time at `batch`: kvlab's model on the contiguous cache (the baseline), and
    the engine's step on the paged cache with each decode attention: "torch" (gather through the
    block table, then SDPA) and "triton" (the kernel; on a CPU, Triton's interpreter)."""
    import kvlab
    from kvlab.cache import ContiguousKVCache

    lm = kvlab.load_model(model_name)
    model = kvlab.Transformer.from_hf(lm.hf_model)
    torch.manual_seed(seed)
    ids = torch.randint(3, lm.spec.vocab_size, (batch, context))
    contiguous = ContiguousKVCache.for_spec(model.spec, batch, context + steps + 4, model.embed_tokens.dtype)
    timed_c = TimedAttention(contiguous)
    model(ids, attn=contiguous)                                          # prefill
    tok = torch.randint(3, lm.spec.vocab_size, (batch, 1))
    rows = {"step": [], "attention": []}
    for step in range(steps + 1):
        timed_c.seconds = 0.0
        t = time.perf_counter()
        model(tok, positions=torch.full((batch, 1), context + step), attn=timed_c)
        if step:
            rows["step"].append(time.perf_counter() - t)
            rows["attention"].append(timed_c.seconds)
    med = {"contiguous": {k: statistics.median(v) for k, v in rows.items()}}
    med["engine_torch"] = _engine_decode_steps(lm, "torch", ids, block_size, steps, seed)
    med["engine_triton"] = _engine_decode_steps(lm, "triton", ids, block_size, triton_steps, seed)
    c, e = med["contiguous"], med["engine_torch"]
    return dict(model=model_name, batch=batch, context=context, block_size=block_size, steps=steps,
                median_s=med, ratio_engine_over_contiguous=e["step"] / c["step"],
                attn_ratio=e["attention"] / c["attention"],
                triton_over_torch=med["engine_triton"]["step"] / e["step"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256, help="prompt tokens per sequence before decoding")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed (after 2 warm-up steps)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: on a small shared CPU two threads thrash "
                         "when other processes run; 0 keeps torch's default)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    bench_allocator(block_size=args.block_size)                 # warm-up: the first pass pays one-time costs
    a = bench_allocator(block_size=args.block_size)
    print(f"allocator: {a['num_seqs']} sequences, block size {a['block_size']}, {a['copies']} copy-on-write copies")
    for k, v in a["ops_per_s"].items():
        print(f"  {k:9s} {a['counts'][k]:7d} ops  {v:12,.0f} ops/s")
    print(f"  all       {sum(a['counts'].values()):7d} ops  {a['total_ops_per_s']:12,.0f} ops/s  "
          f"(baseline: a dict update {a['dict_update_ops_per_s']:,.0f}/s, "
          f"ratio {a['total_ops_per_s'] / a['dict_update_ops_per_s']:.3f})")

    d = bench_decode(args.model, args.batch, args.context, args.block_size, args.steps)
    m = d["median_s"]
    ms = lambda x: f"{x * 1e3:8.1f} ms"
    print(f"\ndecode step, {d['model']}, batch {d['batch']}, context {d['context']}, block size "
          f"{d['block_size']}, {torch.get_num_threads()} threads, medians:")
    print(f"  contiguous cache (kvlab's model)  {ms(m['contiguous']['step'])}  (attention {ms(m['contiguous']['attention'])})")
    for name in ("engine_torch", "engine_triton"):
        e = m[name]
        print(f"  {name:<32}  {ms(e['step'])}  (attention {ms(e['attention'])}; scheduler {e['schedule'] * 1e3:.2f} ms, "
              f"inputs {e['prepare'] * 1e3:.2f} ms, outputs {e['output'] * 1e3:.2f} ms)")
    print(f"  engine (torch decode attention) / contiguous: step {d['ratio_engine_over_contiguous']:.2f}x, "
          f"attention {d['attn_ratio']:.2f}x")
    print(f"  triton (interpreted) / torch decode attention: {d['triton_over_torch']:.1f}x the step time: the "
          f"engine's CPU default is {'torch' if d['triton_over_torch'] > 1 else 'triton'}")
    if args.json:
        meta = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, allocator=a, decode=d), f, indent=1)


if __name__ == "__main__":
    main()
