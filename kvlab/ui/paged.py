"""Figures and a step-through widget for the block allocator (notebook 05).

    draw_pool(alloc, ax)            grid of physical blocks colored by owner, block tables beside
    draw_mapping(alloc, seq_ids)    logical blocks of each sequence -> their physical blocks
    replay_ops(ops, ...)            a fresh BlockAllocator after a list of operations
    AllocatorStepper(ops, ...)      ipywidgets app: step through allocate/append/fork/free
    plot_blocks_in_use(runs, ax)    blocks in use per engine step, one line per replayed trace
    plot_prefill_work(runs, ax)     prompt tokens computed vs supplied by the prefix cache, per trace
    plot_replay(stats, ...)         requests running and blocks in use per step of one trace

Operations are tuples: ("allocate", seq, n_tokens or token ids), ("append", seq, n),
("fork", parent, child), ("free", seq); `check_op` / `check_ops` refuse anything else with
a message that names the operation. Everything drawn is read from the allocator, or from
the `TraceStats` of `kvlab.engine.replay`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from kvlab.paged.block_allocator import BlockAllocator
from kvlab.ui.figures import error_html

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
           "#ccb974", "#64b5cd"]
FREE, CACHED, SHARED = "#eeeeee", "#c9d9c9", "#222222"


def seq_colors(seq_ids: Sequence) -> dict:
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(seq_ids)}


def _owners(alloc: BlockAllocator) -> dict[int, list]:
    owners: dict[int, list] = {}
    for s in alloc.seq_ids():
        for b in alloc.block_table(s):
            owners.setdefault(b, []).append(s)
    return owners


def _fill(alloc: BlockAllocator) -> dict[int, int]:
    """Slots used in each block (the most any owner uses)."""
    fill: dict[int, int] = {}
    bs = alloc.block_size
    for s in alloc.seq_ids():
        n = alloc.num_tokens(s)
        for i, b in enumerate(alloc.block_table(s)):
            fill[b] = max(fill.get(b, 0), min(bs, n - i * bs))
    return fill


def draw_pool(alloc: BlockAllocator, ax=None, cols: int = 8, colors: dict | None = None, title: str | None = None,
              show_tables: bool = True):
    """Physical blocks as a grid: the filled part of a block in its owner's color (a shared
    block has a black border and its reference count), free blocks light gray, freed blocks
    still holding a prefix-cache hash pale green. Block tables are listed beside the grid."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.55 * (-(-alloc.num_blocks // cols)) + 1.2))
    colors = colors or seq_colors(alloc.seq_ids())
    owners, fill = _owners(alloc), _fill(alloc)
    rows = -(-alloc.num_blocks // cols)
    for b in range(alloc.num_blocks):
        r, c = divmod(b, cols)
        x, y = c, rows - 1 - r
        base = CACHED if (alloc.ref_count(b) == 0 and alloc.block_hash(b) is not None) else FREE
        ax.add_patch(Rectangle((x + 0.05, y + 0.05), 0.9, 0.9, facecolor=base, edgecolor="#bbbbbb"))
        if b in owners:
            frac = fill.get(b, 0) / alloc.block_size
            ax.add_patch(Rectangle((x + 0.05, y + 0.05), 0.9 * frac, 0.9,
                                   facecolor=colors.get(owners[b][0], "#888888"), edgecolor="none"))
            if alloc.ref_count(b) > 1:
                ax.add_patch(Rectangle((x + 0.05, y + 0.05), 0.9, 0.9, facecolor="none", edgecolor=SHARED, lw=2.2))
                ax.text(x + 0.9, y + 0.78, f"x{alloc.ref_count(b)}", ha="right", va="center", fontsize=7,
                        color="white", weight="bold")
        ax.text(x + 0.1, y + 0.2, str(b), fontsize=7, color="#555555")
    ax.set_xlim(0, cols + (5.5 if show_tables else 0))
    ax.set_ylim(-0.1, rows + 0.1)
    ax.set_aspect("equal")
    ax.axis("off")
    if show_tables:
        for i, s in enumerate(alloc.seq_ids()[:rows * 2]):
            table = alloc.block_table(s)
            shown = ", ".join(map(str, table[:10])) + (", ..." if len(table) > 10 else "")
            ax.text(cols + 0.3, rows - 0.45 - 0.5 * i, f"{s}: {alloc.num_tokens(s)} tok -> [{shown}]",
                    fontsize=8, va="center", color=colors.get(s, "#333333"))
    ax.set_title(title or f"{alloc.num_free_blocks}/{alloc.num_blocks} blocks free", fontsize=10)
    return ax


def draw_mapping(alloc: BlockAllocator, seq_ids: Sequence | None = None, ax=None, colors: dict | None = None):
    """Top: each sequence's logical blocks 0, 1, 2, ... in a row (logically contiguous).
    Bottom: the pool; a line joins each logical block to its physical block (scattered)."""
    seq_ids = list(seq_ids if seq_ids is not None else alloc.seq_ids())
    colors = colors or seq_colors(seq_ids)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 1.2 + 0.5 * len(seq_ids)))
    n = alloc.num_blocks
    scale = min(2.0, n / max(len(alloc.block_table(s)) for s in seq_ids) / 1.15)
    for b in range(n):
        ax.add_patch(Rectangle((b, 0), 0.9, 0.8, facecolor=FREE, edgecolor="#bbbbbb", lw=0.5))
    for row, s in enumerate(seq_ids):
        y = 1.8 + row * 0.9
        table = alloc.block_table(s)
        for i, b in enumerate(table):
            x = i * scale
            ax.add_patch(Rectangle((x, y), 0.9 * scale, 0.6, facecolor=colors[s], edgecolor="white", lw=0.5))
            ax.add_patch(Rectangle((b, 0), 0.9, 0.8, facecolor=colors[s], edgecolor="white", lw=0.5))
            ax.plot([x + 0.45 * scale, b + 0.45], [y, 0.8], color=colors[s], lw=0.6, alpha=0.6)
        ax.text(-0.5, y + 0.3, str(s), ha="right", va="center", fontsize=8, color=colors[s])
    ax.text(-0.5, 0.4, "pool", ha="right", va="center", fontsize=8)
    ax.set_xlim(-4, n + 0.5)
    ax.set_ylim(-0.2, 1.8 + 0.9 * len(seq_ids))
    ax.axis("off")
    return ax


