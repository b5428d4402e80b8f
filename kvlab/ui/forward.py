"""Notebook 01's FLOP-split explorer: move the prompt length, watch attention's share grow.

Every number comes from `kvlab.model.flops` (`forward_flops`, `prefill_fit`); this module
only lays out the inputs, the readout and the figure.

    from kvlab.ui.forward import FlopSplit
    FlopSplit(model="smollm2-135m", prompt_len=1024)     # display it in a notebook

The readout is an HTML widget with CSS class `kvlab-results`; problems (a prompt longer than
the model takes) appear in `<div class="kvlab-message kvlab-error">` instead of a traceback.
After each change `.counts` holds the FlopCount shown (None while there is an error) and
`.error` the message (None when all is well).
"""

from __future__ import annotations

import html


import ipywidgets as W
from IPython.display import display
from matplotlib.figure import Figure

from kvlab.model.flops import LOGITS, FlopCount, forward_flops, prefill_fit
from kvlab.model.presets import list_presets
from kvlab.model.spec import ModelSpec
from kvlab.ui.figures import PART_LABELS, error_html, plot_flop_shares, png
from kvlab.ui.widgets import Dropdown, SelectionSlider, ToggleButtons

# 16 .. 131,072 tokens: powers of two and the halfway points between them (16, 24, 32, 48, ...)
PROMPT_LENGTHS = sorted({n for p in range(4, 18) for n in (2 ** p, 3 * 2 ** (p - 1))} - {3 * 2 ** 16})
LOGITS_LABELS = {"all": "every prompt token (model(ids))", "last": "last token only (what an engine does)"}


def flop_models() -> list[str]:
    """Presets whose attention `forward_flops` counts (MLA models compute attention differently)."""
    return [name for name in list_presets() if ModelSpec.preset(name).attention != "mla"]


class FlopSplit:
    """Where one prefill's FLOPs go, for a chosen model and prompt length. Display it in a notebook."""

    def __init__(self, model: str = "smollm2-135m", prompt_len: int = 1024, logits: str = "all", plot: bool = True):
        style = {"description_width": "120px"}
        self.model = Dropdown(options=flop_models(), value=model, description="model", style=style,
                              layout=W.Layout(width="360px"), name="FlopSplit model")
        self.prompt_len = SelectionSlider(options=PROMPT_LENGTHS, value=prompt_len, description="prompt length T",
                                          continuous_update=False, style=style, layout=W.Layout(width="560px"),
                                          name="FlopSplit prompt_len")
        self.logits = ToggleButtons(options=[(LOGITS_LABELS[k], k) for k in LOGITS], value=logits,
                                    description="LM head on", style=style, name="FlopSplit logits")
        self.results = W.HTML()
        self.results.add_class("kvlab-results")
        self.image = W.Image(format="png")   # the figure, rendered once per update (no pyplot state)
        self.figure: Figure | None = None     # the matplotlib figure behind it, for reading its data
        self._plot = plot
        self.counts: FlopCount | None = None
        self.error: str | None = None
        for w in (self.model, self.prompt_len, self.logits):
            w.observe(lambda change: self.update(), names="value")
        self.widget = W.VBox([self.model, self.prompt_len, self.logits, W.HBox([self.results, self.image])])
        self.widget.add_class("kvlab-flop-split")
        self.update()

    def update(self) -> None:
        """Recount and redraw for the current inputs; any problem becomes a message in the widget."""
        try:
            spec = ModelSpec.preset(self.model.value)
            T, logits = self.prompt_len.value, self.logits.value
            if spec.max_position_embeddings and T > spec.max_position_embeddings:
                raise ValueError(f"{spec.name} takes at most {spec.max_position_embeddings:,} tokens; "
                                 f"pick T ≤ {spec.max_position_embeddings:,}")
            counts = forward_flops(spec, T, logits=logits)
            html_text = self._render(spec, T, counts, logits)
            if self._plot:
                lengths = [n for n in PROMPT_LENGTHS if n <= (spec.max_position_embeddings or PROMPT_LENGTHS[-1])]
                fig = Figure(figsize=(8, 3.8), dpi=72, constrained_layout=True)
                plot_flop_shares(lengths, [forward_flops(spec, n, logits=logits) for n in lengths], ax=fig.subplots(),
                                 mark=T, title=f"{spec.name}: share of the FLOPs by part")
                self._show(fig)
        except Exception as err:      # a widget never raises out of a callback: say what went wrong
            self.counts, self.error = None, str(err)
            self.results.value = error_html(str(err), monospace=True)
            self.figure, self.image.value = None, b""
            return
        self.counts, self.error = counts, None
        self.results.value = html_text

    @staticmethod
    def _render(spec: ModelSpec, T: int, counts: FlopCount, logits: str) -> str:
        rows = "".join(
            f"<tr><td style='padding-right:1em'>{PART_LABELS[part]}</td>"
            f"<td style='text-align:right'>{getattr(counts, part) / 1e9:,.2f}</td>"
            f"<td style='text-align:right'>{getattr(counts, part) / counts.total:.1%}</td></tr>"
            for part in PART_LABELS)
        fit = prefill_fit(spec, logits=logits)
        return ("<div style='font-family:monospace;font-size:13px'>"
                f"<b>{html.escape(spec.name)}</b>, T = {T:,} tokens<table>"
                "<tr><th style='text-align:left'>part</th><th>GFLOP</th><th>share</th></tr>"
                f"{rows}<tr><td><b>total</b></td><td style='text-align:right'><b>{counts.total / 1e9:,.2f}</b></td>"
                "<td></td></tr></table>"
                f"<div>FLOPs(T) = {fit.constant / 1e6:,.1f}M + {fit.linear / 1e6:,.1f}M·T + {fit.quadratic:,}·T²</div>"
                f"<div>attention = the rest at T* ≈ <span class='kvlab-crossover'>{fit.crossover_tokens:,.0f}</span>"
                " tokens</div></div>")

    def _show(self, fig: Figure) -> None:
        self.figure, self.image.value = fig, png(fig)

    def _ipython_display_(self):
        display(self.widget)
