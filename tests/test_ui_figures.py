"""kvlab.ui.figures draws what it is given: the plotted points are the numbers passed in."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import kvlab  # noqa: E402
from kvlab.model.flops import forward_flops  # noqa: E402
from kvlab.ui import figures  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_flops_by_part_plots_each_part_and_total():
    spec = kvlab.ModelSpec.preset("smollm2-135m")
    lengths = [16, 64, 256]
    counts = [forward_flops(spec, T) for T in lengths]
    ax = figures.plot_flops_by_part(lengths, counts, per_token=True)
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    np.testing.assert_allclose(lines["attention (QKᵀ, AV)"], [c.attention / T for c, T in zip(counts, lengths)])
    np.testing.assert_allclose(lines["total"], [c.total / T for c, T in zip(counts, lengths)])
    assert len(lines) == 5


def test_attention_weights_accepts_a_tensor_that_requires_grad():
    w = torch.tril(torch.ones(3, 3)).requires_grad_()
    ax = figures.plot_attention_weights(w, ["a", "b", "c"])
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), w.detach().numpy())


def test_ttft_tpot_and_decode_steps_plot_milliseconds():
    a, b = figures.plot_ttft_tpot([16, 32], [0.1, 0.2], [16, 32], [0.05, 0.06])
    np.testing.assert_allclose(a.get_lines()[0].get_ydata(), [100, 200])
    np.testing.assert_allclose(b.get_lines()[0].get_ydata(), [50, 60])
    ax = figures.plot_decode_steps([1.0, 0.2, 0.3], [1.0, 0.05, 0.05])    # step 0 (prefill) is left out
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [200, 300])
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), [50, 50])


def test_measured_vs_flops_fits_the_rate():
    lengths = [16, 32]
    flops = {"ffn": [2e9, 4e9]}
    times = {"ffn": [0.1, 0.2]}                  # exactly 20 GFLOP/s
    ax = figures.plot_measured_vs_flops(lengths, times, flops)
    measured, predicted = ax.get_lines()
    np.testing.assert_allclose(predicted.get_ydata(), measured.get_ydata())
    assert "20 GFLOP/s" in predicted.get_label()


def test_intensity_and_forward_time():
    ax = figures.plot_intensity([16, 32], [8.0, 16.0], [16, 32], [0.5, 0.5], ridges={"ridge": 295})
    assert [line.get_ydata()[0] for line in ax.get_lines()[:2]] == [8.0, 0.5]
    ax = figures.plot_forward_time([16, 32], [0.1, 0.2], {"fit": [0.1, 0.21], "linear": [0.1, 0.19]})
    assert [line.get_label() for line in ax.get_lines()] == ["measured", "fit", "linear"]
