"""The race: kvlab's engine against Hugging Face on the same requests, in one process.

    python -m kvlab.bench.engine --workload B --out data/bench/engine_cpu.json        # this CPU
    python -m kvlab.bench.engine --workload A C --out data/bench/engine_h200.json     # a CUDA GPU

Every system serves the same requests, all submitted at time 0, greedy, ignoring EOS
(each request generates exactly the tokens it asked for; only those are counted):

    hf_one_at_a_time   model.generate on one request after another
    hf_threads         one thread per request, each calling model.generate (a common first "server")
    hf_padded          one left-padded batch, dynamic cache: static batching, every row runs
                       until the longest is done
    hf_static_compile  the same with a static cache, which makes transformers torch.compile the
                       forward pass (GPU only; the first run compiles)
    hf_continuous      transformers' own continuous batching manager (model.init_continuous_batching:
                       a paged cache, one flattened batch per step; see HFContinuous)
    kvlab              kvlab.LLM: continuous batching on the paged cache, Triton decode kernel,
                       CUDA graphs (GPU)

Method, the same for every system and every request count: a system is set up once (kvlab's
engine, HF's continuous-batching manager: KV sizing, CUDA graphs, cache allocation), warms up on
the very requests it is then timed on (same shapes, so no first-time costs fall in the timed
run; one at a time and threads warm up on 2 requests, a full run takes minutes), then runs
`rounds` timed runs; the fastest counts (other work on the machine can only add time) and every
round's wall time is kept. Set-up and warm-up are reported apart. Per system: generated tokens per
second (counted tokens / wall time), TTFT and TPOT percentiles (per request: first token time minus
submission; mean time between its later tokens), and the ratios against every HF baseline.
Workloads (prompts are random token ids on the GPU, where the model has random weights; real
text on the CPU):

    A  GPU  64 requests, prompts uniform in 16..512 tokens, 128 new tokens each, bf16
    C  GPU  256 requests, prompts 16..512, new tokens uniform in 16..512 (mixed: static batching
            waits for its longest request), bf16
    B  CPU  16 requests, prompts 16..256 tokens of real text, 64 new tokens, fp32, the real model

--concurrency N...: kvlab and HF's padded batch on the first N requests of workload A's kind, by
the same method (HF runs with no kvlab engine holding memory beside it). On a GPU,
--decode-analysis measures kvlab's decode step at batch 64 and 256 (context about 500) against
its bandwidth bound, (weight bytes + K/V bytes read) / measured copy bandwidth, and profiles one
eager decode step to say where the rest of the time goes. --hf-continuous-breakdown says where
transformers' continuous batching spends its time (set-up, scheduling and inputs, attention, the
rest of the forward pass) and how much attention work it does against what the requests need.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvlab.bench import results

WORKLOADS = {
    "A": dict(num_requests=64, prompt_range=(16, 512), new_range=(128, 128), device="cuda"),
    "C": dict(num_requests=256, prompt_range=(16, 512), new_range=(16, 512), device="cuda"),
    "B": dict(num_requests=16, prompt_range=(16, 256), new_range=(64, 64), device="cpu"),
}
GPU_SYSTEMS = ["kvlab", "hf_padded", "hf_static_compile", "hf_continuous", "hf_one_at_a_time", "hf_threads"]
CPU_SYSTEMS = ["kvlab", "hf_padded", "hf_continuous", "hf_one_at_a_time", "hf_threads"]


@dataclass
class Run:
    system: str
    tokens: int                              # generated tokens the requests asked for
    wall: float                              # seconds, all requests: the fastest timed round
    warmup: float                            # seconds of set-up and the warm-up run, not measured
    ttft: list[float] = field(repr=False)    # per request, seconds from submission (fastest round)
    tpot: list[float] = field(repr=False)    # per request, seconds per token after the first
    num_requests: int = 0
    note: str = ""
    walls: list[float] = field(default_factory=list)    # every timed round, in order

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall

    def summary(self) -> dict:
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
        return dict(system=self.system, num_requests=self.num_requests, tokens=self.tokens,
                    wall_s=self.wall, tokens_per_s=self.tokens_per_s, warmup_s=self.warmup,
                    rounds_wall_s=self.walls or [self.wall],
                    ttft_s={f"p{q}": pct(self.ttft, q) for q in (50, 90, 99)},
                    tpot_s={f"p{q}": pct(self.tpot, q) for q in (50, 90, 99)}, note=self.note)


# ---------------------------------------------------------------------------- requests

def benchmark_text() -> str:
    """Real English text for CPU prompts: kvlab's own module docstrings (deterministic, offline)."""
    import importlib
    import pkgutil

    import kvlab

    docs = []
    for mod in sorted(m.name for m in pkgutil.walk_packages(kvlab.__path__, "kvlab.")):
        if mod.startswith(("kvlab.ui", "kvlab.bench", "kvlab.serve", "kvlab.cli", "kvlab.__main__")):
            continue
        try:
            doc = importlib.import_module(mod).__doc__
        except Exception:                          # noqa: BLE001  (an optional dependency missing)
            continue
        if doc:
            docs.append(" ".join(doc.split()))
    return " ".join(docs)