def slot_ranges(slots: Sequence[int]) -> str:
    """Slots as runs of consecutive numbers: [10, 11, 24, 25, 26] -> "10..11, 24..26"."""
    runs: list[list[int]] = []
    for x in slots:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def apply_op(alloc: BlockAllocator, op: tuple, token: int = 0) -> str:
    """Do one operation; return a line saying what happened. A malformed operation raises
    TypeError/ValueError (from `check_op`) before the allocator is touched."""
    op = check_op(op)
    kind = op[0]
    if kind == "allocate":
        _, s, toks = op
        toks = list(range(1000, 1000 + toks)) if isinstance(toks, int) else list(toks)
        table = alloc.allocate_sequence(s, toks)
        hit = alloc.num_cached_tokens(s)
        return f"allocate {s}: {len(toks)} tokens -> blocks {table}" + (f" ({hit} cached)" if hit else "")
    if kind == "append":
        _, s, n = op
        slots = [alloc.append_token(s, token) for _ in range(n)]
        copies = alloc.pop_copies()
        msg = f"append {n} to {s}: slots {slot_ranges(slots)}, table {alloc.block_table(s)}"
        return msg + (f"; copy-on-write {copies}" if copies else "")
    if kind == "fork":
        _, parent, child = op
        return f"fork {parent} -> {child}: shares {alloc.fork(parent, child)}"
    if kind == "free":
        _, s = op
        table = alloc.block_table(s)
        alloc.free_sequence(s)
        return f"free {s}: blocks {table} back to the free queue"
    raise AssertionError(f"check_op let {op!r} through")      # unreachable: check_op knows every kind


