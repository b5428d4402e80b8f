"""Figures of notebooks 01 (forward pass) and 02 (prefill vs decode).

Each function takes numbers that the notebook measured or counted (with
`kvlab.model.flops`, `kvlab.model.generate`) and draws them with matplotlib; none
of them measures anything itself. Each returns the axes it drew on.

    from kvlab.ui import figures
    figures.plot_flops_by_part(lengths, [forward_flops(spec, T) for T in lengths])
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

PART_COLORS = {"projections": "#4c72b0", "attention": "#c44e52", "ffn": "#55a868", "lm_head": "#8172b2"}
PART_LABELS = {"projections": "projections (Q, K, V, O)", "attention": "attention (QKᵀ, AV)",
               "ffn": "FFN", "lm_head": "LM head"}


def _axes(ax, ncols: int = 1, figsize=(6, 4)):
    if ax is not None:
        return ax
    _, ax = plt.subplots(1, ncols, figsize=figsize, constrained_layout=True)
    return ax


def plot_attention_weights(weights, tokens: Sequence[str], ax=None, title: str = "attention weights"):
    """One head's softmax weights (T, T): row = query token, column = key token."""
    ax = _axes(ax, figsize=(4.5, 4))
    w = np.asarray(weights.detach() if hasattr(weights, "detach") else weights, dtype=float)
    im = ax.imshow(w, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
    ax.set_xlabel("key (earlier token)")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=10)
    plt.colorbar(im, ax=ax, shrink=0.8)
    return ax


def plot_flops_by_part(lengths: Sequence[int], counts: Sequence, ax=None, per_token: bool = False,
                       title: str | None = None):
    """FLOPs of one forward pass by part (a FlopCount per length), log-log against T.

    per_token=True divides by T: the linear parts become flat lines, attention a rising one.
    """
    ax = _axes(ax)
    T = np.asarray(lengths, dtype=float)
    for part in PART_COLORS:
        y = np.array([getattr(c, part) for c in counts], dtype=float)
        style = "o--" if part == "lm_head" else "o-"       # dashed: it nearly overlaps the projections here
        ax.plot(T, y / T if per_token else y, style, ms=3, color=PART_COLORS[part], label=PART_LABELS[part])
    total = np.array([c.total for c in counts], dtype=float)
    ax.plot(T, total / T if per_token else total, "k--", lw=1, label="total")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length T (tokens)")
    ax.set_ylabel("FLOPs per token" if per_token else "FLOPs per forward pass")
    ax.set_title(title or ("FLOPs per token, by part" if per_token else "FLOPs by part"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_measured_vs_flops(lengths: Sequence[int], times: dict[str, Sequence[float]],
                           flops: dict[str, Sequence[float]], ax=None, title: str | None = None):
    """Measured seconds per token by part (dots) beside FLOPs per token by part scaled to
    the same units (lines: FLOPs / the part's fitted FLOP/s). Parts are keys of PART_COLORS."""
    ax = _axes(ax)
    T = np.asarray(lengths, dtype=float)
    for part, t in times.items():
        t = np.asarray(t, dtype=float)
        f = np.asarray(flops[part], dtype=float)
        rate = np.sum(f * t) / np.sum(t * t)                  # least-squares FLOP/s through the origin (weights ~ t)
        ax.plot(T, 1e3 * t / T, "o", color=PART_COLORS[part], label=f"{PART_LABELS[part]}: measured")
        ax.plot(T, 1e3 * f / rate / T, "-", color=PART_COLORS[part], alpha=0.6,
                label=f"FLOPs / {rate / 1e9:.0f} GFLOP/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length T (tokens)")
    ax.set_ylabel("ms per token")
    ax.set_title(title or "measured time per token, by part", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return ax


def plot_forward_time(lengths: Sequence[int], seconds: Sequence[float], predictions: dict[str, Sequence[float]],
                      ax=None):
    """Whole forward pass: measured seconds against T (dots), with predictions (label -> seconds per length)."""
    ax = _axes(ax)
    ax.plot(lengths, seconds, "ko", label="measured")
    for (label, predicted), style in zip(predictions.items(), ["-", "--", ":", "-."]):
        ax.plot(lengths, predicted, style, color="k", alpha=0.6, label=label)
    ax.set_xlabel("prompt length T (tokens)")
    ax.set_ylabel("seconds per forward pass")
    ax.set_title("whole forward pass", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_ttft_tpot(prompt_lens: Sequence[int], ttft: Sequence[float], contexts: Sequence[int],
                   tpot: Sequence[float], axes=None):
    """Two panels: TTFT (one prefill) against prompt length; TPOT (one decode step) against context."""
    axes = _axes(axes, ncols=2, figsize=(10, 3.8))
    a, b = axes
    a.plot(prompt_lens, 1e3 * np.asarray(ttft), "o-", color="#4c72b0")
    a.set_xlabel("prompt length (tokens)")
    a.set_ylabel("TTFT (ms)")
    a.set_title("prefill: time to first token", fontsize=10)
    b.plot(contexts, 1e3 * np.asarray(tpot), "o-", color="#dd8452")
    b.set_xlabel("context length (tokens in the cache)")
    b.set_ylabel("TPOT (ms)")
    b.set_ylim(bottom=0)
    b.set_title("decode: time per output token", fontsize=10)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return axes


def plot_intensity(prefill_lens: Sequence[int], prefill_ai: Sequence[float], decode_contexts: Sequence[int],
                   decode_ai: Sequence[float], ridges: dict[str, float] | None = None, ax=None,
                   title: str | None = None):
    """FLOPs per byte of one step: prefill of T tokens against T, decode of one token against its
    context; horizontal lines at hardware ridge points (peak FLOP/s ÷ bytes/s)."""
    ax = _axes(ax, figsize=(6.5, 4))
    ax.plot(prefill_lens, prefill_ai, "o-", color="#4c72b0", label="prefill of T tokens (x = T)")
    ax.plot(decode_contexts, decode_ai, "s-", color="#dd8452", label="decode of 1 token (x = context)")
    for i, (name, ridge) in enumerate((ridges or {}).items()):
        ax.axhline(ridge, color="gray", ls=["--", ":", "-."][i % 3], lw=1)
        ax.text(prefill_lens[0], ridge * 1.12, name, fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("FLOPs per byte moved")
    ax.set_title("arithmetic intensity" + (f" ({title})" if title else "")
                 + ": above the ridge compute-bound, below memory-bound", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    return ax


def plot_decode_steps(no_cache: Sequence[float], cache: Sequence[float], ax=None):
    """Seconds per decode step against step index, recomputing everything vs with a KV cache.
    Step 0 (the prefill) is left out: it is the same pass either way."""
    ax = _axes(ax, figsize=(7, 3.8))
    steps = np.arange(1, len(no_cache))
    ax.plot(steps, 1e3 * np.asarray(no_cache[1:]), ".", color="#c44e52",
            label=f"no cache: re-run the whole sequence (total {sum(no_cache):.1f} s)")
    ax.plot(np.arange(1, len(cache)), 1e3 * np.asarray(cache[1:]), ".", color="#4c72b0",
            label=f"KV cache: feed the newest token (total {sum(cache):.1f} s)")
    ax.set_xlabel("decode step")
    ax.set_ylabel("ms per step")
    ax.set_ylim(bottom=0)
    ax.set_title("decoding 128 tokens", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return ax
