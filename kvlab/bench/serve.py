"""A load test of an OpenAI-compatible server: latency against request rate, and the server's cost.

    python -m kvlab.bench.serve --model smollm2-135m --dataset alpaca --out data/bench/serve_cpu.json
    kvlab bench serve ...                              # the same command
    python -m kvlab.bench.serve --url http://127.0.0.1:8000 --model NAME --rates 1 2 4 --no-offline
                                                       # any running OpenAI-compatible server (vLLM too)

In the manner of vLLM's benchmarks/benchmark_serving.py. Requests: lengths drawn from
kvlab.workloads (ShareGPT-like by default: long-tailed, the vLLM paper's means), prompts
random token ids of those lengths (what vLLM's "random" dataset does), greedy, `ignore_eos`
and `max_tokens` = the drawn output length, so that every request generates exactly its
tokens, random weights included. Arrivals: a Poisson process at each rate (requests per
second; kvlab.workloads.poisson_arrivals); rate `inf` sends every request at once.

The client measures, per request: TTFT (send -> first token), ITL (the gaps between token
events; an event that carries k tokens, because the server merged steps for a slow reader,
counts as k gaps of 1/k each), TPOT ((end-to-end - TTFT) / (tokens - 1)) and end-to-end
latency; the server sends the token ids with every event (`return_token_ids`), so the count
is exact. Per rate: request and token throughput, mean / p50 / p90 / p99 of each latency,
the normalized latency (mean of end-to-end / output tokens: the y-axis of the vLLM paper's
Figure 12), goodput (requests per second that met every SLO, --slo-ttft-ms and --slo-tpot-ms:
DistServe's definition, as vLLM's benchmark) and the server's own counters (engine steps,
preemptions) read from /metrics; for a server this command started, the CPU seconds of its
HTTP process and of its engine core during the run (an HTTP process near one CPU-second per
second is the front end at its limit, however fast the engine).

Rates `auto`: first the saturating run (rate inf) measures the server's capacity C in
requests per second; then Poisson runs at fractions of C (0.25 ... 2), so the knee, where
the queue starts to grow, falls inside the sweep on any machine.

Offline comparison (on by default when this command starts the server): after the server
stops, the same requests go through kvlab.LLM.generate in this process, with the same engine
flags. Reported: the server's throughput at rate inf / offline throughput, and what the server
adds to the median TPOT and to the median ITL (offline, a token's ITL is the duration of the
engine step that produced it): the latency a token pays for HTTP, JSON, the event loop and
the pipe between the two processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvlab import workloads
from kvlab.bench import results

DATASETS = {"sharegpt": workloads.sharegpt_like, "alpaca": workloads.alpaca_like}
AUTO_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
PERCENTILES = (50, 90, 99)


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int                  # max_tokens, generated exactly (ignore_eos)


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0              # tokens received
    ttft: float = 0.0                # seconds
    e2e: float = 0.0                 # seconds
    itl: list[float] = field(default_factory=list, repr=False)   # seconds, one per token after the first
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_len - 1) if self.ok and self.output_len > 1 else None


BLOCK = 256                          # requests are drawn in seeded blocks: the first n never depend on n


def make_requests(n: int, dataset: str = "sharegpt", max_len: int = 2048, seed: int = 0,
                  token_range: tuple[int, int] = (1000, 20000)) -> list[BenchRequest]:
    """n requests with kvlab.workloads lengths; prompts are random token ids in token_range (ordinary
    tokens of any tokenizer with at least token_range[1] entries, no special tokens). Drawn in
    seeded blocks of 256, so make_requests(m)[:n] == make_requests(n): every rate of a sweep
    sends the same first requests."""
    out = []
    for b in range(math.ceil(n / BLOCK)):
        wl = DATASETS[dataset](BLOCK, seed=seed * 100_003 + b, max_len=max_len)
        rng = np.random.default_rng([seed, b, 2])
        out += [BenchRequest(rng.integers(*token_range, int(p)).tolist(), int(o))
                for p, o in zip(wl.prompt_len, wl.output_len)]
    return out[:n]


def describe_requests(requests: list[BenchRequest]) -> dict:
    return {"num_prompts": len(requests),
            "mean_prompt_len": float(np.mean([len(r.prompt_token_ids) for r in requests])),
            "mean_output_len": float(np.mean([r.output_len for r in requests]))}


# ---- the client ----------------------------------------------------------------------------------

async def send_request(session, url: str, model: str, req: BenchRequest, headers: dict) -> RequestResult:
    """One streaming completion; times every token event."""
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    result = RequestResult(ok=False, prompt_len=len(req.prompt_token_ids))
    start = last = time.perf_counter()
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for line in resp.content:                   # server-sent events, one line each
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if not chunk["choices"]:
                    continue                                   # the usage chunk
                k = len(chunk["choices"][0].get("token_ids") or ())
                if k == 0:
                    continue
                now = time.perf_counter()
                if result.output_len == 0:
                    result.ttft = now - start
                else:
                    result.itl += [(now - last) / k] * k
                last = now
                result.output_len += k
        result.e2e = last - start
        result.ok = result.output_len == req.output_len
        if not result.ok:
            result.error = f"got {result.output_len} tokens, asked for {req.output_len}"
    except Exception as err:                                  # noqa: BLE001 -- a failed request is a result
        result.error = f"{type(err).__name__}: {err}"
    return result


async def run_rate(url: str, model: str, requests: list[BenchRequest], rate: float, *, seed: int = 0,
                   api_key: str | None = None, timeout: float = 600.0, progress: bool = True,
                   desc: str = "") -> tuple[list[RequestResult], float]:
    """Send `requests` with Poisson arrivals at `rate` per second (inf: all at once); returns the
    results (in request order) and the wall time from the first send to the last token."""
    import aiohttp
    from tqdm.auto import tqdm

    arrivals = workloads.poisson_arrivals(len(requests), None if math.isinf(rate) else rate, seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    bar = tqdm(total=len(requests), desc=desc or f"rate {rate:g}/s", unit="req", disable=not progress,
               dynamic_ncols=True)

    async def timed(req, session):
        out = await send_request(session, url, model, req, headers)
        bar.update(1)
        return out

    connector = aiohttp.TCPConnector(limit=0)                # as many connections as requests in flight
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
                                     read_bufsize=2**16) as session:
        start = time.perf_counter()
        tasks = []
        for req, at in zip(requests, arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(timed(req, session)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def _stats_ms(xs) -> dict:
    if not len(xs):
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    a = np.asarray(xs) * 1e3
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES}}


def summarize(results: list[RequestResult], duration: float, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    """Throughput, latency percentiles (ms), normalized latency and goodput of one run."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [r.tpot for r in ok if r.tpot is not None]
    good = [r for r in ok if r.ttft * 1e3 <= slo_ttft_ms and (r.tpot is None or r.tpot * 1e3 <= slo_tpot_ms)]
    return {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in ok]), "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms([g for r in ok for g in r.itl]), "e2e_ms": _stats_ms([r.e2e for r in ok]),
        "normalized_latency_ms_per_token": float(np.mean([r.e2e / r.output_len for r in ok]) * 1e3) if ok else None,
        "goodput": {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "requests_per_s": len(good) / duration,
                    "fraction": len(good) / len(results) if results else None},
    }


