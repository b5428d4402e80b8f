"""The KV-cache memory calculator (ipywidgets) and a side-by-side model comparison.

Every number comes from `kvlab.memory`; this module only lays out inputs and draws.

    from kvlab.ui.memory_calculator import MemoryCalculator, ComparisonView, plot_comparison
    MemoryCalculator(model="llama-3-8b", gpu="H100-80GB")     # display it in a notebook
    ComparisonView(["llama-2-7b", "llama-3-8b", "deepseek-v2-lite"])

The calculator's readout is an HTML widget with CSS class `kvlab-results`; the maximum
concurrency sits in `<span class="kvlab-max-concurrency">`, and problems (invalid
combinations, a model that does not fit) in `<div class="kvlab-message">`; the model
dropdown and the context slider carry the classes `kvlab-model` and `kvlab-context`.
These are the handles the browser test (tests/test_browser.py) uses.
"""

from __future__ import annotations

import html
import math

import ipywidgets as W
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from kvlab import checks, memory
from kvlab.model.presets import list_presets
from kvlab.model.spec import ModelSpec
from kvlab.ui.figures import error_html
from kvlab.ui.widgets import Dropdown, IntText, SelectMultiple

CUSTOM = "custom"
DTYPES = list(memory.KV_DTYPE_BITS)
TP_DEGREES = [1, 2, 4, 8, 16]
CONTEXT_MIN, CONTEXT_MAX, CONTEXT_STEP = 128, 163_840, 128
COLORS = {"weights": "#4c72b0", "reserve": "#8c8c8c", "kv": "#dd8452", "free": "#d9d9d9"}


def concurrency_curve(spec: ModelSpec, contexts, **plan_kwargs) -> list[int]:
    """Max concurrent requests at each context length (0 beyond the model's maximum)."""
    out = []
    for c in contexts:
        try:
            out.append(memory.memory_plan(spec, context_len=int(c), **plan_kwargs).max_concurrent_requests)
        except ValueError:
            out.append(0)
    return out


def plot_plan(plan: memory.MemoryPlan, spec: ModelSpec, num_requests: int, plan_kwargs: dict):
    """Left: one GPU's memory, stacked (weights, reserve, KV in use, free). Right: concurrency vs context."""
    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 2.2]})
    gib = memory.GiB
    in_use = min(num_requests, plan.max_concurrent_requests) * plan.kv_bytes_per_request
    parts = [("weights", plan.weight_bytes), ("reserve", plan.reserve_bytes),
             (f"KV in use ({min(num_requests, plan.max_concurrent_requests)} req)", in_use),
             ("free", max(0, plan.gpu_bytes - plan.weight_bytes - plan.reserve_bytes - in_use))]
    bottom = 0.0
    for (label, size), color in zip(parts, COLORS.values()):
        ax_bar.bar(0, size / gib, bottom=bottom, color=color, label=label, width=0.6)
        bottom += size / gib
    ax_bar.axhline(plan.usable_bytes / gib, color="k", ls="--", lw=1, label="usable (utilization)")
    ax_bar.axhline(plan.gpu_bytes / gib, color="k", lw=1.5)
    ax_bar.set_xticks([])
    ax_bar.set_ylabel("GiB per GPU")
    ax_bar.set_ylim(0, max(plan.gpu_bytes, bottom * gib) / gib * 1.05)
    ax_bar.set_title(f"{plan.gpu}" + (f" (TP {plan.tensor_parallel})" if plan.tensor_parallel > 1 else ""), fontsize=10)
    ax_bar.legend(fontsize=7, loc="upper right", framealpha=0.9)

    top = spec.max_position_embeddings or CONTEXT_MAX
    contexts = np.unique(np.geomspace(256, top, 40).astype(int))
    curve = np.array(concurrency_curve(spec, contexts, **plan_kwargs), dtype=float)
    curve[curve == 0] = np.nan   # nothing fits: leave a gap on the log axis
    ax_curve.plot(contexts, curve, color=COLORS["kv"])
    if plan.max_concurrent_requests > 0:
        ax_curve.scatter([plan.context_len], [plan.max_concurrent_requests], color="k", zorder=3,
                         label=f"{plan.context_len:,} tokens: {plan.max_concurrent_requests:,} requests")
    if spec.sliding_window:
        ax_curve.axvline(spec.sliding_window, color="grey", ls=":", label=f"sliding window {spec.sliding_window:,}")
    ax_curve.set_xscale("log", base=2)
    ax_curve.set_xlim(contexts[0] / 1.2, contexts[-1] * 1.2)
    if np.isnan(curve).all():
        ax_curve.text(0.5, 0.5, "does not fit at any context length", transform=ax_curve.transAxes,
                      ha="center", color="#b00020")
        ax_curve.set_yticks([])
    else:
        ax_curve.set_yscale("log")
        ax_curve.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax_curve.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax_curve.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_curve.set_xlabel("context length per request (tokens)")
    ax_curve.set_ylabel("max concurrent requests")
    ax_curve.set_title(f"{spec.name}: concurrency falls as 1 / context", fontsize=10)
    ax_curve.grid(alpha=0.3, which="both")
    if ax_curve.get_legend_handles_labels()[0]:
        ax_curve.legend(fontsize=8)
    fig.tight_layout()
    return fig