def make_requests(workload: str, vocab_size: int, tokenizer=None, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, new tokens) per request, seeded."""
    w = WORKLOADS[workload]
    rng = np.random.default_rng(seed)
    lo, hi = w["prompt_range"]
    lengths = rng.integers(lo, hi + 1, w["num_requests"])
    news = rng.integers(w["new_range"][0], w["new_range"][1] + 1, w["num_requests"])
    if tokenizer is not None:                      # windows of real text
        ids = tokenizer.encode(benchmark_text())
        starts = rng.integers(0, len(ids) - hi, w["num_requests"])
        prompts = [ids[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
    else:                                          # random token ids (random weights: text means nothing)
        prompts = [rng.integers(3, vocab_size, n).tolist() for n in lengths]
    return list(zip(prompts, news.tolist()))


def smollm2_random(device: str, dtype: torch.dtype):
    """kvlab.load_model("smollm2-135m-random"): SmolLM2-135M's architecture with seeded random weights
    (the GPU machine has no offline copy of the real ones). Its EOS is unset here: random weights
    would stop at a random EOS, and every system in this benchmark generates exactly what it asked."""
    from kvlab.model.loading import load_model

    lm = load_model("smollm2-135m-random", device=device, dtype=dtype)
    lm.hf_model.config.eos_token_id = None
    lm.hf_model.generation_config.eos_token_id = None
    lm.hf_model.generation_config.pad_token_id = 0
    return lm


# ---------------------------------------------------------------------------- HF systems

class _Timestamps:
    """A transformers streamer that records when each generation step's tokens arrive (batched)."""

    def __init__(self):
        self.times: list[float] = []
        self._first = True

    def put(self, value):
        if self._first:                            # generate() first puts the prompt
            self._first = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _per_request(start: float, step_times: list[float], asked: int) -> tuple[float, float]:
    """TTFT and TPOT of a request that took the first `asked` steps of a generation."""
    ttft = step_times[0] - start
    tpot = (step_times[asked - 1] - step_times[0]) / (asked - 1) if asked > 1 else 0.0
    return ttft, tpot


def hf_generate_one(lm, prompt: list[int], new: int):
    ids = torch.tensor([prompt], device=lm.device)
    stamps = _Timestamps()
    lm.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, streamer=stamps)
    return stamps.times


def hf_one_at_a_time(lm, requests) -> tuple[list, list]:
    start = time.perf_counter()
    ttft, tpot = [], []
    for prompt, new in requests:
        t, p = _per_request(start, hf_generate_one(lm, prompt, new), new)
        ttft.append(t)
        tpot.append(p)
    return ttft, tpot