def scrape_metrics(url: str, api_key: str | None = None) -> dict[str, float]:
    """The server's unlabelled /metrics samples (kvlab's names), {} if it has none."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def sweep(url: str, model: str, requests, rates: list[float] | str, **kwargs) -> list[dict]:
    """sweep_async, for code that has no event loop running (in Jupyter: `await sweep_async(...)`)."""
    return asyncio.run(sweep_async(url, model, requests, rates, **kwargs))


async def sweep_async(url: str, model: str, requests, rates: list[float] | str, *,
                      num_prompts: int, seconds_per_rate: float | None = None, min_prompts: int = 20,
                      max_prompts: int | None = None, fractions: tuple[float, ...] = AUTO_FRACTIONS,
                      slo_ttft_ms: float = 1000.0, slo_tpot_ms: float = 100.0, seed: int = 0,
                      api_key: str | None = None, timeout: float = 600.0, progress: bool = True, on_result=None,
                      server_pid: int | None = None) -> list[dict]:
    """The saturating run (rate inf, first `num_prompts` requests) when rates is "auto" or holds inf,
    then each finite rate (auto: `fractions` of the measured capacity). Each finite rate sends
    `num_prompts` requests, or rate x seconds_per_rate of them (at least min_prompts, at most
    max_prompts: a server that refuses requests past a queue limit W never refuses any of a run of
    at most W, on however fast a machine).
    requests(n): the first n requests (make_requests with fixed arguments)."""
    one = dict(model=model, seed=seed, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, api_key=api_key,
               timeout=timeout, progress=progress, server_pid=server_pid)
    runs = []
    finite = [] if rates == "auto" else sorted(r for r in rates if not math.isinf(r))
    if rates == "auto" or any(math.isinf(r) for r in rates):
        runs.append(await one_rate(url, requests(num_prompts), math.inf, **one))
        if on_result:
            on_result(runs)
    if rates == "auto":
        capacity = runs[0]["request_throughput"]
        finite = [round(f * capacity, 3) for f in fractions]
    for rate in finite:
        n = num_prompts if seconds_per_rate is None else max(min_prompts, round(rate * seconds_per_rate))
        n = n if max_prompts is None else min(n, max_prompts)
        runs.append(await one_rate(url, requests(n), rate, **one))
        if on_result:
            on_result(runs)
    return runs


async def one_rate(url: str, requests: list[BenchRequest], rate: float, *, model: str, seed: int = 0,
                   slo_ttft_ms: float = 1000.0, slo_tpot_ms: float = 100.0, api_key: str | None = None,
                   timeout: float = 600.0, progress: bool = True, server_pid: int | None = None) -> dict:
    """One run at one rate: the summary, plus the server's own counters over the run (/metrics) and,
    for a server on this machine (server_pid), the CPU seconds its processes spent."""
    cpu_before = server_cpu_seconds(server_pid)
    before = await asyncio.to_thread(scrape_metrics, url, api_key)
    results, duration = await run_rate(url, model, requests, rate, seed=seed, api_key=api_key, timeout=timeout,
                                       progress=progress)
    after = await asyncio.to_thread(scrape_metrics, url, api_key)
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0) if after else None
    run = {"rate": "inf" if math.isinf(rate) else rate, **summarize(results, duration, slo_ttft_ms, slo_tpot_ms)}
    steps = delta("kvlab:engine_steps_total")
    run["server"] = {"engine_steps": steps, "preemptions": delta("kvlab:num_preemptions_total"),
                     "tokens_per_step": run["output_tokens"] / steps if steps else None}
    cpu_after = server_cpu_seconds(server_pid)
    if cpu_before and cpu_after:
        http_s, core_s = (a - b for a, b in zip(cpu_after, cpu_before))
        run["server"].update(http_cpu_s=http_s, core_cpu_s=core_s, http_cpu_s_per_s=http_s / run["duration_s"],
                             http_cpu_us_per_token=http_s / run["output_tokens"] * 1e6 if run["output_tokens"] else None)
    return run


@dataclass
class Burst:
    """What a burst of clients received, and what the server's /metrics said while they ran."""
    results: list[RequestResult]                   # one per request, in request order
    samples: list[tuple[float, dict]]              # (seconds since the burst, /metrics), polled while it ran
    before: dict                                   # /metrics before the first request
    after: dict                                    # /metrics once every client had its last token

    def delta(self, name: str) -> float:
        """How much a counter grew during the burst."""
        return self.after.get(name, 0.0) - self.before.get(name, 0.0)

    def series(self, name: str) -> tuple[list[float], list[float]]:
        """(seconds since the burst, value) of one /metrics sample name, over the polls."""
        return [t for t, _ in self.samples], [m.get(name, 0.0) for _, m in self.samples]


