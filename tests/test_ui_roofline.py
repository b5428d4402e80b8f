"""kvlab.ui.roofline.DecodeRoofline through its Python API: set the controls, read what it shows."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import kvlab  # noqa: E402
from kvlab.model.flops import H100_SXM, decode_step_cost  # noqa: E402
from kvlab.ui.roofline import DecodeRoofline, roofline_models  # noqa: E402


def test_batch_slider_raises_the_weights_intensity_not_attentions():
    w = DecodeRoofline(model="llama-3-8b", batch_size=1, context=1024, plot=False)
    spec = kvlab.ModelSpec.preset("llama-3-8b")
    assert w.cost == decode_step_cost(spec, context=1024, batch_size=1)
    before = w.cost
    w.batch_size.value = 64
    assert w.cost == decode_step_cost(spec, context=1024, batch_size=64)
    assert w.cost.weights.intensity == pytest.approx(64 * before.weights.intensity)
    assert w.cost.attention.intensity == before.attention.intensity == 32 / 8       # Hq / Hkv in bf16
    assert f"{w.cost.tokens_per_second(H100_SXM):,.0f}" in w.results.value
    assert w.cost.tokens_per_second(H100_SXM) > 10 * before.tokens_per_second(H100_SXM)


def test_weights_turn_compute_bound_past_the_ridge():
    w = DecodeRoofline(model="smollm2-135m", batch_size=256, context=512, plot=False)
    assert "memory" in w.results.value.split("weights")[1].split("</tr>")[0]
    w.batch_size.value = 512                                                      # past the ridge of 295 FLOP/B
    assert "compute" in w.results.value.split("weights")[1].split("</tr>")[0]
    assert "memory" in w.results.value.split("attention")[1].split("</tr>")[0]


def test_context_past_the_model_is_a_message_not_a_traceback():
    w = DecodeRoofline(model="llama-3-8b", context=4096, plot=True)
    w.context.value = 65_536                                                      # llama-3-8b: 8,192 positions
    assert w.cost is None and "llama-3-8b takes at most 8,192 tokens" in w.error
    assert "kvlab-error" in w.results.value and w.figure is None and w.image.value == b""
    w.model.value = "qwen2.5-7b"                                                 # 32k positions: fits again
    assert w.error is None and w.cost.context == 65_536 and w.image.value[:4] == b"\x89PNG"


def test_figure_places_each_part_on_the_roof():
    w = DecodeRoofline(model="smollm2-135m", batch_size=8, context=1024)
    points = {line.get_label().split(":")[0]: line for line in w.figure.axes[0].get_lines()[2:]}
    for name, part in [("weights", w.cost.weights), ("attention", w.cost.attention)]:
        assert list(points[name].get_xdata()) == [part.intensity]
        assert list(points[name].get_ydata()) == [min(989.4, part.intensity * 3.35)]
    w.batch_size.value = 64
    points = {line.get_label().split(":")[0]: line for line in w.figure.axes[0].get_lines()[2:]}
    assert points["weights"].get_xdata()[0] == pytest.approx(64, rel=1e-3)     # tied embeddings: ≈ batch size
    assert points["attention"].get_xdata()[0] == 3.0                            # 9 query heads / 3 KV heads


def test_models_offered():
    models = roofline_models()
    assert "smollm2-135m" in models and "deepseek-v2-lite" not in models
