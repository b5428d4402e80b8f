"""kvlab.model.activations: the peak is the most bytes alive at once, checked on calls whose
allocations are known by construction, then on the real model against its tensor shapes."""

import pytest
import torch

import kvlab
from kvlab.model.activations import peak_memory, prefill, prefill_activation_peak, swiglu_prefill_peak_bytes

MB = 1_000_000


def test_peak_is_the_most_alive_at_once_not_the_sum():
    def one_after_another():
        a = torch.empty(MB // 4)               # 1 MB, freed before the next ones exist
        del a
        b = torch.empty(2 * MB // 4)           # 2 MB and 3 MB alive together: the peak
        c = torch.empty(3 * MB // 4)
        del b, c
        torch.empty(4 * MB // 4)               # 4 MB alone, freed at once: below 5 MB

    peak = peak_memory(one_after_another)
    assert peak.peak_bytes == 5 * MB
    assert peak.live_at_peak == (3 * MB, 2 * MB)
    assert peak.allocations == 4


def test_tensors_from_before_are_not_counted():
    weights = torch.empty(10 * MB // 4)
    peak = peak_memory(lambda: weights + weights)    # one new 10 MB tensor; the input is not new
    assert peak.peak_bytes == 10 * MB


@pytest.mark.parametrize("T", [32, 64])
def test_prefill_peak_is_three_ffn_intermediates_and_three_residual_copies(smollm2, T):
    """Measured on the real model: the shapes predict the peak to the byte, but for the positions
    vector (T int64) that the pass builds."""
    model = kvlab.Transformer.from_hf(smollm2.hf_model)
    spec = smollm2.spec
    peak = prefill_activation_peak(model, T, logits="last")
    assert peak.peak_bytes == swiglu_prefill_peak_bytes(spec, T, dtype_bytes=4) + 8 * T
    I, H = spec.intermediate_size, spec.hidden_size
    assert peak.live_at_peak[:6] == (4 * T * I,) * 3 + (4 * T * H,) * 3
    every = prefill_activation_peak(model, T, logits="all")          # logits for every token: T x vocab floats
    assert every.live_at_peak[0] == 4 * T * spec.vocab_size
    assert every.peak_bytes > peak.peak_bytes + 4 * (T - 1) * spec.vocab_size - 4 * T * (3 * I)


def test_prefill_returns_the_logits_of_the_whole_pass(tiny_llama):
    model = kvlab.Transformer.from_hf(tiny_llama.hf_model)
    ids = torch.randint(0, tiny_llama.spec.vocab_size, (2, 7))
    full = model(ids)
    assert torch.equal(prefill(model, ids, logits="all"), full)
    torch.testing.assert_close(prefill(model, ids, logits="last"), full[:, -1:])


def test_bad_input_says_what_is_allowed(tiny_llama):
    model = kvlab.Transformer.from_hf(tiny_llama.hf_model)
    with pytest.raises(ValueError, match="logits must be 'all' or 'last', got 'none'"):
        prefill(model, torch.zeros(1, 3, dtype=torch.long), logits="none")
    with pytest.raises(ValueError, match="seq_len > 0"):
        prefill_activation_peak(model, 0)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        peak_memory(lambda: None, device="meta")
    with pytest.raises(ValueError, match="SwiGLU"):
        swiglu_prefill_peak_bytes(kvlab.ModelSpec.preset("gpt2"), 16)
