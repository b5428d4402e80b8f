"""kvlab.ui.kernels (notebook 06): decode-step numbers against hand counts, figures draw what they are
given, and the split-K explorer through its Python API (the launcher's own choice; errors shown, never raised)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kvlab  # noqa: E402
from kvlab.bench.kernels import DecodeShape  # noqa: E402
from kvlab.kernels import choose_num_splits  # noqa: E402
from kvlab.kernels.flash_reference import tile_map  # noqa: E402
from kvlab.ui import kernels as K  # noqa: E402

LLAMA3 = kvlab.ModelSpec.preset("llama-3-8b")     # the benchmark's attention shape: 32 q / 8 KV heads, d 128


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_decode_step_is_every_layer_of_the_benchmarks_one_layer():
    """The benchmark's DecodeShape counts one layer; a step reads all 32 (issue 10: 1.07 GB was one layer)."""
    r = K.decode_step(LLAMA3, batch=64, context=4096, bandwidth=2e12)
    assert r["kv_bytes"] == 32 * DecodeShape(64, 4096).kv_bytes == 34_359_738_368
    assert r["weight_bytes"] == 2 * LLAMA3.num_params
    assert r["kv_seconds"] == r["kv_bytes"] / 2e12 and r["step_seconds"] == r["weight_seconds"] + r["kv_seconds"]
    assert r["tokens_per_second"] == pytest.approx(64 / r["step_seconds"])
    assert r["attention_intensity"] == pytest.approx(32 / 8 * 4097 / 4096)    # Hq/Hkv, the new token included
    one = K.decode_step(LLAMA3, 1, 4096, 2e12)
    assert r["linear_intensity"] == pytest.approx(64 * one["linear_intensity"])   # weights shared by the batch


def test_decode_roofline_plots_the_step_numbers():
    batches = [1, 8, 64]
    a, b = K.plot_decode_roofline(LLAMA3, batches, 4096, 3e12)
    lines = {line.get_label(): line.get_ydata() for line in a.get_lines()}
    rows = [K.decode_step(LLAMA3, n, 4096, 3e12) for n in batches]
    np.testing.assert_allclose(lines["attention (K/V)"], [r["attention_intensity"] for r in rows])
    np.testing.assert_allclose(lines["linear layers (weights)"], [r["linear_intensity"] for r in rows])
    weights, kv = b.containers
    np.testing.assert_allclose([p.get_height() for p in kv], [r["kv_seconds"] * 1e3 for r in rows])
    np.testing.assert_allclose([p.get_y() for p in kv], [r["weight_seconds"] * 1e3 for r in rows])


def test_tile_map_figure_shows_the_codes():
    codes = tile_map(100, 100, 16, 32)
    ax = K.plot_tile_map(codes)
    assert np.array_equal(ax.get_images()[0].get_array(), codes.numpy())


@pytest.mark.parametrize("batch", [1, 3, 16, 64, 300])
@pytest.mark.parametrize("context", [100, 2048, 32768])
def test_launch_plan_is_the_heuristic_and_covers_the_table(batch, context):
    p = K.launch_plan(batch, context, num_kv_heads=8, block_size=16, sms=132)
    table = -(-context // 16) * 16
    assert p["table_tokens"] == table
    wanted = choose_num_splits(batch, 8, table, 132)
    assert p["splits"] <= wanted and (p["splits"] - 1) * p["tokens_per_split"] < table <= p["splits"] * p["tokens_per_split"]
    assert p["tokens_per_split"] % 64 == 0 and p["grid"] == (batch, 8, p["splits"])
    if table % (wanted * 64) == 0:
        assert p["splits"] == wanted                      # nothing to drop: exactly the heuristic's choice


def test_launch_plan_bad_input():
    with pytest.raises(ValueError, match="context must be a positive integer, got 0"):
        K.launch_plan(1, 0)
    with pytest.raises(ValueError, match="batch must be a positive integer, got True"):
        K.launch_plan(True, 100)


def test_split_k_explorer_follows_its_sliders(monkeypatch):
    ex = K.SplitKExplorer(batch=1, context=32768)
    assert ex.plan["splits"] == 64 and "64 split(s)" in ex.readout.value and ex.message.value == ""
    assert ex.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    before = ex.image.value
    ex.batch.value = 64                                   # 512 programs: no split
    assert ex.plan["splits"] == 1 and "no split" in ex.readout.value and ex.image.value != before
    ex.batch.value, ex.context.value = 16, 16384
    assert ex.plan["splits"] == 4 and ex.plan["tokens_per_split"] == 4096   # the heuristic wants 5: rounded down
    ex.gpu.value = "A100 (108 SMs)"
    assert ex.plan["splits"] == choose_num_splits(16, 8, 16384, 108) and "108 SMs" in ex.readout.value
    ex.block_size.value = 256
    assert ex.plan["table_tokens"] == 16384 and "blocks of 256" in ex.readout.value

    def broken(*args, **kwargs):
        raise ValueError("launch planning failed")
    monkeypatch.setattr(K, "launch_plan", broken)
    ex.num_kv_heads.value = 4                             # the callback must not raise
    assert "launch planning failed" in ex.message.value and ex.readout.value == "" and ex.plan is None
    monkeypatch.undo()
    ex.num_kv_heads.value = 2
    assert ex.message.value == "" and ex.plan["grid"][1] == 2
