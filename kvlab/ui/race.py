"""Figures and text of the race: kvlab against Hugging Face (notebook 07, kvlab.bench.engine's results).

    plot_race(summaries)                   tokens/s of each system in one race, with kvlab's speed-up
    plot_gpu_workloads(result)             a committed bench.engine run: tokens/s per system and workload
    speedup_table(result)                  the same as a short table: kvlab's speed-up over each system
    plot_concurrency(result)               tokens/s against concurrent requests, and kvlab's speed-up
    concurrency_table(result)              the same as a short table
    decode_step_lines(result)              kvlab's decode step against its bandwidth bound

Results are read with kvlab.bench.results (load, provenance, workload_table, concurrency_series);
every figure and table carries the result's provenance: card, date and kvlab commit.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from kvlab.bench.results import concurrency_series, flat_baselines, provenance, ran, workload_table

SYSTEM_LABELS = {"kvlab": "kvlab (continuous batching, paged)", "hf_padded": "HF padded batch",
                 "hf_static_compile": "HF static cache + compile", "hf_continuous": "HF continuous batching",
                 "hf_one_at_a_time": "HF one at a time", "hf_threads": "HF thread per request"}
SYSTEM_COLORS = {"kvlab": "#55a868", "hf_padded": "#4c72b0", "hf_static_compile": "#8172b3",
                 "hf_continuous": "#937860", "hf_one_at_a_time": "#c44e52", "hf_threads": "#dd8452"}


def plot_race(summaries: dict[str, dict], ax=None, title: str = "the race", labels: dict | None = None):
    """Generated tokens per second of each system (summaries as `Run.summary()` / the benchmark JSON),
    fastest on top, each bar labelled with its ratio to kvlab. labels: names to show instead of
    SYSTEM_LABELS' for some systems."""
    labels = {**SYSTEM_LABELS, **(labels or {})}
    rows = [(k, v["tokens_per_s"]) for k, v in summaries.items() if ran(v)]
    rows.sort(key=lambda r: r[1])
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.2), constrained_layout=True)
    ax.barh([labels.get(k, k) for k, _ in rows], [v for _, v in rows],
            color=[SYSTEM_COLORS.get(k, "#8c8c8c") for k, _ in rows])
    ref = summaries.get("kvlab", {}).get("tokens_per_s")
    for i, (k, v) in enumerate(rows):
        note = f"{v:,.0f} tok/s" + (f"  (kvlab {ref / v:.1f}x)" if ref and k != "kvlab" else "")
        ax.text(v, i, " " + note, va="center", fontsize=8)
    ax.set_xlim(0, 1.35 * max(v for _, v in rows))
    ax.set_xlabel("generated tokens per second (higher is better)")
    ax.set_title(title, fontsize=10)
    return ax



def plot_gpu_workloads(result: dict, axes=None):
    """Tokens/s of every system on each GPU workload (log scale: the systems differ by orders of magnitude)."""
    names = sorted(result["workloads"])
    if axes is None:
        _, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 3.4), squeeze=False,
                               constrained_layout=True)
        axes = axes[0]
    for ax, w in zip(axes, names):
        res = result["workloads"][w]
        rows = workload_table(result, w)[::-1]
        ax.barh([SYSTEM_LABELS.get(k, k) for k, _, _ in rows], [v for _, v, _ in rows],
                color=[SYSTEM_COLORS.get(k, "#8c8c8c") for k, _, _ in rows])
        for i, (k, v, x) in enumerate(rows):
            ax.text(v, i, f" {v:,.0f}" + (f" (kvlab {x:,.1f}x)" if x else ""), va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(right=max(v for _, v, _ in rows) * 30)
        ax.set_title(f"workload {w}: {res['requests']} requests, {res['generated_tokens']:,} tokens", fontsize=9)
        ax.set_xlabel(f"generated tokens/s, log scale ({provenance(result)})", fontsize=8)
    return axes


def plot_concurrency(result: dict, axes=None):
    """Tokens/s against the number of concurrent requests (left; one request at a time is a flat line:
    its throughput does not depend on how many wait) and kvlab's speed-up over each baseline (right)."""
    series = concurrency_series(result)
    if not series:
        raise ValueError("the result has no 'concurrency' sweep")
    flat = flat_baselines(result)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    a, b = axes
    ns = sorted({n for xs, _ in series.values() for n in xs})
    for k, (xs, vals) in series.items():
        a.plot(xs, vals, "o-", color=SYSTEM_COLORS.get(k, "#8c8c8c"), label=SYSTEM_LABELS.get(k, k))
    for k, v in flat.items():
        a.plot([ns[0], ns[-1]], [v, v], "--", color=SYSTEM_COLORS.get(k, "#8c8c8c"),
               label=f"{SYSTEM_LABELS.get(k, k)} (any concurrency)")
    a.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="generated tokens/s")
    a.set_title(f"throughput ({provenance(result)})", fontsize=8)
    a.legend(fontsize=8)
    if "kvlab" in series:
        kv = dict(zip(*series["kvlab"]))
        bases = {k: dict(zip(*v)) for k, v in series.items() if k != "kvlab"}
        bases.update({k: dict.fromkeys(kv, v) for k, v in flat.items()})
        for k, base in bases.items():
            common = [(n, kv[n] / base[n]) for n in sorted(kv) if base.get(n)]
            if common:
                b.plot(*zip(*common), "o-" if k not in flat else "o--", color=SYSTEM_COLORS.get(k, "#8c8c8c"),
                       label=f"kvlab / {SYSTEM_LABELS.get(k, k)}")
        b.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="kvlab's speed-up (x), log scale")
        b.set_title("kvlab's speed-up against each baseline", fontsize=9)
        b.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
    return axes