class MemoryCalculator:
    """Interactive KV-cache calculator. Display the object (or `.widget`) in a notebook."""

    def __init__(self, model: str = "llama-3-8b", gpu: str = "H100-80GB", context_len: int = 4096,
                 kv_dtype: str = "bfloat16", weight_dtype: str = "bfloat16", tensor_parallel: int = 1,
                 num_requests: int = 16, gpu_memory_utilization: float = 0.9, plot: bool = True):
        # The sliders would move a value outside their range to the nearest end without a word:
        # refuse it instead (the dropdowns and number fields refuse theirs by name, kvlab.ui.widgets).
        context_len = checks.integer("context_len", context_len, CONTEXT_MIN, CONTEXT_MAX,
                                     allowed=f"an integer in {CONTEXT_MIN}..{CONTEXT_MAX:,} (the slider's range)")
        num_requests = checks.integer("num_requests", num_requests, 1, 1024,
                                      allowed="an integer in 1..1024 (the slider's range)")
        gpu_memory_utilization = checks.in_range("gpu_memory_utilization", gpu_memory_utilization, 0.5, 1.0,
                                                 "a number in [0.5, 1] (the slider's range)")
        style = {"description_width": "130px"}
        def layout():   # one Layout per widget: a shared one would hide them all together
            return W.Layout(width="420px")
        self.model = Dropdown(options=list_presets() + [CUSTOM], value=model, description="model",
                              style=style, layout=layout(), name="MemoryCalculator model")
        self.kv_dtype = Dropdown(options=DTYPES, value=kv_dtype, description="KV dtype", style=style,
                                 layout=layout(), name="MemoryCalculator kv_dtype")
        self.weight_dtype = Dropdown(options=DTYPES, value=weight_dtype, description="weight dtype",
                                     style=style, layout=layout(), name="MemoryCalculator weight_dtype")
        self.gpu = Dropdown(options=list(memory.GPUS) + [CUSTOM], value=gpu, description="GPU",
                            style=style, layout=layout(), name="MemoryCalculator gpu")
        self.gpu_gib = W.FloatText(value=48.0, description="GPU memory (GiB)", style=style, layout=layout())
        self.tp = Dropdown(options=TP_DEGREES, value=tensor_parallel, description="tensor parallel",
                           style=style, layout=layout(), name="MemoryCalculator tensor_parallel")
        self.context = W.IntSlider(value=context_len, min=CONTEXT_MIN, max=CONTEXT_MAX, step=CONTEXT_STEP,
                                   description="context (tokens)", continuous_update=False, style=style,
                                   layout=W.Layout(width="560px"))
        self.context.add_class("kvlab-context")     # stable handles for the browser test
        self.model.add_class("kvlab-model")
        self.requests = W.IntSlider(value=num_requests, min=1, max=1024, description="requests in flight",
                                    continuous_update=False, style=style, layout=W.Layout(width="560px"))
        self.utilization = W.FloatSlider(value=gpu_memory_utilization, min=0.5, max=1.0, step=0.01,
                                         description="GPU utilization", continuous_update=False,
                                         style=style, layout=W.Layout(width="560px"))
        # custom model fields, shown when model == "custom"
        def number(value: int, description: str) -> IntText:   # 2.5 layers is refused, not read as 2
            return IntText(value=value, description=description, style=style, layout=layout(),
                           name=f"MemoryCalculator custom {description}")
        self.c_layers = number(32, "layers")
        self.c_heads = number(32, "query heads")
        self.c_kv_heads = number(8, "KV heads")
        self.c_head_dim = number(128, "head dim")
        self.c_attention = Dropdown(options=["mha", "gqa", "mqa", "mla"], value="gqa", description="attention",
                                    style=style, layout=layout(), name="MemoryCalculator custom attention")
        self.c_latent = number(512, "MLA latent (rank)")
        self.c_rope = number(64, "MLA RoPE key dim")
        self.c_params_b = W.FloatText(value=8.0, description="params (billions)", style=style, layout=layout())
        self.custom_box = W.VBox([self.c_layers, self.c_heads, self.c_kv_heads, self.c_head_dim, self.c_attention,
                                  self.c_latent, self.c_rope, self.c_params_b])

        self.results = W.HTML()
        self.results.add_class("kvlab-results")
        self.plot_out = W.Output()
        self._plot = plot
        self.plan: memory.MemoryPlan | None = None
        self.error: str | None = None

        inputs = [self.model, self.kv_dtype, self.weight_dtype, self.gpu, self.gpu_gib, self.tp, self.context,
                  self.requests, self.utilization] + list(self.custom_box.children)
        for w in inputs:
            w.observe(self._on_change, names="value")
        left = W.VBox([self.model, self.custom_box, self.gpu, self.gpu_gib, self.tp, self.kv_dtype,
                       self.weight_dtype], layout=W.Layout(min_width="440px"))
        self.results.layout = W.Layout(margin="0 0 0 24px", min_width="420px")
        self.widget = W.VBox([W.HBox([left, self.results]), self.context, self.requests, self.utilization,
                              self.plot_out])
        self.widget.add_class("kvlab-memory-calculator")
        self.update()

    # ---- the model ---------------------------------------------------------------------------
    def spec(self) -> ModelSpec:
        if self.model.value != CUSTOM:
            return ModelSpec.preset(self.model.value)
        fields = [self.c_layers, self.c_heads, self.c_head_dim] + ([self.c_kv_heads] if self.c_attention.value == "gqa" else [])
        for w in fields:
            if not w.value > 0:
                raise ValueError(f"custom model: {w.description} must be a positive integer, got {w.value}")
        attention = self.c_attention.value
        # the KV-heads field is shown (and read) for GQA only; MLA caches one latent, no K/V heads of its own
        kv_heads = {"mha": self.c_heads.value, "mqa": 1, "mla": self.c_heads.value}.get(attention, self.c_kv_heads.value)
        if attention == "gqa" and kv_heads == self.c_heads.value:
            raise ValueError("GQA needs fewer KV heads than query heads (equal is MHA)")
        if attention == "mla" and not (self.c_latent.value > 0 and self.c_rope.value > 0):
            raise ValueError("MLA needs a positive latent rank and RoPE key dim")
        params = self.c_params_b.value
        if not (math.isfinite(params) and params > 0):
            raise ValueError(f"params (billions) must be a positive finite number, got {params}")
        if params * 1e9 >= 2**63:
            raise ValueError(f"params (billions) must be below 9.2e9 billion (2**63 parameters), got {params:g}")
        return ModelSpec(
            name="custom", num_layers=self.c_layers.value, hidden_size=self.c_heads.value * self.c_head_dim.value,
            num_heads=self.c_heads.value, num_kv_heads=kv_heads, head_dim=self.c_head_dim.value,
            intermediate_size=4 * self.c_heads.value * self.c_head_dim.value, vocab_size=32000,
            attention=attention, kv_lora_rank=self.c_latent.value if attention == "mla" else None,
            qk_rope_head_dim=self.c_rope.value if attention == "mla" else None,
            num_params=int(params * 1e9), source="typed in the calculator")

    def plan_kwargs(self) -> dict:
        if self.gpu.value == CUSTOM:
            gib = self.gpu_gib.value
            if not (math.isfinite(gib) and gib > 0):
                raise ValueError(f"GPU memory must be a positive finite number of GiB, got {gib}")
            gpu = int(gib * memory.GiB)
            if not 1 <= gpu < 2**63:
                raise ValueError(f"GPU memory must be at least 1 byte and below 2**63 bytes (8 EiB), got {gib:g} GiB")
        else:
            gpu = self.gpu.value
        return dict(gpu=gpu, weight_dtype=self.weight_dtype.value, kv_dtype=self.kv_dtype.value,
                    gpu_memory_utilization=self.utilization.value, tensor_parallel=self.tp.value)

    # ---- reacting to input ---------------------------------------------------------------------
    def _on_change(self, change) -> None:
        self.update()

    def update(self) -> None:
        custom = self.model.value == CUSTOM
        self.custom_box.layout.display = None if custom else "none"
        for w in (self.c_latent, self.c_rope):
            w.layout.display = None if self.c_attention.value == "mla" else "none"
        self.c_kv_heads.layout.display = None if self.c_attention.value == "gqa" else "none"
        self.gpu_gib.layout.display = None if self.gpu.value == CUSTOM else "none"
        try:
            spec = self.spec()
            kwargs = self.plan_kwargs()
            plan = memory.memory_plan(spec, context_len=self.context.value, **kwargs)
            if self._plot:   # draw first, so the numbers and the figure on screen always agree
                with self.plot_out:
                    self.plot_out.clear_output(wait=True)
                    fig = plot_plan(plan, spec, self.requests.value, kwargs)
                    display(fig)
                    plt.close(fig)
            rendered = self._render(plan, spec)
        except (ValueError, TypeError) as err:   # invalid input: say so in the widget, never a traceback
            self._show_error(str(err))
            return
        except Exception as err:                  # a bug: still shown here, never raised out of a callback
            self._show_error(f"internal error ({type(err).__name__}: {err}); please report it")
            return
        self.plan, self.error = plan, None
        self.results.value = rendered

    def _show_error(self, message: str) -> None:
        """No plan: the readout says why, the figure is cleared, nothing stale stays on screen."""
        self.plan, self.error = None, message
        self.results.value = self._render_error(message)
        self.plot_out.clear_output()

    # ---- rendering -------------------------------------------------------------------------------
    def _render(self, plan: memory.MemoryPlan, spec: ModelSpec) -> str:
        hb = memory.human_bytes
        tp = plan.tensor_parallel
        in_flight = self.requests.value * plan.kv_bytes_per_request
        rows = [
            ("KV per token", f"{hb(plan.kv_bytes_per_token)} ({plan.kv_bytes_per_token:,} B)"),
            (f"KV per request ({plan.context_len:,} tok)", hb(plan.kv_bytes_per_request)),
            (f"KV for {self.requests.value} requests", hb(in_flight)),
            ("weights" + (f" (1/{tp} per GPU)" if tp > 1 else ""), hb(plan.weight_bytes)),
            ("KV budget", hb(plan.kv_budget_bytes)),
            ("max cached tokens", f"{plan.max_cached_tokens:,}"),
        ]
        body = "".join(f"<tr><td style='padding-right:1em'>{k}</td><td style='text-align:right'>{v}</td></tr>"
                       for k, v in rows)
        body += ("<tr><td><b>max concurrent requests</b></td><td style='text-align:right'><b>"
                 f"<span class='kvlab-max-concurrency'>{plan.max_concurrent_requests}</span></b></td></tr>")
        messages = list(plan.notes)
        if plan.fits and self.requests.value > plan.max_concurrent_requests:
            messages.append(f"{self.requests.value} requests do not fit at once: at most "
                            f"{plan.max_concurrent_requests}; the rest wait or are preempted")
        color = "#b00020" if not plan.fits else "#8a6d00"
        msg = "".join(f"<div class='kvlab-message' style='color:{color}'>{'⚠ ' if not plan.fits else ''}"
                      f"{html.escape(m)}</div>" for m in messages)
        title = f"<b>{html.escape(spec.name)}</b> ({spec.attention.upper()}) on {html.escape(plan.gpu)}"
        return f"<div style='font-family:monospace;font-size:13px'>{title}<table>{body}</table>{msg}</div>"

    @staticmethod
    def _render_error(message: str) -> str:
        return ("<div style='font-family:monospace;font-size:13px'>"
                "<table><tr><td><b>max concurrent requests</b></td><td><b>"
                "<span class='kvlab-max-concurrency'>n/a</span></b></td></tr></table>"
                f"{error_html(message)}</div>")

    def _ipython_display_(self):
        display(self.widget)


