"""kvlab.ui.forward.FlopSplit through its Python API: set the controls, read what it shows."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import kvlab  # noqa: E402
from kvlab.model.flops import forward_flops, prefill_fit  # noqa: E402
from kvlab.ui.forward import PROMPT_LENGTHS, FlopSplit, flop_models  # noqa: E402


def test_readout_follows_the_prompt_length_slider():
    w = FlopSplit(model="smollm2-135m", prompt_len=1024, plot=False)
    spec = kvlab.ModelSpec.preset("smollm2-135m")
    assert w.counts == forward_flops(spec, 1024)
    w.prompt_len.value = 4096
    assert w.counts == forward_flops(spec, 4096) and w.error is None
    assert f"{w.counts.attention / w.counts.total:.1%}" in w.results.value       # 51.3%: attention overtakes
    assert w.counts.attention > w.counts.total / 2
    w.prompt_len.value = 16
    assert w.counts.attention < w.counts.total / 100


def test_lm_head_toggle_moves_the_crossover():
    w = FlopSplit(model="smollm2-135m", prompt_len=1024, logits="all", plot=False)
    spec = kvlab.ModelSpec.preset("smollm2-135m")
    assert "3,891" in w.results.value
    w.logits.value = "last"
    assert w.counts == forward_flops(spec, 1024, logits="last")
    assert w.counts.lm_head == 2 * spec.hidden_size * spec.vocab_size
    assert f"{prefill_fit(spec, 'last').crossover_tokens:,.0f}" == "3,072" and "3,072" in w.results.value


def test_too_long_a_prompt_is_a_message_not_a_traceback():
    w = FlopSplit(model="smollm2-135m", prompt_len=8192, plot=True)
    w.model.value = "gpt2"                                                         # 1,024 positions at most
    assert w.counts is None and "gpt2 takes at most 1,024 tokens" in w.error
    assert "kvlab-error" in w.results.value and "Traceback" not in w.results.value
    assert w.figure is None and w.image.value == b""                               # no stale figure
    w.prompt_len.value = 512                                                       # fixing the input recovers
    assert w.error is None and w.counts == forward_flops(kvlab.ModelSpec.preset("gpt2"), 512)
    assert w.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    marker = w.figure.axes[0].get_lines()[0]                                       # the figure marks T = 512 ...
    assert list(marker.get_xdata()) == [512, 512]
    top = w.figure.axes[0].collections[-1].get_paths()[0].vertices[:, 0].max()    # ... on gpt2's range of T
    assert top == 1024


def test_choices():
    assert "deepseek-v3" not in flop_models() and "llama-3-8b" in flop_models()
    assert PROMPT_LENGTHS[:4] == [16, 24, 32, 48] and PROMPT_LENGTHS[-1] == 131_072
    with pytest.raises(Exception):
        FlopSplit(prompt_len=1000)                                                 # not on the slider
