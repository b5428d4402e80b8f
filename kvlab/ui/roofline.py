"""Notebook 02's decode roofline: move the batch size, watch the weights climb the roof
while attention stays where it was.

A decode step has two kinds of work (`kvlab.model.flops.decode_step_cost`): the weight
matmuls, which read the weights once for the whole batch (FLOPs per byte ≈ batch size in
bf16), and attention, which reads each sequence's own K/V for that sequence's one query
(FLOPs per byte = Hq/Hkv in bf16, at any batch size). The roofline of `H100_SXM` (the one
peak the course quotes, from NVIDIA's datasheet) turns both into time.

    from kvlab.ui.roofline import DecodeRoofline
    DecodeRoofline(model="smollm2-135m", batch_size=1, context=1024)   # display it in a notebook

After each change `.cost` holds the DecodeStepCost shown (None while there is an error) and
`.error` the message; the readout is an HTML widget with CSS class `kvlab-results`.
"""

from __future__ import annotations

import html


import ipywidgets as W
from IPython.display import display
from matplotlib.figure import Figure

from kvlab.model.flops import H100_SXM, DecodeStepCost, GpuPeak, decode_step_cost
from kvlab.model.presets import list_presets
from kvlab.model.spec import ModelSpec
from kvlab.ui.figures import error_html, plot_roofline, png
from kvlab.ui.widgets import Dropdown

BATCH_MAX = 1024
CONTEXT_MIN, CONTEXT_MAX = 16, 131_072


def roofline_models() -> list[str]:
    """Presets whose decode step `decode_step_cost` splits (GQA/MHA/MQA with a known parameter count)."""
    specs = (ModelSpec.preset(name) for name in list_presets())
    return [s.name for s in specs if s.attention != "mla" and s.num_params is not None]


class DecodeRoofline:
    """One decode step of a chosen model on the H100's roofline. Display it in a notebook."""

    def __init__(self, model: str = "smollm2-135m", batch_size: int = 1, context: int = 1024,
                 gpu: GpuPeak = H100_SXM, plot: bool = True):
        style = {"description_width": "120px"}
        self.gpu = gpu
        self.model = Dropdown(options=roofline_models(), value=model, description="model", style=style,
                              layout=W.Layout(width="360px"), name="DecodeRoofline model")
        self.batch_size = W.IntSlider(value=batch_size, min=1, max=BATCH_MAX, description="batch size",
                                      continuous_update=False, style=style, layout=W.Layout(width="560px"))
        self.context = W.IntSlider(value=context, min=CONTEXT_MIN, max=CONTEXT_MAX, step=16,
                                   description="context (tokens)", continuous_update=False, style=style,
                                   layout=W.Layout(width="560px"))
        self.results = W.HTML()
        self.results.add_class("kvlab-results")
        self.image = W.Image(format="png")   # the figure, rendered once per update (no pyplot state)
        self.figure: Figure | None = None     # the matplotlib figure behind it, for reading its data
        self._plot = plot
        self.cost: DecodeStepCost | None = None
        self.error: str | None = None
        for w in (self.model, self.batch_size, self.context):
            w.observe(lambda change: self.update(), names="value")
        self.widget = W.VBox([self.model, self.batch_size, self.context, W.HBox([self.results, self.image])])
        self.widget.add_class("kvlab-decode-roofline")
        self.update()

    def update(self) -> None:
        """Recount and redraw for the current inputs; any problem becomes a message in the widget."""
        try:
            spec = ModelSpec.preset(self.model.value)
            context = self.context.value
            if spec.max_position_embeddings and context + 1 > spec.max_position_embeddings:
                raise ValueError(f"{spec.name} takes at most {spec.max_position_embeddings:,} tokens; "
                                 f"pick a context below {spec.max_position_embeddings:,}")
            cost = decode_step_cost(spec, context=context, batch_size=self.batch_size.value, dtype_bytes=2)
            html_text = self._render(spec, cost)
            if self._plot:
                fig = Figure(figsize=(6.5, 4), dpi=72, constrained_layout=True)
                plot_roofline(self.gpu.bf16_tflops, self.gpu.memory_tb_per_s,
                              {"weights": cost.weights.intensity, "attention": cost.attention.intensity,
                               "whole step": cost.step.intensity}, ax=fig.subplots(),
                              title=f"{spec.name}, batch {cost.batch_size}, context {context:,}: "
                                    f"{self.gpu.name} (bf16)")
                self._show(fig)
        except Exception as err:      # a widget never raises out of a callback: say what went wrong
            self.cost, self.error = None, str(err)
            self.results.value = error_html(str(err), monospace=True)
            self.figure, self.image.value = None, b""
            return
        self.cost, self.error = cost, None
        self.results.value = html_text

    def _render(self, spec: ModelSpec, cost: DecodeStepCost) -> str:
        gpu, ridge = self.gpu, self.gpu.ridge_flops_per_byte

        def row(name, part):
            bound = "compute" if part.intensity >= ridge else "memory"
            return (f"<tr><td style='padding-right:1em'>{name}</td><td style='text-align:right'>{part.intensity:,.1f}</td>"
                    f"<td style='text-align:right'>{part.seconds(gpu) * 1e6:,.1f}</td><td>{bound}</td></tr>")

        return ("<div style='font-family:monospace;font-size:13px'>"
                f"<b>{html.escape(spec.name)}</b> (bf16), {html.escape(gpu.name)}: ridge {ridge:.0f} FLOP/B<table>"
                "<tr><th style='text-align:left'>part</th><th>FLOP/B</th><th>µs</th><th>bound</th></tr>"
                f"{row('weights', cost.weights)}{row('attention', cost.attention)}</table>"
                f"<div>step ≥ <span class='kvlab-step-us'>{cost.seconds(gpu) * 1e6:,.1f}</span> µs; "
                f"≤ <span class='kvlab-tokens-per-s'>{cost.tokens_per_second(gpu):,.0f}</span> tokens/s</div>"
                f"<div style='color:#555'>attention's K/V read: {cost.attention.bytes / 1e6:,.1f} MB "
                f"vs weights {cost.weights.bytes / 1e6:,.1f} MB</div></div>")

    def _show(self, fig: Figure) -> None:
        self.figure, self.image.value = fig, png(fig)

    def _ipython_display_(self):
        display(self.widget)
