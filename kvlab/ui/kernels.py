"""Figures and the split-K explorer of notebook 06 (the paged-attention decode kernel).

    decode_step(spec, batch, context, bandwidth)   bytes, time and FLOPs per byte of one decode step
    plot_decode_roofline(spec, batches, context, bandwidth)   linear layers vs attention across batch sizes
    plot_tile_map(codes)                            which FlashAttention tiles are computed, masked, skipped
    SplitKExplorer()                                batch, context, block size -> the kernel's launch

The numbers come from `kvlab.model.flops` (FLOPs), `kvlab.memory` (bytes) and the launcher's own
plan (`kvlab.kernels.paged_attention`); this module only arranges and draws them.
"""

from __future__ import annotations

import html
import importlib
import math

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

import kvlab.kernels  # noqa: F401  (first: it sets up Triton's interpreter where there is no GPU)
from kvlab.kernels.flash_reference import DIAGONAL, FULL, SKIPPED
from kvlab.memory import kv_cache_bytes, weight_bytes
from kvlab.model.flops import H100_SXM, GpuPeak, forward_flops
from kvlab.model.spec import ModelSpec
from kvlab.ui.figures import png
from kvlab.ui.widgets import Dropdown, SelectionSlider

_pa = importlib.import_module("kvlab.kernels.paged_attention")   # the module (kvlab.kernels exports the function)


# ---------------------------------------------------------------------------------------------
# One decode step: what it reads, and how long that takes at a bandwidth
# ---------------------------------------------------------------------------------------------

def decode_step(spec: ModelSpec, batch: int, context: int, bandwidth: float, dtype: str = "bfloat16") -> dict:
    """One decode step of `batch` sequences with `context` cached tokens each, every layer.

    bandwidth: bytes per second. Returns bytes read (weights once; every sequence's K/V, all
    layers), the time each takes at `bandwidth` (the floor: nothing can be faster), and FLOPs per
    byte of the linear layers (weights), of attention (K/V) and of the whole step."""
    flops = forward_flops(spec, new_tokens=1, context=context, batch_size=batch)
    w = weight_bytes(spec, dtype)
    kv = kv_cache_bytes(spec, context, batch_size=batch, kv_dtype=dtype)
    linear = flops.projections + flops.ffn + flops.lm_head
    return dict(batch=batch, context=context, weight_bytes=w, kv_bytes=kv,
                weight_seconds=w / bandwidth, kv_seconds=kv / bandwidth, step_seconds=(w + kv) / bandwidth,
                tokens_per_second=batch * bandwidth / (w + kv),
                linear_intensity=linear / w, attention_intensity=flops.attention / kv,
                step_intensity=flops.total / (w + kv))


def plot_decode_roofline(spec: ModelSpec, batches, context: int, bandwidth: float, gpu: GpuPeak = H100_SXM,
                         axes=None):
    """Left: FLOPs per byte against batch size for the linear layers (they read the weights once for
    the whole batch: intensity grows with it), attention (each sequence reads its own K/V: intensity
    stays at num_heads / num_kv_heads) and the whole step, with the GPU's ridge. Right: the step's
    floor time at `bandwidth`, split into reading the weights and reading the K/V."""
    rows = [decode_step(spec, b, context, bandwidth) for b in batches]
    if axes is None:
        axes = plt.subplots(1, 2, figsize=(12, 4))[1]
    a, b = axes
    for key, label, color in (("linear_intensity", "linear layers (weights)", "#4c72b0"),
                              ("attention_intensity", "attention (K/V)", "#dd8452"),
                              ("step_intensity", "whole step", "k")):
        a.plot(batches, [r[key] for r in rows], "o-", color=color, label=label)
    a.axhline(gpu.ridge_flops_per_byte, color="#c44e52", ls="--",
              label=f"{gpu.name} ridge {gpu.ridge_flops_per_byte:.0f} FLOP/B (datasheet)")
    a.set(xscale="log", yscale="log", xlabel="batch size (sequences per decode step)", ylabel="FLOPs per byte read",
          title=f"{spec.name}, context {context:,}: who is memory-bound")
    a.legend(fontsize=8)
    weights_ms = np.array([r["weight_seconds"] for r in rows]) * 1e3
    kv_ms = np.array([r["kv_seconds"] for r in rows]) * 1e3
    x = np.arange(len(batches))
    b.bar(x, weights_ms, color="#4c72b0", label="read the weights")
    b.bar(x, kv_ms, bottom=weights_ms, color="#dd8452", label="read the K/V (all layers)")
    b.set_xticks(x, [str(v) for v in batches])
    b.set(xlabel="batch size (sequences per decode step)", ylabel="floor time per decode step (ms)",
          title=f"at {bandwidth / 1e12:.2f} TB/s: concurrency costs latency")
    b.legend(fontsize=8)
    return axes