def hf_threads(lm, requests) -> tuple[list, list]:
    """One thread per request, all calling generate on the shared model at once."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        times = list(pool.map(lambda r: hf_generate_one(lm, *r), requests))
    results = [_per_request(start, t, new) for t, (_, new) in zip(times, requests)]
    return [r[0] for r in results], [r[1] for r in results]


def hf_padded(lm, requests, static: bool = False) -> tuple[list, list]:
    """One left-padded batch: every row generates until the longest request is done."""
    longest = max(len(p) for p, _ in requests)
    most = max(n for _, n in requests)
    ids = torch.zeros(len(requests), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(requests):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    stamps = _Timestamps()
    kwargs = dict(cache_implementation="static") if static else {}
    start = time.perf_counter()
    lm.hf_model.generate(ids.to(lm.device), attention_mask=mask.to(lm.device), max_new_tokens=most,
                         min_new_tokens=most, do_sample=False, pad_token_id=0, streamer=stamps, **kwargs)
    results = [_per_request(start, stamps.times, new) for _, new in requests]
    return [r[0] for r in results], [r[1] for r in results]


def hf_static_batches(lm, requests, batch_size: int) -> tuple[list, list]:
    """Static batching with at most `batch_size` rows: padded batches one after another, each
    waiting for the previous one to finish; times count from the start of the first."""
    start, ttft, tpot = time.perf_counter(), [], []
    for i in range(0, len(requests), batch_size):
        offset = time.perf_counter() - start
        t, p = hf_padded(lm, requests[i:i + batch_size])
        ttft += [x + offset for x in t]
        tpot += p
    return ttft, tpot


class HFContinuous:
    """transformers' continuous batching manager (`model.init_continuous_batching`), started once.

    What it does: a background thread runs a loop like kvlab's engine. Each step its FIFO scheduler
    picks requests under a token budget (`max_batch_tokens`; a long prompt is split across steps),
    flattens their new tokens into one row (`input_ids` of shape (1, total tokens)), writes their K/V
    into a paged cache (pages of `page_size` = 256 tokens) and runs the model once; the sampled
    tokens go back to each request. With FlashAttention installed it reads the cache through a
    block table (varlen kernels). With SDPA (what a plain `pip install transformers` has, and what
    ran here) it gathers every scheduled request's cached K/V into one (1, heads, total keys, dim)
    tensor and builds a dense (total queries x total keys) mask that lets each query see only its own
    request: the attention computes every query against every request's keys and masks most of it
    away, work that grows with (batch size)^2 x context where kvlab's kernels do batch x context.

    Set-up (timed apart, as kvlab's engine set-up is): the manager allocates its whole paged cache
    and, for SDPA, a mask buffer of max_batch_tokens x (cache tokens + max_batch_tokens), both filled
    once. By default transformers sizes the cache from the free memory (on this 2-core CPU: 7.7 GB
    of cache and a 1.4-billion-entry mask, 23 s to fill); here the cache is sized to the requests
    (`num_blocks`), the most favourable setting for HF. Prefix sharing is off (the same requests run
    twice; kvlab runs with its prefix cache off too)."""

    def __init__(self, lm, requests, max_batch_tokens: int):
        from transformers import GenerationConfig

        self.model = lm.hf_model
        self._before = getattr(self.model.config, "_attn_implementation", None)
        page = 256
        sizes = dict(num_blocks=sum(math.ceil((len(p) + n) / page) for p, n in requests) + 8,
                     max_batch_tokens=max_batch_tokens)
        gc = GenerationConfig(max_new_tokens=max(n for _, n in requests), do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        try:                                      # transformers >= 5.2x: the manager's own config
            from transformers import ContinuousBatchingConfig

            self.config = ContinuousBatchingConfig(**sizes, allow_block_sharing=False)
            kwargs = dict(continuous_batching_config=self.config)
        except (ImportError, TypeError):          # older: the sizes ride on the generation config
            self.config = None
            gc.update(**sizes)
            kwargs = {}
        self.num_blocks = sizes["num_blocks"]
        t0 = time.perf_counter()
        errors = []
        for impl in (None, "paged|sdpa"):         # older transformers need the paged attention name
            try:
                if impl is not None:
                    self.model.set_attn_implementation(impl)
                self.manager = self.model.init_continuous_batching(generation_config=gc, **kwargs)
                break
            except Exception as e:                # noqa: BLE001
                errors.append(f"{impl or self._before}: {type(e).__name__}: {e}")
        else:
            raise RuntimeError("transformers' continuous batching did not start: " + " | ".join(errors))
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        self.manager.start()
        self._runs = 0
        self(requests[:1])                        # the loop creates its cache and mask buffer on its first request
        self.setup_s = time.perf_counter() - t0

    def _add(self, prompt, rid: str, n: int) -> None:
        try:
            self.manager.add_request(prompt, request_id=rid, max_new_tokens=n, record_timestamps=True)
        except TypeError:                         # older transformers: no per-token timestamps
            self.manager.add_request(prompt, request_id=rid, max_new_tokens=n)

    def __call__(self, requests) -> tuple[list, list]:
        """Submit every request at once; TTFT and TPOT from the manager's own per-token timestamps."""
        self._runs += 1
        start = time.perf_counter()
        ids = []
        for i, (p, n) in enumerate(requests):
            rid = f"run{self._runs}-r{i}"
            self._add(p, rid, n)
            ids.append(rid)
        outs: dict[str, object] = {}
        self._done_at: dict[str, float] = {}
        deadline = start + 3600
        while len(outs) < len(ids) and time.perf_counter() < deadline:
            r = self.manager.get_result(timeout=1)
            if r is not None and (r.is_finished() if hasattr(r, "is_finished") else
                                  str(r.status).upper().endswith("FINISHED")):
                outs[r.request_id] = r
                self._done_at[r.request_id] = time.perf_counter()
        if len(outs) < len(ids):
            raise RuntimeError(f"transformers' continuous batching finished {len(outs)} of {len(ids)} requests")
        ttft, tpot = [], []
        for rid, (_, n) in zip(ids, requests):
            r = outs[rid]
            if r.error or len(r.generated_tokens) != n:
                raise RuntimeError(f"request {rid}: {r.error or f'{len(r.generated_tokens)} tokens, asked {n}'}")
            stamps = getattr(r, "timestamps", None) or [self._done_at[rid]] * n   # without: completion time
            ttft.append(stamps[0] - start)
            tpot.append((stamps[-1] - stamps[0]) / (n - 1) if n > 1 else 0.0)
        return ttft, tpot

    def close(self) -> None:
        self.manager.stop(block=True)
        destroy = getattr(self.model, "destroy_cached_continuous_batching_manager", None)
        if destroy is not None:
            destroy()
        if self._before is not None and getattr(self.model.config, "_attn_implementation", None) != self._before:
            self.model.set_attn_implementation(self._before)     # the other HF systems use their usual attention


def hf_continuous_breakdown(lm, requests, max_batch_tokens: int = 1024, rounds: int = 2) -> dict:
    """Where transformers' continuous batching spends its time, measured with timers around its own stages
    (CPU: the timers are exact; a GPU would need a synchronisation in each):

        setup          the manager: its paged cache and (SDPA) mask buffer, allocated and filled once
        prepare        per step, scheduling and building the inputs (the mask included) on the host
        attention      per step, the SDPA calls of all layers
        forward_rest   per step, the rest of the forward pass and sampling
        update         per step, handing the sampled tokens to the requests

    and, per step, the attention work: SDPA's (queries x keys) against the sum over requests of
    (own queries x own keys), what a varlen or paged kernel computes (kvlab's). After a warm-up, `rounds`
    timed runs; the stages of the fastest are reported (as `measure` reports its fastest run)."""
    from transformers.generation.continuous_batching import continuous_api
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    timers = dict(prepare=0.0, step=0.0, attention=0.0, update=0.0)
    work = dict(steps=0, computed=0, needed=0, queries=0)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    processor = continuous_api.ContinuousBatchProcessor

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - t0
        return wrapper

    def attention(module, query, key, value, attention_mask, **kwargs):
        t0 = time.perf_counter()
        out = sdpa(module, query, key, value, attention_mask, **kwargs)
        timers["attention"] += time.perf_counter() - t0
        if getattr(module, "layer_idx", 0) == 0:                  # count the work once per step (layer 0)
            q = torch.diff(kwargs["cu_seq_lens_q"]).tolist()
            k = torch.diff(kwargs["cu_seq_lens_k"]).tolist()
            work["steps"] += 1
            work["queries"] += query.shape[-2]
            work["computed"] += query.shape[-2] * key.shape[-2]
            work["needed"] += sum(a * b for a, b in zip(q, k))
        return out

    saved = {name: getattr(processor, name) for name in ("prepare_next_batch", "_generation_step", "update_batch")}
    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    processor.prepare_next_batch = timed("prepare", saved["prepare_next_batch"])
    processor._generation_step = timed("step", saved["_generation_step"])
    processor.update_batch = timed("update", saved["update_batch"])
    try:
        system = HFContinuous(lm, requests, max_batch_tokens)
        setup = system.setup_s
        system(requests)                                           # warm-up
        runs = []
        for _ in range(rounds):
            for k in timers:
                timers[k] = 0.0
            work.update(steps=0, computed=0, needed=0, queries=0)
            t0 = time.perf_counter()
            ttft, tpot = system(requests)
            runs.append((time.perf_counter() - t0, dict(timers), dict(work), ttft, tpot))
        system.close()
        wall, timers, work, ttft, tpot = min(runs, key=lambda r: r[0])
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        for name, fn in saved.items():
            setattr(processor, name, fn)
    tokens = sum(n for _, n in requests)
    return dict(requests=len(requests), tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall, setup_s=setup,
                rounds_wall_s=[r[0] for r in runs],
                prepare_s=timers["prepare"], attention_s=timers["attention"],
                forward_rest_s=timers["step"] - timers["attention"], update_s=timers["update"],
                steps=work["steps"], attention_work_computed=work["computed"], attention_work_needed=work["needed"],
                ttft_p50_s=float(np.median(ttft)), tpot_p50_s=float(np.median(tpot)),
                max_batch_tokens=max_batch_tokens, num_blocks=system.num_blocks,
                attn_implementation=system.attn_implementation)


# ---------------------------------------------------------------------------- kvlab

def kvlab_run(llm, requests) -> tuple[list, list]:
    from kvlab import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    outs = llm.generate([p for p, _ in requests], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [n for _, n in requests]
    return [o.metrics.ttft for o in outs], [o.metrics.tpot or 0.0 for o in outs]


def make_kvlab(lm, requests, device: str):
    from kvlab import LLM

    longest = max(len(p) + n for p, n in requests)
    return LLM(model=lm, max_num_seqs=min(256, len(requests)), max_num_batched_tokens=8192 if device == "cuda" else 1024,
               max_model_len=max(1024, 1 << (longest - 1).bit_length()), enable_prefix_caching=False,
               skip_tokenizer_init=True)        # token ids in and out, as HF's generate returns them


# ---------------------------------------------------------------------------- running

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, requests) -> tuple[float, list, list]:
    _sync()
    t0 = time.perf_counter()
    ttft, tpot = fn(requests)
    _sync()
    return time.perf_counter() - t0, ttft, tpot


def measure(name: str, fn, requests, warmup_extra: float = 0.0, warm_subset: int | None = None,
            rounds: int = 1) -> Run:
    """Warm up on the same requests (or on the first `warm_subset`, for systems whose full run takes
    minutes), then time `rounds` runs; the fastest counts. warmup_extra: set-up seconds to report with
    the warm-up (an engine built before the first run)."""
    warm, _, _ = _timed(fn, requests[:warm_subset] if warm_subset else requests)
    timed = [_timed(fn, requests) for _ in range(rounds)]
    wall, ttft, tpot = min(timed, key=lambda t: t[0])
    note = f"warm-up on the first {warm_subset} requests" if warm_subset else "warm-up: the same requests"
    return Run(name, sum(n for _, n in requests), wall, warm + warmup_extra, ttft, tpot, len(requests),
               note=note + (f"; fastest of {rounds} timed runs" if rounds > 1 else ""), walls=[t[0] for t in timed])


def race(systems: dict, requests, rounds: int = 2, warm_subset: int | None = 2, progress: bool = True) -> dict:
    """The race in notebook 07: every system warms up once (on the first `warm_subset` requests), then the
    systems take turns, `rounds` timed runs each, so that a burst of other work on a shared machine hits
    them alike; each system's fastest run counts.

    systems: name -> fn(requests) returning (TTFT list, TPOT list), e.g.
        {"kvlab": lambda r: kvlab_run(llm, r), "hf_one_at_a_time": lambda r: hf_one_at_a_time(lm, r)}
    Returns name -> Run.summary() (with every round's wall time in "rounds_wall_s")."""
    from tqdm.auto import tqdm

    warm = {name: _timed(fn, requests[:warm_subset] if warm_subset else requests)[0] for name, fn in systems.items()}
    timed: dict[str, list] = {name: [] for name in systems}
    for _, name in tqdm(list(itertools.product(range(rounds), systems)), desc="the race (rounds x systems)",
                        disable=not progress):
        timed[name].append(_timed(systems[name], requests))
    out = {}
    for name, runs in timed.items():
        wall, ttft, tpot = min(runs, key=lambda t: t[0])
        out[name] = Run(name, sum(n for _, n in requests), wall, warm[name], ttft, tpot, len(requests),
                        note=f"fastest of {rounds} interleaved runs", walls=[t[0] for t in runs]).summary()
    return out


def run_workload(workload: str, systems: list[str], lm, subset_slow: int | None = None,
                 num_requests: int | None = None, checkpoint=None, rounds: int = 1) -> dict:
    """num_requests: only the first N requests of the workload (smoke tests); checkpoint: called
    with the results so far after each system (a run cut short keeps what it measured)."""
    w = WORKLOADS[workload]
    requests = make_requests(workload, lm.spec.vocab_size, lm.tokenizer if w["device"] == "cpu" else None)
    requests = requests[:num_requests] if num_requests else requests
    runs: dict[str, Run] = {}
    for system in systems:
        print(f"[{workload}] {system} ...", flush=True)
        try:
            if system == "kvlab":
                t0 = time.perf_counter()
                llm = make_kvlab(lm, requests, w["device"])
                setup = time.perf_counter() - t0
                run = measure(system, lambda r: kvlab_run(llm, r), requests, warmup_extra=setup, rounds=rounds)
                e = llm.engine
                run.note += (f"; set-up {setup:.1f} s (CUDA graphs {e.runner.graph_capture_time:.1f} s for "
                             f"{len(e.runner.graphs)} batch sizes), KV pool {e.allocator.num_blocks} blocks")
                runs[system] = run
                runs[system].__dict__["engine_steps"] = _step_breakdown(e, rounds)
                del llm, e
                _free_gpu_memory()
            elif system == "hf_padded":
                runs[system] = measure(system, lambda r: hf_padded(lm, r), requests, rounds=rounds)
            elif system == "hf_static_compile":
                runs[system] = measure(system, lambda r: hf_padded(lm, r, static=True), requests, rounds=rounds)
            elif system == "hf_continuous":
                hf = HFContinuous(lm, requests, 8192 if w["device"] == "cuda" else 1024)
                try:
                    run = measure(system, hf, requests, warmup_extra=hf.setup_s, rounds=rounds)
                finally:
                    hf.close()
                run.note += (f"; set-up {hf.setup_s:.1f} s (a paged cache of {hf.num_blocks} pages of 256 "
                             f"tokens, sized to the requests), attention {hf.attn_implementation}")
                runs[system] = run
                del hf
                _free_gpu_memory()
            elif system in ("hf_one_at_a_time", "hf_threads"):
                fn = hf_one_at_a_time if system == "hf_one_at_a_time" else hf_threads
                reqs = requests[:subset_slow] if subset_slow else requests
                run = measure(system, lambda r: fn(lm, r), reqs, warm_subset=2)
                if subset_slow and subset_slow < len(requests):
                    run.note += f"; measured on the first {subset_slow} of {len(requests)} requests (time)"
                runs[system] = run
            else:
                raise ValueError(f"unknown system {system!r}")
        except Exception as e:                      # noqa: BLE001  (one baseline failing must not lose the rest)
            print(f"[{workload}] {system} failed: {type(e).__name__}: {e}", flush=True)
            runs[system] = Run(system, 0, float("nan"), float("nan"), [], [], note=f"failed: {type(e).__name__}: {e}")
            continue
        r = runs[system]
        print(f"[{workload}] {system}: {r.tokens_per_s:,.0f} tok/s ({r.tokens} tokens in {r.wall:.2f} s; "
              f"warm-up {r.warmup:.1f} s)", flush=True)
        if checkpoint is not None:
            checkpoint(_workload_result(requests, w, runs))
    return _workload_result(requests, w, runs)


def _workload_result(requests, w, runs: dict) -> dict:
    out = {"requests": len(requests), "prompt_tokens": sum(len(p) for p, _ in requests),
           "generated_tokens": sum(n for _, n in requests), "spec": w,
           "systems": {k: {**v.summary(), **({"engine_steps": v.__dict__["engine_steps"]}
                                               if "engine_steps" in v.__dict__ else {})} for k, v in runs.items()}}
    k = runs.get("kvlab")
    if k is not None and k.tokens:
        out["kvlab_speedup"] = {s: k.tokens_per_s / r.tokens_per_s for s, r in runs.items()
                                if s != "kvlab" and r.tokens and r.wall == r.wall}
    return out


def _free_gpu_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _step_breakdown(engine, rounds: int = 1) -> dict:
    """Where kvlab's last timed run spent its time, from the engine's per-step stats (every run, the warm-up
    included, took the same steps: the same requests, greedy)."""
    steps = list(engine.stats)
    n = len(steps) // (rounds + 1)                   # the last run's steps
    steps = steps[-n:] if n else steps
    graph = [s for s in steps if s.cuda_graph]
    total = lambda f, xs: float(sum(getattr(s, f) or 0.0 for s in xs))
    return dict(steps=len(steps), cuda_graph_steps=len(graph),
                schedule_s=total("schedule_time", steps), prepare_s=total("prepare_time", steps),
                forward_s=total("forward_time", steps), output_s=total("output_time", steps),
                device_s=total("device_time", steps),
                median_decode_step_ms=1e3 * statistics.median([s.total_time for s in graph]) if graph else None)


# ---------------------------------------------------------------------------- concurrency

def concurrency_sweep(lm, counts=(1, 4, 16, 64, 256), device: str = "cuda", rounds: int = 1) -> dict:
    """Tokens/s of HF's padded batch and kvlab at several request counts (workload A's kind: the first n of
    its requests, repeated past 64; prompts 16..512, 128 new tokens), by `measure`: warm-up on the same
    requests, the fastest of `rounds` timed runs. HF runs first, with no kvlab engine holding memory beside
    it; then one kvlab engine serves every count."""
    rng_requests = make_requests("A", lm.spec.vocab_size)
    pool = (rng_requests * (max(counts) // len(rng_requests) + 1))[:max(counts)]
    runs: dict[int, dict[str, Run]] = {n: {} for n in counts}
    for n in counts:
        runs[n]["hf_padded"] = measure("hf_padded", lambda r: hf_padded(lm, r), pool[:n], rounds=rounds)
        print(f"[concurrency] {n:4d} requests: HF padded {runs[n]['hf_padded'].tokens_per_s:,.0f} tok/s", flush=True)
    _free_gpu_memory()
    llm = make_kvlab(lm, pool, device)
    for n in counts:
        runs[n]["kvlab"] = measure("kvlab", lambda r: kvlab_run(llm, r), pool[:n], rounds=rounds)
        print(f"[concurrency] {n:4d} requests: kvlab {runs[n]['kvlab'].tokens_per_s:,.0f} tok/s", flush=True)
    del llm
    _free_gpu_memory()
    out = {}
    for n, r in runs.items():
        k, h = r["kvlab"], r["hf_padded"]
        out[str(n)] = {"kvlab": k.tokens_per_s, "hf_padded": h.tokens_per_s, "ratio": k.tokens_per_s / h.tokens_per_s}
        for name, run in r.items():
            out[str(n)].update({f"{name}_tpot_p50_s": float(np.median(run.tpot)),
                                f"{name}_ttft_p50_s": float(np.median(run.ttft)),
                                f"{name}_rounds_wall_s": run.walls})
    return out


# ---------------------------------------------------------------------------- GPU decode step

def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    from triton.testing import do_bench

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() / (ms / 1e3)


def decode_step_analysis(lm, batches=(64, 256), context: int = 500) -> dict:
    """kvlab's decode step at a fixed batch and context, with CUDA graphs synchronous ("cuda_graph") and
    with asynchronous scheduling ("async"), and eager: its period and GPU time (kvlab.bench.step_probe)
    against the bound (weights + K/V read over the copy bandwidth); one eager step profiled by kernel kind."""
    from kvlab import LLM
    from kvlab.bench import step_probe
    from kvlab.memory import kv_bytes_per_token

    bw = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.hf_model.parameters())
    kv_tok = kv_bytes_per_token(lm.spec, kv_dtype="bfloat16")
    out = {"copy_bandwidth_GB_s": bw / 1e9, "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_tok}
    steps = step_probe.probe(lm, batches, context, modes=("sync", "async", "eager"))
    rng = np.random.default_rng(1)
    for batch in batches:
        row = {key: {**steps[f"batch_{batch}_{mode}"], "step_ms": steps[f"batch_{batch}_{mode}"]["period_ms"]}
               for key, mode in (("cuda_graph", "sync"), ("async", "async"), ("eager", "eager"))}
        llm = LLM(model=lm, max_num_seqs=batch, max_num_batched_tokens=batch * context, max_model_len=1024,
                  enforce_eager=True, async_scheduling=False, enable_prefix_caching=False, skip_tokenizer_init=True)
        row["profile"] = _profile_decode_step(llm, batch, context, rng)
        del llm
        _free_gpu_memory()
        ctx = context + 12                                     # mid-way through the 24 measured tokens
        bound_s = (weight_bytes + batch * ctx * kv_tok) / bw
        row.update(context=ctx, bound_ms=1e3 * bound_s, kv_bytes=batch * ctx * kv_tok,
                   tokens_per_s_graph=batch / (row["cuda_graph"]["step_ms"] / 1e3),
                   tokens_per_s_async=batch / (row["async"]["step_ms"] / 1e3),
                   bound_over_graph_step=bound_s * 1e3 / row["cuda_graph"]["step_ms"],
                   bound_over_async_step=bound_s * 1e3 / row["async"]["step_ms"])
        out[f"batch_{batch}"] = row
        print(f"[decode] batch {batch}: step {row['cuda_graph']['step_ms']:.2f} ms synchronous, "
              f"{row['async']['step_ms']:.2f} ms asynchronous (device {row['async']['device_ms']:.2f}), eager "
              f"{row['eager']['step_ms']:.2f} ms, bound {row['bound_ms']:.2f} ms", flush=True)
    return out


def _profile_decode_step(llm, batch, context, rng) -> dict:
    """GPU kernel time of a few eager decode steps, by kind: attention kernel, KV store, matmuls, rest."""
    from kvlab import SamplingParams

    engine = llm.engine
    for i in range(batch):
        engine.add_request(f"p{i}", rng.integers(3, 49152, context).tolist(),
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    while any(s.num_computed_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    kinds = {"attention (paged kernel)": 0.0, "KV store": 0.0, "matmul": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        name = ev.key.lower()
        if "paged_attention" in name or "split_k_reduce" in name:
            kinds["attention (paged kernel)"] += t
        elif "store_kv" in name:
            kinds["KV store"] += t
        elif "gemm" in name or "matmul" in name or "cutlass" in name or "sm90" in name or "nvjet" in name:
            kinds["matmul"] += t
        else:
            kinds["other"] += t
    while engine.has_unfinished_requests():
        engine.step()
    return {k: v / 3 / 1e3 for k, v in kinds.items()}       # ms per step (profiler reports microseconds)


# ---------------------------------------------------------------------------- main

def merge(paths) -> dict:
    """One result from several runs of this benchmark (on a GPU each part fits a command's time limit: workload
    A, workload C, the concurrency sweep): workloads, sweep and decode analysis from whichever run has them,
    each run's environment kept under the part it measured; card and date from the first. A step probe's
    result (kvlab.bench.step_probe, e.g. an older checkout measured on the same card) goes under
    "decode_step_before"."""
    out: dict = {"environment": {}, "method": __doc__, "workloads": {}}
    for path in paths:
        r = results.load(path)
        if "steps" in r and "workloads" not in r:          # a step probe: the "before" of the decode analysis,
            out["decode_step_before"] = {**r["steps"],     # another engine's: its environment kept with it
                                         "environment": {"gpu": r.get("device"), "date": r.get("date"),
                                                         "git_commit": r.get("commit"), "model": r.get("model")}}
            continue
        env = r.get("environment") or {}
        for w, res in r.get("workloads", {}).items():
            out["workloads"][w] = res
            out["environment"][w] = env
        for key in ("concurrency", "decode_step", "hf_continuous_breakdown"):
            if key in r:
                out[key] = r[key]
                out["environment"][key] = env
    first = next(iter(out["environment"].values()), {})
    out["model"] = next((res["model"] for res in out["workloads"].values() if res.get("model")), None)
    out["card"] = first.get("gpu") or f"CPU ({first.get('cpu_count')} cores)"
    out["date"] = str(first.get("date", ""))[:10]
    return out


def load_benchmark_model(device: str):
    """The model a workload runs: on a GPU SmolLM2-135M's shape with random weights in bf16, on the CPU the real
    SmolLM2-135M-Instruct in fp32."""
    if device == "cuda":
        return smollm2_random("cuda", torch.bfloat16)
    from kvlab.model.loading import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvlab bench engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="*", choices=sorted(WORKLOADS), default=None,
                        help="A and C on a GPU (default there), B on the CPU (default there); none: skip workloads")
    parser.add_argument("--systems", nargs="+", default=None, help="subset of the systems (default: all that apply)")
    parser.add_argument("--subset-slow", type=int, default=None,
                        help="run one-at-a-time and threads on only the first N requests (GPU: time)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="timed runs per system after its warm-up; the fastest counts, all are recorded (1)")
    parser.add_argument("--decode-analysis", action="store_true", help="GPU: decode step vs its bandwidth bound")
    parser.add_argument("--concurrency", type=int, nargs="*", default=None,
                        help="also sweep these request counts, kvlab vs HF padded (e.g. 1 4 16 64 256)")
    parser.add_argument("--hf-continuous-breakdown", type=int, default=None, metavar="N",
                        help="CPU: where transformers' continuous batching spends its time, on the first N requests "
                             "of workload B")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="write one result (--out) from the JSON of several runs (A, C, the sweep), and run nothing")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out")
        results.save(merge(args.merge), args.out)
        print(f"wrote {args.out} from {len(args.merge)} runs")
        return 0
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    workloads = args.workload if args.workload is not None else (["A", "C"] if cuda else ["B"])
    result = {"environment": results.environment(), "method": __doc__, "workloads": {}}
    save = lambda: results.save(result, args.out) if args.out else None
    for workload in workloads:
        if WORKLOADS[workload]["device"] != device:
            parser.error(f"workload {workload} runs on {WORKLOADS[workload]['device']}, this machine has {device}")
    lm = load_benchmark_model(device)
    for workload in workloads:
        systems = args.systems or (GPU_SYSTEMS if cuda else CPU_SYSTEMS)

        def checkpoint(partial, workload=workload):          # keep what is done if a later system fails
            result["workloads"][workload] = partial
            save()

        result["workloads"][workload] = run_workload(workload, systems, lm, args.subset_slow, checkpoint=checkpoint,
                                                     rounds=args.rounds)
        result["workloads"][workload]["model"] = lm.name
        save()
    if args.concurrency:
        result["concurrency"] = concurrency_sweep(lm, args.concurrency, device, rounds=args.rounds)
        save()
    if args.hf_continuous_breakdown:
        if cuda:
            parser.error("--hf-continuous-breakdown times the host stages without synchronising: run it on the CPU")
        reqs = make_requests("B", lm.spec.vocab_size, lm.tokenizer)[:args.hf_continuous_breakdown]
        result["hf_continuous_breakdown"] = hf_continuous_breakdown(lm, reqs)
        save()
    if args.decode_analysis and cuda:
        result["decode_step"] = decode_step_analysis(lm)
        save()
    for workload, res in result["workloads"].items():
        print(f"\nworkload {workload}: {res['requests']} requests, {res['generated_tokens']} tokens")
        for name, s in res["systems"].items():
            print(f"  {name:<18} {s['tokens_per_s']:>10,.0f} tok/s   TTFT p50 {s['ttft_s']['p50'] or 0:.3f} s   "
                  f"TPOT p50 {1e3 * (s['tpot_s']['p50'] or 0):.1f} ms   warm-up {s['warmup_s']:.1f} s")
        for name, x in res.get("kvlab_speedup", {}).items():
            print(f"  kvlab / {name}: {x:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
