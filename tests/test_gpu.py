"""The same code on a CUDA GPU: kvlab's forward pass, the contiguous cache, and the engine (paged
cache, compiled Triton kernels, CUDA graphs), against HF on the GPU. Skipped without a GPU (CI has
none); run on one with `pytest tests/test_gpu.py tests/test_kernels.py`."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import kvlab
from kvlab.model.generate import greedy_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1,
              eos_token_id=None)   # head_dim 32, GQA 4; no EOS: every run generates what it asked for


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
    """HF generate, greedy. The attention mask is explicit: inferred from pad_token_id, it would mask
    out every prompt token that happens to equal the pad id."""
    ids = torch.tensor([prompt], device="cuda")
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                       pad_token_id=0)[0, len(prompt):].tolist()


def test_contiguous_cache_decoding_equals_hf_generate_on_gpu():
    hf = hf_model(torch.float32)
    model = kvlab.Transformer.from_hf(hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 40)]
    expected = [hf_greedy(hf, p, 24) for p in prompts]
    contiguous = [greedy_generate(model, torch.tensor([p], device="cuda"), 24).token_ids[0] for p in prompts]
    assert contiguous == expected


def engine_for(hf, **kwargs):
    from kvlab.model.loading import LoadedModel

    lm = LoadedModel("tiny-gpu", hf, None, kvlab.ModelSpec.from_hf_config(hf.config, name="tiny-gpu"))
    return kvlab.LLM(model=lm, skip_tokenizer_init=True, gpu_memory_utilization=0.3, **kwargs)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kwargs", [dict(), dict(max_num_batched_tokens=32, max_num_seqs=16),
                                    dict(num_kv_blocks=12, block_size=16)],
                         ids=["cuda graphs", "chunked prefill", "preemption"])
def test_engine_greedy_equals_hf_generate_on_gpu(kwargs, async_scheduling):
    """fp32 (bf16 ties would make greedy tokens flip): 12 prompts of 3..150 tokens through kvlab's
    engine on the GPU: decode steps replay captured CUDA graphs (the Triton kernel inside), mixed
    steps replay piecewise graphs with attention eager between them, blocks scattered, with
    asynchronous scheduling off and on; every token equals HF generate's. (How much the host's work
    hides under the GPU's is measured by kvlab.bench.step_probe: this 2-layer model's GPU work is too
    small to hide anything behind.)"""
    hf = hf_model(torch.float32)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 9, 17, 33, 40, 64, 5, 90, 150, 12, 77, 1)]
    expected = [hf_greedy(hf, p, 20) for p in prompts]
    llm = engine_for(hf, block_order_seed=0, async_scheduling=async_scheduling, **kwargs)
    assert llm.engine.runner.graphs, "no CUDA graph was captured"
    outs = llm.generate(prompts, kvlab.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = list(llm.engine.stats)
    assert any(s.cuda_graph for s in stats) and any(not s.cuda_graph for s in stats)
    assert llm.engine.runner.pieces, "no piecewise graph was captured"
    assert all(s.cuda_graph or s.piecewise_graph for s in stats)      # mixed steps replay graph pieces
    if "num_kv_blocks" in kwargs:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks
    assert all(s.async_scheduling == async_scheduling and s.spans["device"] for s in stats)


def test_engine_bf16_with_cuda_graphs_runs_and_matches_eager():
    """bf16, the engine's default on a GPU: the CUDA-graph path gives the eager path's tokens."""
    hf = hf_model(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (7, 30, 120)]
    params = kvlab.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    graphs = engine_for(hf).generate(prompts, params, use_tqdm=False)
    eager = engine_for(hf, enforce_eager=True).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in graphs] == [o.outputs[0].token_ids for o in eager]


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