async def burst_async(url: str, model: str, requests: list[BenchRequest], *, poll_s: float = 0.1,
                      api_key: str | None = None, timeout: float = 300.0) -> Burst:
    """Send every request at once (one streaming connection each, as send_request) and read /metrics every
    poll_s seconds until the last token has arrived (in Jupyter: `await burst_async(...)`)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    before = await asyncio.to_thread(scrape_metrics, url, api_key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        start = time.perf_counter()
        tasks = [asyncio.create_task(send_request(session, url, model, r, headers)) for r in requests]
        samples = []
        while True:
            done = all(t.done() for t in tasks)          # checked before the poll: the last poll sees the end
            samples.append((time.perf_counter() - start, await asyncio.to_thread(scrape_metrics, url, api_key)))
            if done:
                break
            await asyncio.sleep(poll_s)
        results = [t.result() for t in tasks]
    return Burst(results, samples, before, samples[-1][1])


def plot_burst(burst: Burst, max_num_seqs: int | None = None, axes=None):
    """Two panels against time since the burst: requests running and waiting (the engine's gauges), and KV
    blocks in use; each request's first and last token marked on the first panel's time axis."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 3.3), constrained_layout=True)
    a, b = axes
    for name, label in (("kvlab:num_requests_running", "running (in the batch)"),
                        ("kvlab:num_requests_waiting", "waiting (queued)")):
        a.step(*burst.series(name), where="post", label=label)
    if max_num_seqs is not None:
        a.axhline(max_num_seqs, color="gray", ls=":", lw=1, label="max_num_seqs")
    ok = [r for r in burst.results if r.ok]
    a.plot([r.e2e for r in ok], [0] * len(ok), "|", color="k", ms=12, label="a request's last token")
    a.set(xlabel="seconds since the burst", ylabel="requests", title=f"/metrics during a burst of "
          f"{len(burst.results)} clients")
    a.legend(fontsize=8)
    b.step(*burst.series("kvlab:kv_cache_used_blocks"), where="post", color="C2")
    b.set(xlabel="seconds since the burst", ylabel="blocks", title="KV-cache blocks in use")
    for ax in axes:
        ax.grid(alpha=0.3)
    return axes


def server_cpu_seconds(pid: int | None) -> tuple[float, float] | None:
    """CPU seconds (user + system) of a server's HTTP process and of its children (the engine core):
    what tells a front end that saturates one core from an engine that is slow. None without psutil."""
    if pid is None:
        return None
    try:
        import psutil

        proc = psutil.Process(pid)
        cpu = lambda p: sum(p.cpu_times()[:2])
        return cpu(proc), sum(cpu(c) for c in proc.children(recursive=True))
    except (ImportError, OSError):                           # no psutil, or the process is gone
        return None


# ---- offline: the same requests through kvlab.LLM.generate ---------------------------------------

def run_offline(llm, requests: list[BenchRequest], warmup: int = 8, progress: bool = True) -> dict:
    """LLM.generate on every request at once (after a warm-up on a few): throughput and per-request
    TTFT / TPOT / end-to-end latency from the engine's own clock."""
    from kvlab.engine import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    if warmup:
        llm.generate(prompts[:warmup], params[:warmup], use_tqdm=False)
    first_step = llm.engine.num_steps
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=progress)
    duration = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = [s for s in list(llm.engine.stats) if s.step > first_step]
    # a token's inter-token latency offline is the step that made it: one sample per decode row
    itl = np.repeat([s.total_time for s in steps], [s.num_decode_seqs for s in steps])
    return {
        "num_requests": len(requests), "duration_s": duration, "output_tokens": tokens,
        "request_throughput": len(requests) / duration, "output_throughput": tokens / duration,
        "ttft_ms": _stats_ms([o.metrics.ttft for o in outs]),
        "tpot_ms": _stats_ms([o.metrics.tpot for o in outs if o.metrics.tpot is not None]),
        "itl_ms": _stats_ms(itl), "e2e_ms": _stats_ms([o.metrics.e2e_latency for o in outs]),
        "step_ms": _stats_ms([s.total_time for s in steps]), "engine_steps": len(steps),
    }


