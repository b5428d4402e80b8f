"""Benchmark of the paged KV cache on this machine: `python -m kvlab.bench.paged`.

Two measurements, each beside its baseline in the same process:

1. Allocator throughput: 256 sequences get prompts, then rounds of appends across all
   of them, forks (half of which copy-on-write at their first append) and frees;
   operations per second for each verb. The baseline is one dict update per operation
   (the cost of Python bookkeeping at its cheapest).
2. One decode step of the real model at batch 8: the paged cache with the torch
   reference decode attention against kvlab's contiguous cache, alternating the two so
   that both see the same machine load. The step is split into the attention calls
   (K/V write + attention, summed over layers), the runner's bookkeeping (block tables,
   slot mapping, PagedBatch) and the rest of the model (matmuls, norms, RoPE). A third
   line runs the paged step with `gather_decode_attention` (gather, then SDPA) instead of
   the reference.
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

from kvlab.kernels import paged_attention_reference
from kvlab.paged import BlockAllocator, forward_step, gather_decode_attention, make_paged, prefill


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
    """Wraps an attention function and adds up the seconds spent in it."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __call__(self, *args):
        t = time.perf_counter()
        out = self.inner(*args)
        self.seconds += time.perf_counter() - t
        return out

    # PagedAttention's interface, passed through
    def set_batch(self, batch):
        self.inner.set_batch(batch)
        return self

    @property
    def cache(self):
        return self.inner.cache