def replay_ops(ops: Sequence[tuple], num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
               free_order: Sequence[int] | None = None) -> tuple[BlockAllocator, list[str]]:
    """A fresh allocator after the operations, and the line each one printed. Every operation is
    checked (`check_ops`) before the first one runs."""
    ops = check_ops(ops)
    alloc = BlockAllocator(num_blocks, block_size, enable_prefix_caching, free_order=free_order)
    return alloc, [apply_op(alloc, op) for op in ops]


def all_seq_ids(ops: Sequence[tuple]) -> list:
    ids: list = []
    for op in ops:
        for s in ([op[1], op[2]] if op[0] == "fork" else [op[1]]):
            if s not in ids:
                ids.append(s)
    return ids


def draw_steps(ops: Sequence[tuple], steps: Sequence[int], num_blocks: int, block_size: int, cols: int = 8,
               free_order: Sequence[int] | None = None):
    """Small multiples: the pool after the first `k` operations, for each k in steps."""
    colors = seq_colors(all_seq_ids(ops))
    fig, axes = plt.subplots(len(steps), 1, figsize=(9, 1.45 * len(steps) * (-(-num_blocks // cols)) / 2 + 0.6))
    for ax, k in zip(list(axes) if len(steps) > 1 else [axes], steps):
        alloc, log = replay_ops(ops[:k], num_blocks, block_size, free_order=free_order)
        draw_pool(alloc, ax, cols=cols, colors=colors, title=f"after step {k}: {log[-1] if log else 'empty'}")
    fig.tight_layout()
    return fig


def plot_blocks_in_use(runs: dict, ax=None, title: str = "KV memory in use"):
    """One line per replayed trace (label -> kvlab.engine.replay.TraceStats): blocks in use
    after each engine step's scheduling."""
    ax = ax or plt.gca()
    for i, (label, stats) in enumerate(runs.items()):
        ax.plot(stats.used_blocks, color=PALETTE[i % len(PALETTE)], label=label)
    ax.set_xlabel("engine step")
    ax.set_ylabel("blocks in use")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return ax


def plot_prefill_work(runs: dict, ax=None, title: str = "prompt tokens: computed or from the prefix cache"):
    """Horizontal stacked bars, one per trace (label -> TraceStats): prompt tokens the forward
    passes computed (recomputation included) and those the prefix cache supplied; the hit rate
    is written at the end of each bar."""
    ax = ax or plt.gca()
    labels = list(runs)
    y = range(len(labels))
    computed = [runs[k].prefill_tokens for k in labels]
    cached = [runs[k].cached_tokens for k in labels]
    ax.barh(y, computed, color=PALETTE[0], label="computed (prefilled)")
    ax.barh(y, cached, left=computed, color=PALETTE[2], label="from the prefix cache")
    for i, k in enumerate(labels):
        ax.text(runs[k].prompt_tokens, i, f" {runs[k].hit_rate:.0%}", va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("prompt tokens admitted")
    ax.set_xlim(0, max(runs[k].prompt_tokens for k in labels) * 1.15)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)   # below: clear of the bars
    return ax


def plot_replay(stats, num_blocks: int, slab: int | None = None, ax=None, title: str | None = None):
    """One replayed trace (TraceStats) over its engine steps: requests running (left axis, with
    their median, and `slab`, the requests a contiguous reservation fits) and blocks in use
    (right axis, out of num_blocks). One legend lists every line of both axes."""
    import statistics

    ax = ax or plt.gca()
    running = list(stats.running)
    ax.plot(running, color=PALETTE[0], lw=1, label="paged: requests running")
    median = statistics.median(running)
    ax.axhline(median, color=PALETTE[0], ls=":", lw=1.2, label=f"paged: median, {median:g} requests")
    if slab is not None:
        ax.axhline(slab, color="gray", ls="--", label=f"contiguous: {slab} requests fit")
    ax.set_xlabel("engine step")
    ax.set_ylabel("requests running")
    ax.set_ylim(0, max(running + [slab or 0]) * 1.1)
    right = ax.twinx()
    right.plot(stats.used_blocks, color=PALETTE[1], alpha=0.6, lw=1, label="paged: blocks in use (right axis)")
    right.set_ylim(0, num_blocks * 1.05)
    right.set_ylabel(f"blocks in use (of {num_blocks})")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    ax.set_title(title or f"{stats.num_requests} requests, {stats.preemptions} preemptions", fontsize=10)
    return ax, right


OP_ARITY = {"allocate": 3, "append": 3, "fork": 3, "free": 2}   # tuple length of each operation
OP_USAGE = "allocate: seq, n_tokens or token ids; append: seq, n; fork: parent, child; free: seq"


def _count(value) -> bool:
    """A whole number of tokens >= 1 (bools are refused: True is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_op(op, where: str = "op") -> tuple:
    """One operation as a tuple, or TypeError/ValueError saying what is wrong with it (`where`
    names it in the message: "op", "ops[3]"). Checked: a known kind, the right number of
    arguments, hashable sequence ids, token counts that are whole numbers >= 1, token ids given
    as a list or tuple. What depends on the allocator's state (a sequence that does not exist,
    running out of blocks) is the allocator's to refuse when the operation runs."""
    if not isinstance(op, (tuple, list)) or not op:
        raise TypeError(f"{where} must be a tuple such as ('allocate', 'A', 6), got {op!r}")
    kind = op[0]
    if not isinstance(kind, str) or kind not in OP_ARITY:
        raise ValueError(f"{where} = {op!r}: unknown operation {kind!r}; use allocate, append, fork or free")
    if len(op) != OP_ARITY[kind]:
        raise ValueError(f"{where} = {op!r}: {kind!r} takes {OP_ARITY[kind] - 1} arguments ({OP_USAGE})")
    op = tuple(op)
    for seq in (op[1:] if kind == "fork" else op[1:2]):
        try:
            hash(seq)
        except TypeError:
            raise TypeError(f"{where} = {op!r}: a sequence id must be hashable (a str, an int, a tuple), "
                            f"got {type(seq).__name__}") from None
    if kind == "allocate" and not (_count(op[2]) or (isinstance(op[2], (tuple, list)) and op[2])):
        raise ValueError(f"{where} = {op!r}: allocate takes a number of tokens >= 1 or a non-empty list of "
                         f"token ids, got {op[2]!r}")
    if kind == "append" and not _count(op[2]):
        raise ValueError(f"{where} = {op!r}: append takes a number of tokens >= 1, got {op[2]!r}")
    return op


def check_ops(ops) -> list[tuple]:
    """ops as a list of tuples, each checked by `check_op` (TypeError/ValueError naming ops[i])."""
    if isinstance(ops, (str, bytes)) or not isinstance(ops, Sequence):
        raise TypeError(f"ops must be a list of operations such as ('allocate', 'A', 6), got {type(ops).__name__}")
    return [check_op(op, f"ops[{i}]") for i, op in enumerate(ops)]


class AllocatorStepper:
    """Step through a list of operations; the pool is redrawn after each one.

    Buttons: back, next, reset; a slider picks any step. The allocator is rebuilt by
    replaying the first k operations, so going back is exact. An operation that fails
    (freeing a sequence that does not exist, running out of blocks) moves nothing: the
    slider goes back to the last step that worked, the pool drawn is that step's, and
    the message says what failed (`error`; `shown_step` is the step on screen)."""

    def __init__(self, ops: Sequence[tuple], num_blocks: int = 24, block_size: int = 4, cols: int = 8,
                 enable_prefix_caching: bool = False, free_order: Sequence[int] | None = None):
        import ipywidgets as W
        from IPython.display import display

        self.ops, self.num_blocks, self.block_size, self.cols = check_ops(ops), num_blocks, block_size, cols
        self.enable_prefix_caching, self.free_order = enable_prefix_caching, free_order
        BlockAllocator(num_blocks, block_size, enable_prefix_caching, free_order=free_order)   # checks the pool
        self.colors = seq_colors(all_seq_ids(self.ops))
        self.error: str | None = None
        self.shown_step: int | None = None
        self.slider = W.IntSlider(value=0, min=0, max=len(self.ops), description="step")
        self.back, self.next = W.Button(description="back"), W.Button(description="next")
        self.reset = W.Button(description="reset")
        self.log = W.HTML()
        self.out = W.Output()
        self.back.on_click(lambda _: self._go(self.slider.value - 1))
        self.next.on_click(lambda _: self._go(self.slider.value + 1))
        self.reset.on_click(lambda _: self._go(0))
        self.slider.observe(self._on_slider, names="value")
        self.widget = W.VBox([W.HBox([self.back, self.next, self.reset, self.slider]), self.log, self.out])
        self._display = display
        self.redraw()

    def _go(self, k: int) -> None:
        k = max(0, min(len(self.ops), k))
        if k == self.slider.value:     # no change event: redraw anyway (a failed step is tried again)
            self.redraw()
        else:
            self.slider.value = k

    def _on_slider(self, change) -> None:
        self.redraw()

    def state(self, k: int | None = None) -> tuple[BlockAllocator, list[str]]:
        """The allocator after the first k operations (raises where one of them fails)."""
        k = self.slider.value if k is None else k
        return replay_ops(self.ops[:k], self.num_blocks, self.block_size, self.enable_prefix_caching,
                          self.free_order)

    def _replay(self, k: int) -> tuple[BlockAllocator, list[str], str | None]:
        """The allocator after the first k operations, or after those before the first that
        fails (rebuilt without it, so that nothing half-done shows), and what failed."""
        alloc = BlockAllocator(self.num_blocks, self.block_size, self.enable_prefix_caching,
                               free_order=self.free_order)
        lines: list[str] = []
        for i, op in enumerate(self.ops[:k]):
            try:
                lines.append(apply_op(alloc, op))
            except Exception as err:    # noqa: BLE001  (the learner's operation failed: say so, draw step i)
                alloc, lines = self.state(i)
                return alloc, lines, f"step {i + 1}, {op!r}, failed: {type(err).__name__}: {err}"
        return alloc, lines, None

    def redraw(self) -> None:
        """Draw the pool at the slider's step (or the last step before it that worked). Never raises:
        it is called from widget callbacks."""
        try:
            alloc, lines, self.error = self._replay(self.slider.value)
            if len(lines) != self.slider.value:         # a failed step: the slider follows the drawing
                self.slider.unobserve(self._on_slider, names="value")
                self.slider.value = len(lines)
                self.slider.observe(self._on_slider, names="value")
            step = self.slider.value
            nxt = f"<br>next: <code>{html.escape(repr(self.ops[step]))}</code>" if step < len(self.ops) else ""
            text = f"<b>{html.escape(lines[-1]) if lines else 'empty pool'}</b>{nxt}"
            if self.error:
                text += error_html(f"{self.error}; the pool stays at step {step}")
            self.log.value = text
            with self.out:
                self.out.clear_output(wait=True)
                fig, ax = plt.subplots(figsize=(9, 0.55 * (-(-self.num_blocks // self.cols)) + 1.0))
                draw_pool(alloc, ax, cols=self.cols, colors=self.colors)
                plt.show()
            self.shown_step = step
        except Exception as err:        # noqa: BLE001  (a bug: shown, never raised out of a callback)
            self.error = f"internal error ({type(err).__name__}: {err})"
            self.shown_step = None
            self.log.value = error_html(self.error)
            self.out.clear_output()

    def _ipython_display_(self):
        self._display(self.widget)