def compare(server_inf: dict, offline: dict) -> dict:
    """The server at the saturating rate against offline on the same requests."""
    ratio = server_inf["output_throughput"] / offline["output_throughput"]
    added_itl = server_inf["itl_ms"]["p50"] - offline["itl_ms"]["p50"]
    return {"throughput_ratio": ratio, "added_median_tpot_ms": server_inf["tpot_ms"]["p50"] - offline["tpot_ms"]["p50"],
            "added_median_itl_ms": added_itl,
            "goals": {"throughput_ratio >= 0.9": ratio >= 0.9, "added_median_itl_ms <= 5": added_itl <= 5.0}}


# ---- the whole benchmark --------------------------------------------------------------------------

def environment() -> dict:
    """The machine and code of a run (kvlab.bench.results.environment, with the server's packages)."""
    return results.environment(packages=("transformers", "triton", "starlette", "uvicorn", "aiohttp"))


def run_benchmark(args: argparse.Namespace) -> dict:
    from kvlab.serve.cli import apply_torch_threads, engine_argv, engine_kwargs, load_engine_model, \
        raise_open_file_limit
    from kvlab.serve.launcher import ServerProcess

    raise_open_file_limit()
    rates = "auto" if args.rates == ["auto"] else [float(r) for r in args.rates]
    requests = lambda n: make_requests(n, args.dataset, args.max_len, args.request_seed, tuple(args.token_range))
    first = requests(args.num_prompts)
    result = {"method": __doc__, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                          if k not in ("api_key", "func")},
              "model": args.model, "dataset": args.dataset, "requests": describe_requests(first)}

    def save(runs=None):
        if runs is not None:
            result["runs"] = runs
        if args.out:
            results.save(result, args.out)

    server = None
    url = args.url
    if url is None:
        server_args = [*engine_argv(args), "--max-waiting-requests", "1000000", "--log-level", "warning"]
        if args.served_model_name:
            server_args += ["--served-model-name", args.served_model_name]
        if args.api_key:
            server_args += ["--api-key", args.api_key]
        server = ServerProcess(server_args, startup_timeout=args.timeout).start()
        url = server.url
    try:
        if args.warmup:
            asyncio.run(run_rate(url, args.served_model_name or args.model, first[:args.warmup], math.inf,
                                 api_key=args.api_key, timeout=args.timeout, progress=False))
        result["runs"] = sweep(url, args.served_model_name or args.model, requests, rates,
                               num_prompts=args.num_prompts, seconds_per_rate=args.seconds_per_rate,
                               min_prompts=args.min_prompts, max_prompts=args.max_prompts,
                               slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, seed=args.request_seed,
                               api_key=args.api_key, fractions=tuple(args.auto_fractions), timeout=args.timeout,
                               progress=not args.quiet,
                               on_result=save, server_pid=server.process.pid if server is not None else None)
    finally:
        if server is not None:
            result["server_exit_status"] = server.stop()
            server.close()
    save()
    inf = next((r for r in result["runs"] if r["rate"] == "inf"), None)
    if args.offline and inf is not None:
        from kvlab.engine import LLM

        apply_torch_threads(args)
        llm = LLM(**engine_kwargs(args, load_engine_model(args)))
        result["offline"] = run_offline(llm, first, warmup=args.warmup, progress=not args.quiet)
        result["server_vs_offline"] = compare(inf, result["offline"])
        del llm
    result["environment"] = environment()
    save()
    return result


