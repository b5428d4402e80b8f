"""EngineXRay: an ipywidgets app over kvlab.ui.xray.XRay (notebook 07, section 4).

Buttons step a real engine on the real model and redraw its queues, block tables, block pool and
the text generated so far; the slider revisits earlier steps.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from kvlab.ui.figures import error_html, png
from kvlab.ui.xray import XRay, draw_snapshot, snapshot_html


class EngineXRay:
    """Step a real engine and watch it: the step's report (who was admitted, chunked, preempted,
    finished, and why the queue's head waits), the waiting and running queues, every request's
    block table and text so far, and the pool's block grid.

    Buttons: back / next (next steps the engine when at the newest snapshot), run to the end,
    reset (a fresh engine). The slider moves over the steps taken. Callbacks never raise: an
    error shows in the message line and the drawing stays at the last step that worked
    (`shown_step`). Arguments as for XRay."""

    def __init__(self, model, requests: Sequence[tuple], cols: int = 12, **engine_kwargs):
        import ipywidgets as W

        self._args = (model, list(requests), dict(engine_kwargs))
        self.cols = cols
        self.error: str | None = None
        self.shown_step: int | None = None
        self.xray = XRay(model, requests, **engine_kwargs)
        self.slider = W.IntSlider(value=0, min=0, max=0, description="step")
        self.back_button, self.next_button = W.Button(description="back"), W.Button(description="next step")
        self.run_button, self.reset_button = W.Button(description="run to the end"), W.Button(description="reset")
        self.message = W.HTML()
        self.info = W.HTML()
        self.image = W.Image(format="png")
        self.back_button.on_click(lambda _: self.back())
        self.next_button.on_click(lambda _: self.next())
        self.run_button.on_click(lambda _: self.run())
        self.reset_button.on_click(lambda _: self.reset())
        self.slider.observe(lambda _: self.show(self.slider.value), names="value")
        self.widget = W.VBox([W.HBox([self.back_button, self.next_button, self.run_button, self.reset_button,
                                      self.slider]), self.message, self.info, self.image])
        self.show(0)

    # the verbs (what the buttons call; each never raises)
    def next(self) -> None:
        k = self.slider.value
        if k < len(self.xray.snapshots) - 1:
            self._go(k + 1)
            return
        self._guard(self.xray.step)
        self._go(len(self.xray.snapshots) - 1)

    def back(self) -> None:
        self.error = None                     # the last error was about stepping forward
        self._go(max(0, self.slider.value - 1))

    def run(self) -> None:
        self._guard(self.xray.run)
        self._go(len(self.xray.snapshots) - 1)

    def reset(self) -> None:
        model, requests, kwargs = self._args
        if self._guard(lambda: setattr(self, "xray", XRay(model, requests, **kwargs))):
            self._go(0)

    def show(self, k: int) -> None:
        """Draw snapshot k (clamped to the steps taken). Never raises."""
        try:
            k = max(0, min(int(k), len(self.xray.snapshots) - 1))
            snap = self.xray.snapshots[k]
            self.info.value = snapshot_html(snap, self.xray.colors)
            fig = Figure(figsize=(10, 0.5 * -(-snap.pool.num_blocks // self.cols) + 1.2), dpi=80)
            draw_snapshot(snap, self.xray.colors, fig.add_subplot(), cols=self.cols)
            fig.subplots_adjust(left=0.02, right=0.8, top=0.85, bottom=0.02)
            self.image.value = png(fig)
            self.shown_step = k
            done = " (every request is done)" if self.xray.done and k == len(self.xray.snapshots) - 1 else ""
            self.message.value = self._error_html() or f"step {k} of {len(self.xray.snapshots) - 1} taken{done}"
        except Exception as err:             # noqa: BLE001  (a callback must not raise: show it)
            self.error = f"internal error ({type(err).__name__}: {err})"
            self.message.value = self._error_html()

    # internals
    def _go(self, k: int) -> None:
        self.slider.max = len(self.xray.snapshots) - 1
        if self.slider.value == k:
            self.show(k)
        else:
            self.slider.value = k             # observe -> show

    def _guard(self, fn) -> bool:
        try:
            fn()
            self.error = None
            return True
        except Exception as err:             # noqa: BLE001  (the engine refused a request, or nothing is left)
            self.error = f"{type(err).__name__}: {err}"
            return False

    def _error_html(self) -> str:
        return error_html(self.error) if self.error else ""

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