def bench_decode(model_name: str = "smollm2-135m", batch: int = 8, context: int = 256, block_size: int = 16,
                 steps: int = 12, seed: int = 0) -> dict:
    """Median decode-step time, paged (torch reference) vs contiguous cache, at `batch`."""
    import kvlab
    from kvlab.cache import ContiguousKVCache

    lm = kvlab.load_model(model_name)
    model = kvlab.Transformer.from_hf(lm.hf_model)
    torch.manual_seed(seed)
    ids = torch.randint(0, lm.spec.vocab_size, (batch, context))
    max_len = context + steps + 2

    contiguous = ContiguousKVCache.for_spec(model.spec, batch, max_len, model.embed_tokens.dtype)
    timed_c = TimedAttention(contiguous)
    model(ids, attn=contiguous)                                          # prefill

    num_blocks = batch * -(-max_len // block_size) + 8
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    timed_decode = TimedAttention(paged_attention_reference)            # the decode attention alone
    alloc, cache, attn = make_paged(model, num_blocks, block_size, free_order=order, decode_attention=timed_decode)
    timed_p = TimedAttention(attn)
    seqs = list(range(batch))
    for s in seqs:
        alloc.allocate_sequence(s, ids[s].tolist())
    prefill(model, attn, alloc, seqs)

    model_seconds = [0.0]

    def timed_model(ids_, positions=None, attn=None):                # the model call alone
        t = time.perf_counter()
        out = model(ids_, positions=positions, attn=attn)
        model_seconds[0] = time.perf_counter() - t
        return out

    tok = torch.randint(0, lm.spec.vocab_size, (batch, 1))
    # the same paged step with "gather + SDPA" as the decode attention, on its own allocator/cache
    alloc_g, _, attn_g = make_paged(model, num_blocks, block_size, free_order=order,
                                    decode_attention=gather_decode_attention)
    timed_g = TimedAttention(attn_g)
    for s in seqs:
        alloc_g.allocate_sequence(s, ids[s].tolist())
    prefill(model, attn_g, alloc_g, seqs)

    keys = ["contiguous", "contiguous_attn", "paged", "paged_attn", "paged_decode_fn", "paged_allocator",
            "paged_runner", "paged_gather", "paged_gather_attn"]
    rows: dict[str, list[float]] = {k: [] for k in keys}
    for step in range(steps + 2):                                        # 2 warm-up steps
        pos = torch.full((batch, 1), context + step)
        timed_c.seconds = 0.0
        t = time.perf_counter()
        model(tok, positions=pos, attn=timed_c)
        t_c = time.perf_counter() - t

        timed_p.seconds = timed_decode.seconds = 0.0
        t = time.perf_counter()
        for s in seqs:
            alloc.append_token(s, int(tok[s, 0]))
        t_alloc = time.perf_counter() - t
        logits_p = forward_step(timed_model, timed_p, alloc, seqs, [1] * batch)
        t_p = time.perf_counter() - t
        model_p = model_seconds[0]

        timed_g.seconds = 0.0
        t = time.perf_counter()
        for s in seqs:
            alloc_g.append_token(s, int(tok[s, 0]))
        logits_g = forward_step(model, timed_g, alloc_g, seqs, [1] * batch)
        t_g = time.perf_counter() - t
        if step >= 2:
            for k, v in zip(keys, [t_c, timed_c.seconds, t_p, timed_p.seconds, timed_decode.seconds, t_alloc,
                                   t_p - t_alloc - model_p, t_g, timed_g.seconds]):
                rows[k].append(v)
    med = {k: statistics.median(v) for k, v in rows.items()}
    med["model_other"] = med["contiguous"] - med["contiguous_attn"]
    return dict(model=model_name, batch=batch, context=context, block_size=block_size, steps=steps,
                median_s=med, ratio_paged_over_contiguous=med["paged"] / med["contiguous"],
                attn_ratio=med["paged_attn"] / med["contiguous_attn"],
                ratio_gather_over_contiguous=med["paged_gather"] / med["contiguous"],
                same_argmax=bool((logits_p.argmax(-1) == logits_g.argmax(-1)).all()))


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

    a = bench_allocator(block_size=args.block_size)
    print(f"allocator: {a['num_seqs']} sequences, block size {a['block_size']}, {a['copies']} copy-on-write copies")
    for k, v in a["ops_per_s"].items():
        print(f"  {k:9s} {a['counts'][k]:7d} ops  {v:12,.0f} ops/s")
    print(f"  all       {sum(a['counts'].values()):7d} ops  {a['total_ops_per_s']:12,.0f} ops/s  "
          f"(baseline: a dict update {a['dict_update_ops_per_s']:,.0f}/s, "
          f"ratio {a['total_ops_per_s'] / a['dict_update_ops_per_s']:.3f})")

    d = bench_decode(args.model, args.batch, args.context, args.block_size, args.steps)
    m = d["median_s"]
    print(f"\ndecode step, {d['model']}, batch {d['batch']}, context {d['context']}, block size "
          f"{d['block_size']}, {torch.get_num_threads()} threads, median of {d['steps']}:")
    print(f"  contiguous cache   {m['contiguous'] * 1e3:8.1f} ms  (attention {m['contiguous_attn'] * 1e3:6.1f} ms)")
    print(f"  paged (reference)  {m['paged'] * 1e3:8.1f} ms  (attention {m['paged_attn'] * 1e3:6.1f} ms, of which "
          f"paged_attention_reference {m['paged_decode_fn'] * 1e3:.1f} ms and K/V writes "
          f"{(m['paged_attn'] - m['paged_decode_fn']) * 1e3:.1f} ms;")
    print(f"                                 allocator appends {m['paged_allocator'] * 1e3:.2f} ms, "
          f"runner bookkeeping {m['paged_runner'] * 1e3:.2f} ms)")
    print(f"  paged (gather+SDPA){m['paged_gather'] * 1e3:8.1f} ms  (attention {m['paged_gather_attn'] * 1e3:6.1f} ms)")
    print(f"  the rest of the model (matmuls, norms, RoPE): {m['model_other'] * 1e3:.1f} ms")
    print(f"  ratio paged / contiguous: step {d['ratio_paged_over_contiguous']:.2f}x, "
          f"attention {d['attn_ratio']:.2f}x; gather+SDPA step {d['ratio_gather_over_contiguous']:.2f}x")
    if args.json:
        meta = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, allocator=a, decode=d), f, indent=1)


if __name__ == "__main__":
    main()