def summary_table(result: dict) -> str:
    """The runs as a text table (and the offline comparison, if there is one)."""
    lines = [f"model {result['model']}, {result['dataset']}-like requests "
             f"(mean prompt {result['requests']['mean_prompt_len']:.0f}, "
             f"mean output {result['requests']['mean_output_len']:.0f} tokens)",
             f"{'rate/s':>7} {'done/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} "
             f"{'E2E p50':>8} {'p99':>7} {'goodput':>8}   (latencies in ms)"]
    num = lambda x, width, digits: f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"  # None: nothing completed
    for r in result["runs"]:
        rate = r["rate"] if r["rate"] == "inf" else f"{r['rate']:.2f}"
        lines.append(f"{rate:>7} {r['request_throughput']:>7.2f} {r['output_throughput']:>7.0f} "
                     f"{num(r['ttft_ms']['p50'], 9, 0)} {num(r['ttft_ms']['p99'], 7, 0)} {num(r['itl_ms']['p50'], 8, 1)} "
                     f"{num(r['itl_ms']['p99'], 7, 1)} {num(r['e2e_ms']['p50'], 8, 0)} {num(r['e2e_ms']['p99'], 7, 0)} "
                     f"{r['goodput']['requests_per_s']:>8.2f}" + (f"  {r['failed']} failed" if r["failed"] else ""))
    if "server_vs_offline" in result:
        c, off = result["server_vs_offline"], result["offline"]
        lines.append(f"offline LLM.generate on the rate-inf requests: {off['output_throughput']:.0f} tok/s, "
                     f"TPOT p50 {off['tpot_ms']['p50']:.1f} ms, ITL p50 {off['itl_ms']['p50']:.1f} ms; server / "
                     f"offline throughput {c['throughput_ratio']:.3f}, the server adds {c['added_median_tpot_ms']:+.2f} "
                     f"ms to the median TPOT and {c['added_median_itl_ms']:+.2f} ms to the median ITL")
    return "\n".join(lines)


# ---- figures --------------------------------------------------------------------------------------