# ---- comparison ---------------------------------------------------------------------------------

def compare(models, gpu="H100-80GB", context_len: int = 4096, kv_dtype="bfloat16", weight_dtype="bfloat16",
            tensor_parallel: int = 1, gpu_memory_utilization: float = 0.9) -> list[dict]:
    """One row per model: KV bytes per token and max concurrency on the same GPU and context.

    A model whose context maximum is below context_len, or whose TP degree is invalid, gets an `error`.
    """
    rows = []
    for name in models:
        spec = ModelSpec.preset(name) if isinstance(name, str) else name
        row = {"model": spec.name, "attention": spec.attention, "kv_bytes_per_token": None,
               "max_concurrent_requests": None, "fits": False, "error": None}
        try:
            plan = memory.memory_plan(spec, gpu=gpu, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                                      context_len=context_len, tensor_parallel=tensor_parallel,
                                      gpu_memory_utilization=gpu_memory_utilization)
            row.update(kv_bytes_per_token=plan.kv_bytes_per_token, max_concurrent_requests=plan.max_concurrent_requests,
                       fits=plan.fits)
        except ValueError as err:
            row["error"] = str(err)
        rows.append(row)
    return rows


def plot_comparison(models, gpu="H100-80GB", context_len: int = 4096, **kwargs):
    """Bars side by side: KV KiB per token (left) and max concurrent requests (right)."""
    if isinstance(models, (str, ModelSpec)) or not hasattr(models, "__iter__"):
        raise TypeError(f"models must be a list of preset names or ModelSpecs, got {checks.shown(models)}")
    models = list(models)
    if not models:
        raise ValueError("models is empty: plot_comparison needs at least one preset name or ModelSpec "
                         "(kvlab.list_presets() names them)")
    rows = compare(models, gpu=gpu, context_len=context_len, **kwargs)
    names = [r["model"] for r in rows]
    colors = [{"mha": "#4c72b0", "gqa": "#55a868", "mqa": "#c44e52", "mla": "#8172b2"}[r["attention"]] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.4), sharey=True)
    y = np.arange(len(rows))
    per_token = [(r["kv_bytes_per_token"] or 0) / 1024 for r in rows]
    a.barh(y, per_token, color=colors)
    for yi, v, r in zip(y, per_token, rows):
        a.text(v, yi, f" {v:,.0f}" if r["error"] is None else " n/a", va="center", fontsize=8)
    a.set_yticks(y, names)
    a.invert_yaxis()
    a.set_xlabel(f"KV KiB per token ({kwargs.get('kv_dtype', 'bfloat16')}, per GPU)")
    conc = [r["max_concurrent_requests"] or 0 for r in rows]
    b.barh(y, conc, color=colors)
    for yi, v, r in zip(y, conc, rows):
        label = f" {v:,}" if r["error"] is None else " n/a (" + r["error"].split(";")[0][:40] + ")"
        if r["error"] is None and not r["fits"]:
            label = " 0 (does not fit)"
        b.text(v, yi, label, va="center", fontsize=8)
    b.set_xlabel(f"max concurrent requests at {context_len:,} tokens on {gpu}")
    for ax in (a, b):
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(0, max(max(per_token if ax is a else conc), 1) * 1.35)
    fig.suptitle("color = attention kind: MHA blue, GQA green, MQA red, MLA purple", fontsize=9)
    fig.tight_layout()
    return fig


