"""Figures of notebooks 01 (forward pass), 02 (prefill vs decode) and 03 (KV memory).

Each function takes numbers that the notebook measured or counted (with
`kvlab.model.flops`, `kvlab.model.generate`, `kvlab.model.conversation`) and draws
them with matplotlib; none of them measures anything itself. Each returns the axes
it drew on. One quantity per axis: two quantities get two panels.

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


def png(fig) -> bytes:
    """A figure rendered to PNG bytes, for an ipywidgets Image (the widgets draw on their own
    Figure objects, never on pyplot's global state)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def error_html(message: str, monospace: bool = False) -> str:
    """How every widget shows a problem in its message area instead of raising."""
    import html

    font = ";font-family:monospace" if monospace else ""
    return f"<div class='kvlab-message kvlab-error' style='color:#b00020{font}'>⚠ {html.escape(message)}</div>"


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
    plt.colorbar(im, ax=ax, shrink=0.8, label="attention weight (each row sums to 1)")
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
                   decode_ai: Sequence[float], ridges: dict[str, float] | None = None, axes=None,
                   title: str | None = None):
    """FLOPs per byte of one step, two panels: a prefill of T tokens against T (left), one decode
    step against its context (right); horizontal lines at hardware ridge points (peak FLOP/s ÷ bytes/s)."""
    axes = _axes(axes, ncols=2, figsize=(11, 3.8))
    a, b = axes
    a.plot(prefill_lens, prefill_ai, "o-", color="#4c72b0", label="prefill of T tokens")
    b.plot(decode_contexts, decode_ai, "s-", color="#dd8452", label="decode of 1 token")
    for ax in axes:
        for i, (name, ridge) in enumerate((ridges or {}).items()):
            ax.axhline(ridge, color="gray", ls=["--", ":", "-."][i % 3], lw=1, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylabel("FLOPs per byte moved")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    a.set_xlabel("prompt length T (tokens)")
    b.set_xlabel("context (tokens already cached)")
    suffix = f" ({title})" if title else ""
    a.set_title("prefill: intensity grows with T" + suffix, fontsize=10)
    b.set_title("decode: intensity stays near 1" + suffix, fontsize=10)
    ymin = min(min(prefill_ai), min(decode_ai), *(ridges or {}).values()) / 2
    ymax = max(max(prefill_ai), max(decode_ai), *(ridges or {}).values()) * 2
    for ax in axes:
        ax.set_ylim(ymin, ymax)                   # the same scale on both panels: compare heights directly
    return axes


def plot_decode_batch_sweep(batch_sizes: Sequence[int], tpot: Sequence[float], axes=None, title: str | None = None):
    """Two panels from one measured sweep: time per decode step (TPOT) against the batch size, and
    output tokens per second (batch size / TPOT) against the batch size."""
    axes = _axes(axes, ncols=2, figsize=(11, 3.8))
    a, b = axes
    B = np.asarray(batch_sizes, dtype=float)
    t = np.asarray(tpot, dtype=float)
    a.plot(B, 1e3 * t, "o-", color="#dd8452")
    a.set_ylabel("TPOT (ms per decode step)")
    a.set_ylim(bottom=0)
    a.set_title("one decode step: time per output token", fontsize=10)
    b.plot(B, B / t, "o-", color="#55a868", label="measured")
    b.plot(B, B / t[0], ":", color="gray", label="if a step cost what batch 1 costs")
    b.set_ylabel("output tokens per second")
    b.set_ylim(0, 1.1 * max(B / t))
    b.set_title("throughput: batch size / TPOT", fontsize=10)
    b.legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(B, [str(int(x)) for x in B])
        ax.set_xlabel("batch size (sequences decoded together)")
        ax.grid(True, alpha=0.3)
    if title:
        axes[0].figure.suptitle(title, fontsize=10)
    return axes


def plot_decode_intensity_by_batch(batch_sizes: Sequence[int], weights_ai: Sequence[float],
                                   attention_ai: Sequence[float], ridges: dict[str, float] | None = None,
                                   ax=None, title: str | None = None):
    """FLOPs per byte of a decode step's two parts against the batch size: the weight matmuls
    (one read of the weights shared by the batch) and attention (each sequence reads its own K/V)."""
    ax = _axes(ax, figsize=(6.5, 4))
    ax.plot(batch_sizes, weights_ai, "o-", color=PART_COLORS["ffn"], label="weights (projections, FFN, LM head)")
    ax.plot(batch_sizes, attention_ai, "s-", color=PART_COLORS["attention"], label="attention (QKᵀ, AV over the K/V)")
    for i, (name, ridge) in enumerate((ridges or {}).items()):
        ax.axhline(ridge, color="gray", ls=["--", ":", "-."][i % 3], lw=1, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences decoded together)")
    ax.set_ylabel("FLOPs per byte moved")
    ax.set_title(title or "decode: batching raises the weights' intensity, not attention's", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_roofline(peak_tflops: float, bandwidth_tb_s: float, points: dict[str, float], ax=None,
                  title: str | None = None, xlim=(0.1, 10_000)):
    """A roofline: attainable TFLOP/s = min(peak, intensity × bandwidth) against FLOPs per byte,
    with each named point (label -> its intensity) placed on the roof."""
    ax = _axes(ax, figsize=(6.5, 4))
    x = np.geomspace(*xlim, 200)
    ax.plot(x, np.minimum(peak_tflops, x * bandwidth_tb_s), "k-", lw=1.5, label="roof: min(peak, intensity × bandwidth)")
    ridge = peak_tflops / bandwidth_tb_s
    ax.axvline(ridge, color="gray", ls="--", lw=1, label=f"ridge {ridge:.0f} FLOP/B")
    colors = [PART_COLORS["ffn"], PART_COLORS["attention"], "#4c72b0", "#8172b2", "#dd8452"]   # weights green, attention red
    for (label, ai), color in zip(points.items(), colors):
        ax.plot([ai], [min(peak_tflops, ai * bandwidth_tb_s)], "o", ms=8, color=color, label=f"{label}: {ai:,.1f} FLOP/B")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*xlim)
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved)")
    ax.set_ylabel("attainable TFLOP/s")
    ax.set_title(title or "roofline", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def plot_flop_shares(lengths: Sequence[int], counts: Sequence, ax=None, mark: int | None = None,
                     title: str | None = None):
    """Each part's share of a forward pass's FLOPs against T, stacked to 1; a vertical line at T = mark."""
    ax = _axes(ax, figsize=(6.5, 4))
    total = np.array([c.total for c in counts], dtype=float)
    shares = [np.array([getattr(c, part) for c in counts], dtype=float) / total for part in PART_COLORS]
    ax.stackplot(lengths, *shares, colors=list(PART_COLORS.values()), labels=[PART_LABELS[p] for p in PART_COLORS],
                 alpha=0.85)
    if mark is not None:
        ax.axvline(mark, color="k", lw=1.5, label=f"T = {mark:,}")
    ax.set_xscale("log", base=2)
    ax.set_xlim(lengths[0], lengths[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("prompt length T (tokens)")
    ax.set_ylabel("share of the forward pass's FLOPs")
    ax.set_title(title or "where the FLOPs go", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))     # outside: the stack fills the axes
    return ax


def plot_conversation(turns: Sequence, kv_bytes_per_token: int, axes=None, title: str | None = None):
    """Two panels for a multi-turn chat (kvlab.model.conversation.Turn per turn): tokens prefilled
    per turn without and with prefix caching (left); KV held at the end of each turn, MiB (right)."""
    axes = _axes(axes, ncols=2, figsize=(11, 3.6))
    a, b = axes
    n = np.arange(1, len(turns) + 1)
    a.bar(n - 0.2, [t.prefill_without_cache for t in turns], width=0.4, color="#c44e52", label="without prefix caching")
    a.bar(n + 0.2, [t.prefill_with_cache for t in turns], width=0.4, color="#55a868", label="with prefix caching")
    a.set_ylabel("tokens prefilled")
    a.set_title("prefill work per turn", fontsize=10)
    a.legend(fontsize=8)
    b.plot(n, [t.kv_tokens * kv_bytes_per_token / 2**20 for t in turns], "o-", color="#dd8452")
    b.set_ylabel("KV cache held (MiB)")
    b.set_ylim(bottom=0)
    b.set_title("the conversation's KV at the end of each turn", fontsize=10)
    for ax in axes:
        ax.set_xticks(n)
        ax.set_xlabel("turn")
        ax.grid(True, axis="y", alpha=0.3)
    if title:
        axes[0].figure.suptitle(title, fontsize=10)
    return axes


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
    ax.set_title(f"decoding {len(cache)} tokens", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return ax
