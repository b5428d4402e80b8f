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
    assert ax.get_title() == "decoding 3 tokens"


def test_measured_vs_flops_fits_the_rate():
    lengths = [16, 32]
    flops = {"ffn": [2e9, 4e9]}
    times = {"ffn": [0.1, 0.2]}                  # exactly 20 GFLOP/s
    ax = figures.plot_measured_vs_flops(lengths, times, flops)
    measured, predicted = ax.get_lines()
    np.testing.assert_allclose(predicted.get_ydata(), measured.get_ydata())
    assert "20 GFLOP/s" in predicted.get_label()


def test_attention_weights_colour_bar_is_labelled():
    ax = figures.plot_attention_weights(torch.tril(torch.ones(2, 2)) / 2, ["a", "b"])
    colorbar_axes = [a for a in ax.figure.axes if a is not ax]
    assert colorbar_axes[0].get_ylabel() == "attention weight (each row sums to 1)"


def test_intensity_draws_prefill_and_decode_on_two_panels():
    a, b = figures.plot_intensity([16, 32], [8.0, 16.0], [16, 32], [0.5, 0.6], ridges={"ridge": 295})
    assert list(a.get_lines()[0].get_ydata()) == [8.0, 16.0] and list(b.get_lines()[0].get_ydata()) == [0.5, 0.6]
    assert a.get_xlabel() != b.get_xlabel()                       # prompt length vs context: not one axis
    assert [list(ax.get_lines()[1].get_ydata()) for ax in (a, b)] == [[295, 295]] * 2
    assert a.get_ylim() == b.get_ylim()


def test_forward_time():
    ax = figures.plot_forward_time([16, 32], [0.1, 0.2], {"fit": [0.1, 0.21], "linear": [0.1, 0.19]})
    assert [line.get_label() for line in ax.get_lines()] == ["measured", "fit", "linear"]


def test_decode_batch_sweep_plots_tpot_and_tokens_per_second():
    a, b = figures.plot_decode_batch_sweep([1, 2, 4], [0.05, 0.05, 0.08])
    np.testing.assert_allclose(a.get_lines()[0].get_ydata(), [50, 50, 80])
    np.testing.assert_allclose(b.get_lines()[0].get_ydata(), [20, 40, 50])      # batch / TPOT
    np.testing.assert_allclose(b.get_lines()[1].get_ydata(), [20, 40, 80])      # batch / TPOT at batch 1
    assert a.get_ylabel() != b.get_ylabel()


def test_decode_intensity_by_batch_and_roofline():
    ax = figures.plot_decode_intensity_by_batch([1, 2], [1.0, 2.0], [3.0, 3.0], ridges={"H100": 295})
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[1.0, 2.0], [3.0, 3.0], [295, 295]]
    ax = figures.plot_roofline(1000.0, 2.0, {"weights": 4.0, "attention": 3.0e3})
    roof, ridge, weights, attention = ax.get_lines()
    assert list(ridge.get_xdata()) == [500.0, 500.0]
    assert list(weights.get_ydata()) == [8.0] and list(attention.get_ydata()) == [1000.0]   # min(peak, AI x BW)


def test_flop_shares_stack_to_one():
    spec = kvlab.ModelSpec.preset("smollm2-135m")
    lengths = [16, 1024, 8192]
    counts = [forward_flops(spec, T) for T in lengths]
    ax = figures.plot_flop_shares(lengths, counts, mark=1024)
    tops = ax.collections[-1].get_paths()[0].vertices[:, 1]            # the top layer reaches 1 everywhere
    np.testing.assert_allclose(tops.max(), 1.0)
    assert list(ax.get_lines()[0].get_xdata()) == [1024, 1024]


def test_conversation_plots_prefill_bars_and_kv_held():
    from kvlab.model.conversation import Turn
    turns = [Turn(prompt_tokens=40, reply_tokens=11, shared_tokens=0, cached_tokens=0),
             Turn(prompt_tokens=70, reply_tokens=21, shared_tokens=50, cached_tokens=48)]
    a, b = figures.plot_conversation(turns, kv_bytes_per_token=2**20)
    assert [p.get_height() for p in a.patches] == [40, 70, 40, 22]
    np.testing.assert_allclose(b.get_lines()[0].get_ydata(), [50, 90])       # MiB: kv_tokens x 1 MiB
