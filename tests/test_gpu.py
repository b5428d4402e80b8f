"""The same code on a CUDA GPU: kvlab's forward pass, the contiguous cache and the paged cache
with the compiled Triton kernel, against HF on the GPU. Skipped without a GPU (CI has none);
run on one with `pytest tests/test_gpu.py tests/test_kernels.py`."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import kvlab
from kvlab.model.generate import greedy_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1)   # head_dim 32, GQA 4


def hf_model(dtype):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_logits_equal_hf_on_gpu(dtype, tol):
    hf = hf_model(dtype)
    ids = torch.randint(0, 512, (3, 70), device="cuda")
    ours, ref = kvlab.Transformer.from_hf(hf)(ids).float(), hf(ids).logits.float()
    assert (ours - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())


def hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt], device="cuda")
    return hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()


def test_contiguous_and_paged_triton_decoding_equal_hf_generate_on_gpu():
    """fp32 (bf16 ties would make greedy tokens flip): three prompts of different lengths;
    the paged path decodes every step through the compiled Triton kernel, blocks scattered."""
    from kvlab.kernels import paged_attention
    from kvlab.paged import greedy_generate_paged

    hf = hf_model(torch.float32)
    model = kvlab.Transformer.from_hf(hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 40)]
    expected = [hf_greedy(hf, p, 24) for p in prompts]
    contiguous = [greedy_generate(model, torch.tensor([p], device="cuda"), 24).token_ids[0] for p in prompts]
    paged = greedy_generate_paged(model, prompts, 24, block_size=16, seed=0, decode_attention=paged_attention)
    assert contiguous == expected
    assert paged == expected


def test_paged_cache_write_on_gpu_uses_the_kernel_and_equals_the_cpu_scatter():
    """PagedKVCache.write on CUDA goes through kvlab.kernels.store_kv; the CPU path is its reference."""
    from kvlab.paged import PagedKVCache

    gpu = PagedKVCache(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=2, head_dim=64,
                       dtype=torch.float16, device="cuda")
    cpu = PagedKVCache(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    slots = torch.tensor([3, 17, -1, 100, 127, 40])
    k, v = torch.randn(2, 6, 2, 64).unbind(0)
    for layer in (0, 1):
        gpu.write(layer, slots.cuda(), k.cuda(), v.cuda())
        cpu.write(layer, slots, k, v)
    assert torch.equal(gpu.kv.cpu(), cpu.kv)
