"""kvlab.model.flops against torch's own FLOP counter on real forward passes, and the byte
counts against the bytes of real tensors.

torch.utils.flop_counter.FlopCounterMode counts 2·m·k·n for every matmul the model really
runs. CPU attention is one fused kernel that it does not count, so attention runs on the
MATH backend here (plain batched matmuls, which it counts).
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import kvlab
from kvlab.model.activations import prefill
from kvlab.model.flops import (H100_SXM, PartCost, decode_step_cost, forward_flops, prefill_fit,
                               step_bytes)


def counted(fn) -> dict[str, int]:
    """Matmul FLOPs that torch counts while fn runs: {'mm': ..., 'bmm': ...} (bmm = attention here)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"mm": by_op.get("mm", 0) + by_op.get("addmm", 0), "bmm": by_op.get("bmm", 0)}


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("logits", ["all", "last"])
def test_prefill_flops_equal_the_matmuls_torch_counts(fixture, logits, request):
    lm = request.getfixturevalue(fixture)
    model = kvlab.Transformer.from_hf(lm.hf_model)
    ids = torch.randint(0, lm.spec.vocab_size, (2, 11))
    n = counted(lambda: prefill(model, ids, logits=logits))
    f = forward_flops(lm.spec, 11, batch_size=2, logits=logits)
    assert n["bmm"] == f.attention
    assert n["mm"] == f.projections + f.ffn + f.lm_head


def test_decode_flops_equal_the_matmuls_torch_counts(tiny_llama):
    model = kvlab.Transformer.from_hf(tiny_llama.hf_model)
    B, T = 3, 9
    cache = kvlab.ContiguousKVCache.for_spec(tiny_llama.spec, batch_size=B, max_seq_len=T + 1)
    ids = torch.randint(0, tiny_llama.spec.vocab_size, (B, T + 1))
    model(ids[:, :T], attn=cache)                                    # prefill T tokens into the cache
    n = counted(lambda: model(ids[:, T:], positions=torch.full((B, 1), T), attn=cache))
    f = forward_flops(tiny_llama.spec, 1, context=T, batch_size=B)
    assert n["bmm"] == f.attention and n["mm"] == f.projections + f.ffn + f.lm_head


def test_lm_head_on_the_last_token_moves_it_from_the_linear_to_the_constant_term():
    spec = kvlab.ModelSpec.preset("smollm2-135m")
    every, last = prefill_fit(spec, "all"), prefill_fit(spec, "last")
    lm_head_per_token = 2 * spec.hidden_size * spec.vocab_size
    assert every.constant == 0 and last.constant == lm_head_per_token
    assert every.linear - last.linear == lm_head_per_token
    assert every.quadratic == last.quadratic == 4 * spec.num_layers * spec.num_heads * spec.head_dim
    for fit, logits in [(every, "all"), (last, "last")]:
        for T in (1, 7, 100, 4096):
            assert fit(T) == forward_flops(spec, T, logits=logits).total
        T = fit.crossover_tokens                                     # attention equals the rest there
        assert fit.quadratic * T * T == pytest.approx(fit.constant + fit.linear * T, rel=1e-9)
    assert last.crossover_tokens < every.crossover_tokens


def test_decode_split_intensities(tiny_llama):
    """Attention: 2·Hq/(Hkv·bytes) FLOP/B at every batch and context; weights: about the batch size.
    Bytes are checked against real tensors: the model's parameters and a filled contiguous cache."""
    spec = tiny_llama.spec
    assert spec.num_params == sum(p.numel() for p in tiny_llama.hf_model.parameters())
    for B in (1, 4, 64):
        for context in (0, 15, 1000):
            cost = decode_step_cost(spec, context=context, batch_size=B, dtype_bytes=2)
            assert cost.attention.intensity == pytest.approx(2 * spec.num_heads / (spec.num_kv_heads * 2))
            assert cost.weights.bytes == spec.num_params * 2
            f = forward_flops(spec, 1, context=context, batch_size=B)
            assert cost.step.flops == f.total
            assert cost.step.bytes == step_bytes(spec, 1, context=context, batch_size=B, dtype_bytes=2)
    B, S = 3, 10
    cache = kvlab.ContiguousKVCache.for_spec(spec, batch_size=B, max_seq_len=S, dtype=torch.float16)
    assert decode_step_cost(spec, context=S - 1, batch_size=B, dtype_bytes=2).attention.bytes == cache.nbytes
    smol = kvlab.ModelSpec.preset("smollm2-135m")
    for B in (1, 8, 512):                                            # tied embeddings: nearly every weight is a matmul
        assert decode_step_cost(smol, 1024, B).weights.intensity == pytest.approx(B, rel=1e-3)


def test_roofline_time_is_the_slower_of_flops_and_bytes():
    part = PartCost(flops=10**12, bytes=10**9)                       # 1000 FLOP/B: compute-bound on an H100
    assert part.seconds(H100_SXM) == pytest.approx(1 / 989.4)
    part = PartCost(flops=10**9, bytes=10**9)                        # 1 FLOP/B: memory-bound
    assert part.seconds(H100_SXM) == pytest.approx(1 / 3350)
    cost = decode_step_cost(kvlab.ModelSpec.preset("llama-3-8b"), context=1024, batch_size=1)
    assert cost.seconds(H100_SXM) == pytest.approx(cost.step.bytes / 3.35e12)   # batch 1: all memory
    assert cost.tokens_per_second(H100_SXM) == pytest.approx(1 / cost.seconds(H100_SXM))


def test_bad_input_says_what_is_allowed():
    spec = kvlab.ModelSpec.preset("smollm2-135m")
    with pytest.raises(ValueError, match=r"logits must be one of \('all', 'last'\), got 'first'"):
        forward_flops(spec, 8, logits="first")
    with pytest.raises(ValueError, match="new_tokens > 0"):
        forward_flops(spec, 0)
    with pytest.raises(ValueError, match=r"dtype_bytes must be one of \[1, 2, 4\] \(bytes per element\), got 3"):
        decode_step_cost(spec, context=16, dtype_bytes=3)
    with pytest.raises(ValueError, match="MLA"):
        decode_step_cost(kvlab.ModelSpec.preset("deepseek-v3"), context=16)
