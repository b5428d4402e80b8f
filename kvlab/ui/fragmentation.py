"""Figures and the interactive explorer of notebook 04 (KV memory fragmentation).

Every number comes from `kvlab.fragmentation` and `kvlab.workloads` (the simulator, the
paper's setting, `run_policies`, `block_size_sweep`); this module only draws them.

    from kvlab.ui.fragmentation import FragmentationExplorer, plot_breakdown, plot_memory_maps
    FragmentationExplorer()          # display it in a notebook; .update() recomputes
"""

from __future__ import annotations

import html
import io

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvlab import checks, workloads
from kvlab.fragmentation import (CATEGORIES, PAPER_NAMES, PAPER_TOKEN_STATES, POLICIES, USED_OR_LOST,
                                 AllocationResult, opt13b_capacity_tokens, simulate_allocation)
from kvlab.ui.widgets import Dropdown, SelectionSlider

COLORS = {"free": "#f2f2f2", "token_states": "#4c72b0", "reservation": "#8fbce6",
          "internal_fragmentation": "#dd8452", "external_fragmentation": "#c44e52"}
LABELS = {"free": "free", "token_states": "token states", "reservation": "reservation",
          "internal_fragmentation": "internal fragmentation", "external_fragmentation": "external fragmentation"}
WORKLOADS = {"sharegpt-like": workloads.sharegpt_like, "alpaca-like": workloads.alpaca_like,
             "uniform": workloads.uniform}


def plot_memory_map(result: AllocationResult, ax=None, title: str | None = None):
    """Slots (rows) x steps (columns), each cell coloured by its category."""
    if result.memory_map is None:
        raise ValueError("this result has no memory map: run simulate_allocation(..., record_map=True)")
    ax = ax or plt.gca()
    cmap = ListedColormap([COLORS[c] for c in CATEGORIES])
    ax.imshow(result.memory_map, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5,
              vmax=len(CATEGORIES) - 0.5, origin="lower")
    f = result.fractions()
    ax.set_title(title or f"{result.config.policy}: {f['token_states']:.0%} token states, "
                          f"batch {result.mean_batch_size:.1f}", fontsize=9)
    ax.set_xlabel("decode step")
    ax.set_ylabel("KV slot (address)")
    return ax


def legend_handles():
    return [Patch(color=COLORS[c], label=LABELS[c]) for c in CATEGORIES]