def plot_latency_vs_rate(result: dict, axes=None, label: str | None = None):
    """Three panels against the offered request rate (Poisson runs): achieved throughput (it stops
    following the rate at the server's capacity), normalized latency (ms per output token, the vLLM
    paper's Figure 12), and TTFT p50 / p99 (the queue's wait shows up here first)."""
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["rate"] != "inf"]
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    else:
        fig = axes[0].figure
    rates = [r["rate"] for r in runs]
    label = label or result["environment"].get("gpu") or result["model"]
    a = axes[0]
    a.plot(rates, [r["request_throughput"] for r in runs], "o-", label=label)
    a.plot(rates, rates, ":", color="gray", label="= offered rate")
    inf = next((r for r in result["runs"] if r["rate"] == "inf"), None)
    if inf is not None:
        a.axhline(inf["request_throughput"], color="gray", lw=0.8, ls="--", label="capacity (rate inf)")
    a.set(xlabel="offered rate (requests/s)", ylabel="completed requests/s", title="throughput")
    a.legend(fontsize=8)
    axes[1].plot(rates, [r["normalized_latency_ms_per_token"] for r in runs], "o-", label=label)
    axes[1].set(xlabel="offered rate (requests/s)", ylabel="ms per output token",
                title="normalized latency (E2E / output tokens)")
    axes[2].plot(rates, [r["ttft_ms"]["p50"] for r in runs], "o-", label=f"{label} p50")
    axes[2].plot(rates, [r["ttft_ms"]["p99"] for r in runs], "s--", label=f"{label} p99")
    axes[2].set(xlabel="offered rate (requests/s)", ylabel="ms", title="time to first token", yscale="log")
    axes[2].legend(fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---- command line -----------------------------------------------------------------------------------

def _rate(text: str) -> str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a rate is a number of requests per second, inf, or auto")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a rate must be > 0 (inf: all at once)")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kvlab.serve.cli import add_engine_arguments

    add_engine_arguments(p)
    g = p.add_argument_group("load")
    g.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    g.add_argument("--served-model-name", default=None, help="the model name to send (default: --model)")
    g.add_argument("--api-key", default=None, help="Bearer key for the server")
    g.add_argument("--dataset", choices=sorted(DATASETS), default="sharegpt", help="length distribution")
    g.add_argument("--max-len", type=int, default=2048, help="clip prompt + output to this many tokens (2048)")
    g.add_argument("--token-range", type=int, nargs=2, default=(1000, 20000), metavar=("LO", "HI"),
                   help="prompt token ids are drawn from [LO, HI) (default 1000 20000)")
    g.add_argument("--rates", nargs="+", type=_rate, default=["auto"],
                   help="requests per second (Poisson), 'inf' (all at once), or 'auto' (default): inf, then "
                        f"fractions {AUTO_FRACTIONS} of the capacity it measured")
    g.add_argument("--auto-fractions", type=float, nargs="+", default=list(AUTO_FRACTIONS),
                   help="with --rates auto: the rates, as fractions of the measured capacity")
    g.add_argument("--num-prompts", type=int, default=200, help="requests per rate (and at rate inf); default 200")
    g.add_argument("--seconds-per-rate", type=float, default=None,
                   help="finite rates send rate x this many requests instead (at least --min-prompts)")
    g.add_argument("--min-prompts", type=int, default=20, help="fewest requests at a finite rate (20)")
    g.add_argument("--max-prompts", type=int, default=None, help="most requests at a finite rate (no limit)")
    g.add_argument("--warmup", type=int, default=8, help="requests sent (and discarded) before measuring (8)")
    g.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput: TTFT target, ms (1000)")
    g.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput: TPOT target, ms (100)")
    g.add_argument("--offline", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the same requests through LLM.generate (default: on unless --url)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds a request (or start-up) may take (600)")
    g.add_argument("--request-seed", type=int, default=0, help="seed of lengths, prompts and arrivals (0)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kvlab.serve.cli import check_engine_flags

    check_engine_flags(args, parser)
    if "auto" in args.rates and len(args.rates) > 1:
        parser.error("--rates auto stands alone (it picks the rates itself)")
    if not all(f > 0 for f in args.auto_fractions):
        parser.error("--auto-fractions must all be > 0")
    for name in ("num_prompts", "min_prompts", "max_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_prompts is not None and args.max_prompts < args.min_prompts:
        parser.error(f"--max-prompts {args.max_prompts} is below --min-prompts {args.min_prompts}")
    if args.warmup < 0 or args.max_len < 2 or not args.timeout > 0:
        parser.error("--warmup must be >= 0, --max-len >= 2, --timeout > 0")
    if not 0 <= args.token_range[0] < args.token_range[1]:
        parser.error("--token-range LO HI needs 0 <= LO < HI")
    if args.offline is None:
        args.offline = args.url is None
    result = run_benchmark(args)
    print("\n" + summary_table(result))
    return 0 if all(r["failed"] == 0 for r in result["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvlab bench serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), parser)


if __name__ == "__main__":
    raise SystemExit(main())