# ---------------------------------------------------------------------------------------------
# FlashAttention's tiles
# ---------------------------------------------------------------------------------------------

TILE_COLORS = {SKIPPED: "#f2f2f2", FULL: "#4c72b0", DIAGONAL: "#dd8452"}
TILE_LABELS = {SKIPPED: "skipped: never read", FULL: "computed", DIAGONAL: "computed, then masked"}


def plot_tile_map(codes: torch.Tensor, ax=None, title: str | None = None):
    """(query tiles, key tiles) codes from `kvlab.kernels.flash_reference.tile_map`, one colour each."""
    ax = ax or plt.gca()
    codes = np.asarray(codes)
    ax.imshow(codes, cmap=ListedColormap([TILE_COLORS[c] for c in (SKIPPED, FULL, DIAGONAL)]), vmin=-0.5, vmax=2.5,
              interpolation="nearest")
    ax.set(xlabel="key tile", ylabel="query tile", title=title or "causal attention, tile by tile")
    ax.legend(handles=[Patch(color=TILE_COLORS[c], label=TILE_LABELS[c]) for c in (FULL, DIAGONAL, SKIPPED)],
              fontsize=7, loc="upper right")
    return ax


# ---------------------------------------------------------------------------------------------
# Split-K: what the launcher chooses
# ---------------------------------------------------------------------------------------------

GPUS = {"H100 SXM / H200 (132 SMs)": 132, "A100 (108 SMs)": 108, "L4 (58 SMs)": 58}