def speedup_table(result: dict) -> list[str]:
    """kvlab's speed-up over every other system, one row per system, one column per workload (with kvlab's
    own tokens/s on the first row); '-' where a system did not run on a workload."""
    names = sorted(result["workloads"])
    tables = {w: {k: (v, x) for k, v, x in workload_table(result, w)} for w in names}
    systems = [k for k in SYSTEM_LABELS if any(k in t for t in tables.values())]
    head = f"{'':<40}" + "".join(f"{'workload ' + w:>14}" for w in names)
    lines = [head, f"{'kvlab, tokens/s':<40}" + "".join(
        f"{tables[w]['kvlab'][0]:>14,.0f}" if "kvlab" in tables[w] else f"{'-':>14}" for w in names)]
    for k in systems:
        if k == "kvlab":
            continue
        ran = {result["workloads"][w]["systems"][k].get("num_requests") or result["workloads"][w]["requests"]
               for w in names if k in tables[w]}
        every = {result["workloads"][w]["requests"] for w in names if k in tables[w]}
        label = SYSTEM_LABELS[k] + (f" (first {min(ran)})" if len(ran) == 1 and ran != every else "")
        lines.append(f"{'kvlab / ' + label:<40}" + "".join(
            f"{tables[w][k][1]:>13,.1f}x" if k in tables[w] and tables[w][k][1] else f"{'-':>14}" for w in names))
    return lines


def concurrency_table(result: dict) -> list[str]:
    """The concurrency sweep: tokens/s of kvlab and HF's padded batch at each request count, kvlab's speed-up
    over it (and over HF one at a time, whose rate does not depend on the count), and each one's median time
    per output token (TPOT)."""
    sweep = result.get("concurrency") or {}
    series = {k: dict(zip(*v)) for k, v in concurrency_series(result).items()}
    if "kvlab" not in series or "hf_padded" not in series:
        return []
    one = flat_baselines(result).get("hf_one_at_a_time")
    lines = [f"{'requests':>8} {'kvlab tok/s':>12} {'HF padded tok/s':>16} {'kvlab / HF padded':>18}"
             + (f" {'kvlab / one at a time':>22}" if one else "") + f" {'TPOT p50: kvlab':>16} {'HF padded':>10}"]
    for n in sorted(series["kvlab"]):
        e = sweep[str(n)]
        k, h = series["kvlab"][n], series["hf_padded"].get(n)
        tpot = lambda key: f"{1e3 * e[key]:.1f} ms" if e.get(key) is not None else "-"
        lines.append(f"{n:>8} {k:>12,.0f} {h:>16,.0f} {k / h:>17.1f}x" + (f" {k / one:>21,.0f}x" if one else "")
                     + f" {tpot('kvlab_tpot_p50_s'):>16} {tpot('hf_padded_tpot_p50_s'):>10}")
    if one:
        n = result["workloads"]["A"]["systems"]["hf_one_at_a_time"].get("num_requests")
        lines.append(f"HF one at a time: {one:,.1f} tok/s at any concurrency (workload A's first {n} requests)")
    return lines


def decode_step_lines(result: dict) -> list[str]:
    """kvlab's decode step at each measured batch against the bandwidth bound (weights + K/V read once at the
    measured copy bandwidth): its period with CUDA graphs, synchronous and with asynchronous scheduling, each
    beside the GPU's time in it; eager; and the engine before the redesign on the same card, if measured."""
    decode = result.get("decode_step") or {}
    before = result.get("decode_step_before") or {}
    lines = []
    for key in sorted((k for k in decode if k.startswith("batch_")), key=lambda k: int(k.split("_")[1])):
        d = decode[key]
        sync, eager = d["cuda_graph"], d["eager"]
        lines.append(f"decode step at {key.replace('_', ' ')}, context {d['context']}: bound {d['bound_ms']:.2f} ms "
                     f"(weights + K/V at {decode['copy_bandwidth_GB_s']:,.0f} GB/s)")
        lines.append(f"  synchronous   {sync['step_ms']:.2f} ms, of which the GPU {sync['device_ms']:.2f} ms "
                     f"(step / GPU {sync['step_ms'] / sync['device_ms']:.2f}); eager {eager['step_ms']:.2f} ms")
        if "async" in d:
            a = d["async"]
            lines.append(f"  asynchronous  {a['step_ms']:.2f} ms, of which the GPU {a['device_ms']:.2f} ms "
                         f"(step / GPU {a['step_ms'] / a['device_ms']:.2f}); the host per step: schedule "
                         f"{a['schedule_ms']:.2f}, prepare {a['prepare_ms']:.2f}, launch {a['launch_ms']:.2f}, "
                         f"outputs {a['output_ms']:.2f} ms")
        old = before.get(f"{key}_sync")
        if old:
            env = before.get("environment") or {}
            lines.append(f"  the engine before the redesign (commit {env.get('git_commit') or '?'}, its own run on "
                         f"{env.get('gpu') or 'the same card'}): {old['period_ms']:.2f} ms, of which the GPU "
                         f"{old['device_ms']:.2f} ms (step / GPU {old['period_ms'] / old['device_ms']:.2f})")
    return lines
