"""The fused layer kernels (kvlab.kernels.fused) against the torch lines of HF's Llama code they
replace, and the fused forward pass against the reference one (Triton's interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.kernels.fused import (add_rms_norm, add_rms_norm_reference, rope_, rope_reference, silu_mul,
                                 silu_mul_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # the CPU runs the kernels interpreted
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_equals_hf_rmsnorm(dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=g).to(DEVICE, dtype)
    res = torch.randn(7, 96, generator=g).to(DEVICE, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(DEVICE, dtype)
    ref_out, ref_res = add_rms_norm_reference(x, None if res is None else res.clone(), w, 1e-5)
    out, new_res = add_rms_norm(x, None if res is None else res.clone(), w, 1e-5)
    # the residual add rounds as torch's does (checked bit for bit on a GPU); Triton's CPU interpreter
    # does not round bf16 casts as a GPU does, so there bf16 may differ by one unit in the last place
    exact = dtype == torch.float32 or x.is_cuda
    torch.testing.assert_close(new_res, ref_res, **(dict(atol=0, rtol=0) if exact else dict(atol=0, rtol=2 ** -7)))
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_equals_the_reference_on_strided_views(dtype):
    """q and k are views into one (N, (Hq + 2 Hkv) D) matmul output, as in the fused layer."""
    g = torch.Generator().manual_seed(1)
    n, hq, hkv, d = 5, 6, 2, 16
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(DEVICE, dtype)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
    angles = torch.randn(40, d // 2, generator=g)
    cos = torch.cat([angles.cos()] * 2, -1).to(DEVICE, dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(DEVICE, dtype)
    pos = torch.tensor([0, 3, 39, 7, 7], device=DEVICE)
    ref_q = rope_reference(q.clone(), cos[pos][:, None], sin[pos][:, None])
    ref_k = rope_reference(k.clone(), cos[pos][:, None], sin[pos][:, None])
    v_before = qkv[:, (hq + hkv) * d:].clone()
    rope_(q, k, cos, sin, pos)
    torch.testing.assert_close(q, ref_q, **TOL[dtype])
    torch.testing.assert_close(k, ref_k, **TOL[dtype])
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)                 # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_swiglu(dtype):
    gu = torch.randn(4, 2 * 1500, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    torch.testing.assert_close(silu_mul(gu), silu_mul_reference(gu), **TOL[dtype])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (interpreter) test; tests/test_gpu.py runs the engine on a GPU")
def test_fused_forward_equals_the_reference_forward(tiny_llama):
    """A flattened batch through the fused path (merged matmuls, fused kernels) equals the reference
    path, logits within fp32 round-off, and the engine with fused kernels matches HF's tokens."""
    from kvlab.model.attention import causal_attention

    model = kvlab.Transformer.from_hf(tiny_llama.hf_model)
    ids = torch.randint(0, 49152, (12,), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(12)
    attend = lambda i, q, k, v, p: causal_attention(i, q[None], k[None], v[None], p[None])[0]
    ref = model.forward(ids, pos, attend)
    model.use_fused_kernels()
    torch.testing.assert_close(model.forward(ids, pos, attend), ref, atol=1e-4, rtol=1e-4)
    prompt = tiny_llama.encode("The weather today is")
    out = kvlab.LLM(model=tiny_llama, fused_kernels=True).generate(
        [prompt], kvlab.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    x = torch.tensor([prompt])
    hf = tiny_llama.hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                      pad_token_id=2, eos_token_id=None)[0, len(prompt):].tolist()
    assert out[0].outputs[0].token_ids == hf


def test_gpt2_cannot_fuse():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = kvlab.Transformer.from_hf(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)))
    assert not model.can_fuse()
    with pytest.raises(ValueError, match="Llama-family"):
        model.use_fused_kernels()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (interpreter) test; tests/test_gpu.py captures the graphs")
def test_piecewise_path_equals_hf(tiny_llama):
    """The mixed-step path of piecewise CUDA graphs, run eagerly: each step's tokens padded up to a
    piece size in static buffers, pieces called in order, attention in between on the real tokens
    only. With chunked prefill (budget 24: pieces of 16 and 24 tokens, decode rows beside prompt
    chunks) every request's tokens equal HF generate's."""
    llm = kvlab.LLM(model=tiny_llama, fused_kernels=True, max_num_batched_tokens=24, max_num_seqs=4)
    runner = llm.engine.runner
    runner._build_pieces(capture=False)
    assert list(runner.pieces) == [16, 24]
    prompts = [tiny_llama.encode(t) for t in ("The weather today is", "Paged attention stores keys and values " * 6,
                                              "One, two, three, four, five, six, seven, eight, nine, ten, eleven,")]
    params = kvlab.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = list(llm.engine.stats)
    assert any(s.piecewise_graph and s.num_decode_seqs and s.num_prefill_seqs for s in stats)
    for prompt, out in zip(prompts, outs):
        x = torch.tensor([prompt])
        hf = tiny_llama.hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False,
                                          pad_token_id=2, eos_token_id=None)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == hf