def launch_plan(batch: int, context: int, num_kv_heads: int = 8, block_size: int = 16, sms: int = 132,
                group: int = 4, head_dim: int = 128, config=None) -> dict:
    """What `paged_attention` launches for `batch` sequences of `context` tokens (fp16 on a GPU with
    `sms` SMs): the launcher's own plan, and the numbers its heuristic looks at."""
    config = config or _pa.DEFAULT_CONFIG
    for name, value in (("batch", batch), ("context", context), ("num_kv_heads", num_kv_heads),
                        ("block_size", block_size), ("sms", sms), ("group", group), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    max_blocks = math.ceil(context / block_size)          # the block table's width
    plan = _pa._plan(int(batch), int(group * num_kv_heads), int(num_kv_heads), int(head_dim), int(block_size),
                     int(max_blocks), torch.float16, int(sms), None, config, False)
    programs = batch * num_kv_heads
    splits = plan.num_splits
    return dict(programs_unsplit=programs, per_sm_unsplit=programs / sms, splits=splits,
                grid=(batch, num_kv_heads, splits), programs=programs * splits, per_sm=programs * splits / sms,
                tokens_per_split=plan.tokens_per_split, table_tokens=max_blocks * block_size,
                blocks_per_split=math.ceil(plan.tokens_per_split / block_size),
                tiles_per_program=plan.tokens_per_split // config.block_n,
                wanted=math.ceil(config.target_per_sm * sms / programs),
                cap=max_blocks * block_size // config.min_split_tokens, config=config)


class SplitKExplorer(W.VBox):
    """Sliders for batch, context, block size and KV heads, a GPU to choose: the grid the decode kernel
    launches, programs per SM, the splits the heuristic chooses and the tokens each split reads.

    A callback never raises: an error is shown in the message area, and the readout and figure are
    cleared rather than left showing other inputs.
    """

    BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    CONTEXTS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]

    def __init__(self, batch: int = 1, context: int = 32768, block_size: int = 16, num_kv_heads: int = 8,
                 gpu: str = "H100 SXM / H200 (132 SMs)"):
        style = {"description_width": "110px"}
        layout = W.Layout(width="420px")
        self.batch = SelectionSlider(options=self.BATCHES, value=batch, description="batch", style=style,
                                     layout=layout, name="SplitKExplorer batch")
        self.context = SelectionSlider(options=self.CONTEXTS, value=context, description="context (tokens)",
                                       style=style, layout=layout, name="SplitKExplorer context")
        self.block_size = SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=block_size,
                                          description="block size", style=style, layout=layout,
                                          name="SplitKExplorer block_size")
        self.num_kv_heads = SelectionSlider(options=[1, 2, 4, 8, 16], value=num_kv_heads, description="KV heads",
                                            style=style, layout=layout, name="SplitKExplorer num_kv_heads")
        self.gpu = Dropdown(options=list(GPUS), value=gpu, description="GPU", style=style, layout=layout,
                            name="SplitKExplorer gpu")
        self.readout = W.HTML()
        self.message = W.HTML()
        self.image = W.Image(format="png")
        controls = [self.batch, self.context, self.block_size, self.num_kv_heads, self.gpu]
        for c in controls:
            c.observe(lambda _: self.update(), names="value")
        super().__init__([W.HBox([W.VBox(controls + [self.message]), self.readout]), self.image])
        self.plan: dict | None = None
        self.update()

    def compute(self) -> dict:
        self.plan = launch_plan(self.batch.value, self.context.value, self.num_kv_heads.value,
                                self.block_size.value, GPUS[self.gpu.value])
        return self.plan

    def update(self):
        """Recompute and redraw; never raises (it is the controls' callback)."""
        try:
            p = self.compute()
            self.message.value = ""
            self.readout.value = self._readout(p)
            fig = self.figure()
        except Exception as err:  # noqa: BLE001  (a callback must not raise: show it instead)
            self.plan = None
            self.message.value = f"<p style='color:#c44e52'>{html.escape(f'{type(err).__name__}: {err}')}</p>"
            self.readout.value = ""
            fig = Figure(figsize=(10, 3), dpi=72)
            fig.text(0.5, 0.5, "nothing to draw: see the message", ha="center", va="center")
        self.image.value = png(fig)

    def _readout(self, p: dict) -> str:
        cfg, sms = p["config"], GPUS[self.gpu.value]
        if p["per_sm_unsplit"] >= cfg.split_below:
            why = (f"{p['programs_unsplit']:,} programs = {p['per_sm_unsplit']:.1f} per SM &ge; {cfg.split_below:g}: "
                   f"every SM is busy, no split")
        else:
            why = (f"{p['programs_unsplit']:,} programs = {p['per_sm_unsplit']:.2f} per SM &lt; {cfg.split_below:g}: "
                   f"split. {cfg.target_per_sm:g} per SM wants {p['wanted']} splits; ranges of at least "
                   f"{cfg.min_split_tokens} tokens allow {p['cap']}; the smaller, rounded down to a power of two")
        return (f"<b>{p['splits']} split(s)</b><br>{why}<br>"
                f"grid (sequences, KV heads, splits) = {p['grid']}: {p['programs']:,} programs, "
                f"{p['per_sm']:.1f} per SM on {sms} SMs<br>"
                f"each program reads {p['tokens_per_split']:,} tokens ({p['blocks_per_split']:,} blocks of "
                f"{self.block_size.value}, {p['tiles_per_program']} tiles of {cfg.block_n})")

    def figure(self) -> Figure:
        """Programs per SM and tokens per range, against the number of splits; the chosen one starred."""
        p, cfg = self.plan, self.plan["config"]
        sms = GPUS[self.gpu.value]
        splits = 2 ** np.arange(0, 9)
        fig = Figure(figsize=(10, 3), dpi=72)
        a, b = fig.subplots(1, 2)
        a.plot(splits, p["programs_unsplit"] * splits / sms, "o-", color="#4c72b0")
        a.plot(p["splits"], p["per_sm"], "*", ms=16, color="#c44e52", label="chosen")
        a.axhline(cfg.split_below, color="k", ls=":", lw=1, label=f"split below {cfg.split_below:g} per SM")
        a.axhline(cfg.target_per_sm, color="k", ls="--", lw=1, label=f"target {cfg.target_per_sm:g} per SM")
        a.set(xscale="log", yscale="log", xlabel="splits per sequence", ylabel="programs per SM")
        a.set_xticks(splits, [str(s) for s in splits])
        a.legend(fontsize=7)
        b.plot(splits, p["table_tokens"] / splits, "o-", color="#dd8452")
        b.plot(p["splits"], p["table_tokens"] / p["splits"], "*", ms=16, color="#c44e52", label="chosen")
        b.axhline(cfg.min_split_tokens, color="k", ls="--", lw=1, label=f"at least {cfg.min_split_tokens} tokens")
        b.set(xscale="log", yscale="log", xlabel="splits per sequence", ylabel="tokens per split")
        b.set_xticks(splits, [str(s) for s in splits])
        b.legend(fontsize=7)
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.18, top=0.95, wspace=0.3)
        return fig