def plot_memory_maps(results: dict[str, AllocationResult], ncols: int = 2):
    """One memory map per policy, on a shared time axis."""
    nrows = -(-len(results) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(11, 2.6 * nrows), sharex=True, squeeze=False)
    steps = max(res.num_steps for res in results.values())
    for ax, (name, res) in zip(axes.flat, results.items()):
        plot_memory_map(res, ax)
        ax.set_xlim(-0.5, steps - 0.5)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    fig.legend(handles=legend_handles(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_breakdown(results: dict[str, AllocationResult], ax=None, paper: bool = True, title: str | None = None,
                   labels: bool = True):
    """Figure-2-style stacked bars: shares of the KV memory in use or lost, per policy (labels: % on the bars)."""
    ax = ax or plt.gca()
    names = list(results)
    bottom = np.zeros(len(names))
    for c in USED_OR_LOST:
        share = np.array([results[p].fractions()[c] for p in names]) * 100
        ax.bar(range(len(names)), share, bottom=bottom, color=COLORS[c], label=LABELS[c], width=0.65)
        for x, (b, v) in enumerate(zip(bottom, share)):
            if labels and v >= 6:
                ax.text(x, b + v / 2, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if c in ("token_states", "external_fragmentation") else "black")
        bottom += share
    if paper:
        for x, p in enumerate(names):
            if p in PAPER_TOKEN_STATES:
                y = PAPER_TOKEN_STATES[p] * 100
                ax.plot([x - 0.36, x + 0.36], [y, y], color="black", ls="--", lw=1.2)
        ax.plot([], [], color="black", ls="--", lw=1.2, label="paper: token states")
    ax.set_xticks(range(len(names)), [f"{p}\n({PAPER_NAMES.get(p, p)})" for p in names], fontsize=8)
    ax.set_ylabel("% of KV memory in use or lost")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title or "where the KV memory goes", fontsize=10)
    return ax


def plot_batch_sizes(results: dict[str, AllocationResult], ax=None, labels: bool = True):
    """Mean (bar) and peak (tick) running requests per policy."""
    ax = ax or plt.gca()
    names = list(results)
    mean = [results[p].mean_batch_size for p in names]
    ax.bar(range(len(names)), mean, color=COLORS["token_states"], width=0.65)
    ax.scatter(range(len(names)), [results[p].peak_batch_size for p in names], marker="_", s=300,
               color="black", label="peak")
    for x, v in enumerate(mean if labels else []):
        ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("running requests (batch size)")
    ax.legend(fontsize=7)
    ax.set_title("batch size the memory allows", fontsize=10)
    return ax


def plot_block_size_sweep(sweep: dict, ax=None):
    """Left axis: unfilled share of paged memory; right axis: block-table entries per running request."""
    ax = ax or plt.gca()
    bs = sweep["block_size"]
    ax.plot(bs, sweep["unfilled_share"] * 100, "o-", color=COLORS["internal_fragmentation"],
            label="unfilled slots in last blocks (%)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("% of held slots not holding tokens", color=COLORS["internal_fragmentation"])
    ax2 = ax.twinx()
    ax2.plot(bs, sweep["table_entries"], "s-", color=COLORS["token_states"], label="block-table entries")
    ax2.set_yscale("log")
    ax2.set_ylabel("block-table entries per running request", color=COLORS["token_states"])
    ax.set_title("block size: waste in the last block vs the size of the block table", fontsize=10)
    return ax, ax2


POLICY_COLORS = {"max-reserve": "#dd8452", "pow2": "#937860", "oracle": "#8172b3", "paged": "#4c72b0"}


def plot_latency_vs_rate(sweep: dict, service_rates: dict | None = None, ax=None, ymax: float = 30.0):
    """Normalized latency (steps per output token) against request rate, one line per policy (the
    shape of the vLLM paper's Figure 12); dotted verticals at each policy's service rate."""
    ax = ax or plt.gca()
    rates = sweep["rate"]
    for policy in (p for p in POLICY_COLORS if p in sweep):
        color = POLICY_COLORS[policy]
        ax.plot(rates, sweep[policy]["normalized_latency"], "o-", ms=3, color=color, label=policy)
        if service_rates and policy in service_rates:
            ax.axvline(service_rates[policy], color=color, ls=":", lw=1.2)
    ax.set_ylim(0, ymax)
    ax.set_xlabel("request rate (requests per decode step)")
    ax.set_ylabel("normalized latency (steps per output token)")
    ax.set_title("latency against request rate (dotted: service rate)", fontsize=10)
    ax.legend(fontsize=8)
    return ax


def plot_serving_cost(costs: dict, ax=None):
    """Stacked bars: modeled GPU seconds per policy (kvlab.fragmentation.serving_cost), by part."""
    ax = ax or plt.gca()
    names = list(costs)
    bottom = np.zeros(len(names))
    parts = [("weight_seconds", "read the weights (every step)", "#4c72b0"),
             ("kv_seconds", "read the cached K/V (every step)", "#8fbce6"),
             ("prefill_seconds", "prefill, recomputation included", "#c44e52")]
    for attr, label, color in parts:
        seconds = np.array([getattr(costs[p], attr) for p in names])
        ax.bar(range(len(names)), seconds, bottom=bottom, color=color, label=label, width=0.65)
        bottom += seconds
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("modeled GPU seconds for the trace")
    ax.set_title("what the trace costs, by part", fontsize=10)
    ax.legend(fontsize=7)
    return ax


class FragmentationExplorer(W.VBox):
    """Sliders for block size, KV capacity, arrival rate, max length and workload; bars and batch sizes redraw.

    A callback never raises: a setting under which a policy cannot run (say max-reserve with regions
    larger than the KV memory) is said in the message area, the other policies are drawn, and the
    figure and table always show the current inputs.
    """

    RATES = [("all at once", None), ("0.02 / step", 0.02), ("0.05 / step", 0.05), ("0.1 / step", 0.1),
             ("0.2 / step", 0.2)]

    def __init__(self, n: int = 5000, seed: int = 0, kv_gib: float = 12.0, block_size: int = 16,
                 max_seq_len: int = 2048, rate: float | None = 0.1, workload: str = "sharegpt-like"):
        self.n = checks.integer("n", n, minimum=1, allowed="a positive integer (requests per run)")
        self.seed = checks.integer("seed", seed, minimum=0)
        kv_gib = checks.in_range("kv_gib", kv_gib, 2, 40, "a number of GiB in [2, 40] (the slider's range)")
        style = {"description_width": "130px"}
        layout = W.Layout(width="420px")
        self.block_size = SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=block_size,
                                          description="block size", style=style, layout=layout,
                                          name="FragmentationExplorer block_size")
        self.kv_gib = W.FloatSlider(value=kv_gib, min=2, max=40, step=1, description="KV GiB (OPT-13B)",
                                    style=style, layout=layout)
        self.rate = Dropdown(options=self.RATES, value=rate, description="arrival rate", style=style,
                             layout=layout, name="FragmentationExplorer rate")
        self.max_seq_len = SelectionSlider(options=[512, 1024, 2048, 4096], value=max_seq_len,
                                           description="max length", style=style, layout=layout,
                                           name="FragmentationExplorer max_seq_len")
        self.workload = Dropdown(options=list(WORKLOADS), value=workload, description="workload",
                                 style=style, layout=layout, name="FragmentationExplorer workload")
        self.readout = W.HTML()
        self.message = W.HTML()             # errors: what could not run, and why
        self.image = W.Image(format="png")  # the figure, rendered once per update (no pyplot state)
        controls = [self.workload, self.rate, self.kv_gib, self.max_seq_len, self.block_size]
        for c in controls:
            c.observe(lambda _: self.update(), names="value")
        super().__init__([W.HBox([W.VBox(controls + [self.message]), self.readout]), self.image])
        self.results: dict[str, AllocationResult] = {}
        self.errors: dict[str, str] = {}
        self.capacity: int | None = None
        self.update()

    def compute(self) -> dict[str, AllocationResult]:
        """Draw the workload and run the four policies with the current settings. A policy that cannot
        run under them is left out of `results`, with the reason in `errors`."""
        self.results, self.errors, self.capacity = {}, {}, None
        make = WORKLOADS[self.workload.value]
        wl = make(self.n, self.seed, rate=self.rate.value, max_len=self.max_seq_len.value)
        self.capacity = capacity = opt13b_capacity_tokens(self.kv_gib.value)
        for policy in POLICIES:
            try:
                self.results[policy] = simulate_allocation(wl, policy, capacity, self.max_seq_len.value,
                                                           self.block_size.value)
            except ValueError as err:
                self.errors[policy] = str(err)
        return self.results

    def update(self):
        """Recompute and redraw; never raises (it is the controls' callback): errors go to the message area."""
        try:
            self.compute()
        except Exception as err:  # noqa: BLE001  (a callback must not raise: show it instead)
            self.results, self.errors = {}, {"settings": f"{type(err).__name__}: {err}"}
        self.message.value = "".join(f"<p style='color:#c44e52'><b>{html.escape(k)}</b>: {html.escape(v)}</p>"
                                     for k, v in self.errors.items())
        res = self.results
        rows = "".join(f"<tr><td>{p}</td>" + "".join(f"<td>{v:.1%}</td>" for v in r.fractions().values())
                       + f"<td>{r.mean_batch_size:.1f}</td><td>{r.num_rejected}</td></tr>" for p, r in res.items())
        rows += "".join(f"<tr><td>{p}</td><td colspan='6'>cannot run (see the message)</td></tr>"
                        for p in self.errors if p in POLICIES)
        slots = f"{self.capacity:,}" if self.capacity is not None else "?"
        self.readout.value = (f"<b>{slots}</b> KV slots; {self.n:,} requests<br>"
                              "<table><tr><th>policy</th><th>tokens</th><th>reserved</th><th>internal</th>"
                              f"<th>external</th><th>batch</th><th>rejected</th></tr>{rows}</table>")
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        self.image.value = buf.getvalue()

    def figure(self) -> Figure:
        """The bars and batch sizes of the last compute() (a note instead where nothing could run)."""
        fig = Figure(figsize=(11, 3.4), dpi=72)
        if not self.results:
            fig.text(0.5, 0.5, "nothing to draw: " + "; ".join(self.errors.values())[:150], ha="center",
                     va="center", wrap=True)
            return fig
        a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
        plot_breakdown(self.results, a, paper=False, labels=False,  # numbers are in the table: text is slow to draw
                       title=f"{self.workload.value}, block {self.block_size.value}, max {self.max_seq_len.value}")
        plot_batch_sizes(self.results, b, labels=False)
        fig.subplots_adjust(left=0.06, right=0.99, bottom=0.17, top=0.92, wspace=0.55)  # fixed: tight_layout costs a draw
        return fig