class ComparisonView:
    """Several models side by side on the same GPU and context (KV per token and max concurrency)."""

    def __init__(self, models=("llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "falcon-7b", "deepseek-v2-lite"),
                 gpu: str = "H100-80GB", context_len: int = 4096, kv_dtype: str = "bfloat16"):
        context_len = checks.integer("context_len", context_len, CONTEXT_MIN, 32768,
                                     allowed=f"an integer in {CONTEXT_MIN}..32,768 (the slider's range)")
        if isinstance(models, str) or not hasattr(models, "__iter__"):
            raise TypeError(f"models must be a list of preset names, got {checks.shown(models)}")
        style = {"description_width": "110px"}
        self.models = SelectMultiple(options=list_presets(), value=tuple(models), rows=8, description="models",
                                     style=style, name="ComparisonView models")
        self.gpu = Dropdown(options=list(memory.GPUS), value=gpu, description="GPU", style=style,
                            name="ComparisonView gpu")
        self.kv_dtype = Dropdown(options=DTYPES, value=kv_dtype, description="KV dtype", style=style,
                                 name="ComparisonView kv_dtype")
        self.context = W.IntSlider(value=context_len, min=CONTEXT_MIN, max=32768, step=CONTEXT_STEP,
                                   description="context (tokens)", continuous_update=False, style=style,
                                   layout=W.Layout(width="520px"))
        self.out = W.Output()
        for w in (self.models, self.gpu, self.kv_dtype, self.context):
            w.observe(lambda change: self.update(), names="value")
        self.widget = W.VBox([W.HBox([self.models, W.VBox([self.gpu, self.kv_dtype, self.context])]), self.out])
        self.update()

    def update(self) -> None:
        with self.out:
            self.out.clear_output(wait=True)
            if not self.models.value:
                print("select at least one model")
                return
            try:
                fig = plot_comparison(self.models.value, gpu=self.gpu.value, context_len=self.context.value,
                                      kv_dtype=self.kv_dtype.value)
            except Exception as err:    # shown in the widget, never raised out of a callback
                print(f"⚠ {type(err).__name__}: {err}")
                return
            display(fig)
            plt.close(fig)

    def _ipython_display_(self):
        display(self.widget)
