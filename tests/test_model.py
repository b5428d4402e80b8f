"""kvlab's own forward pass against Hugging Face transformers on the same weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

import kvlab
from kvlab.cache import ContiguousKVCache
from kvlab.model.generate import greedy_generate

PROMPTS = [
    "The factory production line optimization requires",
    "Paged attention stores the KV cache in",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
    "The capital of France is",
]


def random_ids(vocab, batch, length):
    return torch.randint(0, vocab, (batch, length))


@pytest.mark.parametrize("name", ["tiny-llama-random", "tiny-gpt2-random"])
def test_logits_equal_hf_tiny(name):
    lm = kvlab.load_model(name)
    model = kvlab.Transformer.from_hf(lm.hf_model)
    for batch, length in [(1, 1), (2, 17), (3, 64)]:
        ids = random_ids(lm.spec.vocab_size, batch, length)
        logits = model(ids)
        assert logits.shape == (batch, length, lm.spec.vocab_size)
        torch.testing.assert_close(logits, lm.hf_model(ids).logits, rtol=0, atol=1e-4)


def test_logits_equal_hf_smollm2(smollm2):
    model = kvlab.Transformer.from_hf(smollm2.hf_model)
    ids = random_ids(smollm2.spec.vocab_size, 2, 48)
    torch.testing.assert_close(model(ids), smollm2.hf_model(ids).logits, rtol=0, atol=1e-3)


@pytest.mark.parametrize("config", [
    MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, sliding_window=4096),
    Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4),
], ids=["mistral-gqa", "qwen2-bias"])
def test_logits_equal_hf_other_llama_family(config):
    hf = AutoModelForCausalLM.from_config(config).eval()
    ids = random_ids(config.vocab_size, 2, 20)
    torch.testing.assert_close(kvlab.Transformer.from_hf(hf)(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_weights_are_shared_not_copied(tiny_llama):
    model = kvlab.Transformer.from_hf(tiny_llama.hf_model)
    hf_layer = tiny_llama.hf_model.model.layers[0]
    assert model.layers[0].q.weight.data_ptr() == hf_layer.self_attn.q_proj.weight.data_ptr()
    assert model.embed_tokens.data_ptr() == tiny_llama.hf_model.model.embed_tokens.weight.data_ptr()


def test_greedy_with_cache_equals_hf_generate(smollm2):
    """5 prompts, 32 tokens each: kvlab's cached decoding and HF generate pick the same tokens."""
    model = kvlab.Transformer.from_hf(smollm2.hf_model)
    eos = smollm2.tokenizer.eos_token_id
    for prompt in PROMPTS:
        ids = torch.tensor([smollm2.encode(prompt)])
        ours = greedy_generate(model, ids, max_new_tokens=32, eos_token_id=eos).token_ids[0]
        ref = smollm2.hf_model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        assert ours == ref, prompt


@pytest.mark.parametrize("name", ["tiny-llama-random", "tiny-gpt2-random"])
def test_cached_decode_equals_recompute(name):
    lm = kvlab.load_model(name)
    model = kvlab.Transformer.from_hf(lm.hf_model)
    ids = random_ids(lm.spec.vocab_size, 3, 11)
    cached = greedy_generate(model, ids, max_new_tokens=20, use_cache=True)
    recomputed = greedy_generate(model, ids, max_new_tokens=20, use_cache=False)
    assert cached.token_ids == recomputed.token_ids


def test_cached_step_logits_equal_full_sequence_logits(smollm2):
    """The last token plus the cache gives the same logits as the whole sequence."""
    model = kvlab.Transformer.from_hf(smollm2.hf_model)
    ids = torch.tensor([smollm2.encode(PROMPTS[0])])
    T = ids.shape[1]
    cache = ContiguousKVCache.for_spec(model.spec, batch_size=1, max_seq_len=T)
    model(ids[:, :-1], attn=cache)                                   # prefill all but the last token
    step = model(ids[:, -1:], positions=torch.tensor([[T - 1]]), attn=cache)
    torch.testing.assert_close(step[:, -1], model(ids)[:, -1], rtol=0, atol=1e-3)


def test_contiguous_cache_layout_and_bytes(smollm2):
    spec = smollm2.spec
    cache = ContiguousKVCache.for_spec(spec, batch_size=2, max_seq_len=100)
    assert cache.k[0].shape == (2, 100, spec.num_kv_heads, spec.head_dim)
    assert cache.nbytes == 2 * spec.num_layers * 2 * 100 * spec.num_kv_heads * spec.head_dim * 4


def test_cache_rejects_position_beyond_capacity(tiny_llama):
    model = kvlab.Transformer.from_hf(tiny_llama.hf_model)
    cache = ContiguousKVCache.for_spec(model.spec, batch_size=1, max_seq_len=4)
    with pytest.raises(ValueError, match="max_seq_len 4"):
        model(torch.zeros(1, 5, dtype=torch.long), attn=cache)


def test_bad_input_shape(tiny_llama):
    model = kvlab.Transformer.from_hf(tiny_llama.hf_model)
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_unsupported_architecture_is_refused():
    from transformers import OPTConfig
    hf = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                    ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match="not 'opt'"):
        kvlab.Transformer.from_hf(hf)


# ---------------------------------------------------------------- ModelSpec.from_hf_config

SPEC_CONFIGS = {
    "llama-gqa": LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "llama-mqa": LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1),
    "mistral": MistralConfig(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, sliding_window=256),
    "qwen2": Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gpt2": GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=128),
}
EXPECTED = {  # (attention, num_kv_heads, head_dim, sliding_window)
    "llama-gqa": ("gqa", 2, 8, None), "llama-mqa": ("mqa", 1, 16, None), "mistral": ("gqa", 2, 16, 256),
    "qwen2": ("gqa", 2, 16, None), "gpt2": ("mha", 4, 16, None),
}


@pytest.mark.parametrize("name", SPEC_CONFIGS)
def test_spec_from_hf_config_matches_the_instantiated_model(name):
    config = SPEC_CONFIGS[name]
    spec = kvlab.ModelSpec.from_hf_config(config)
    assert (spec.attention, spec.num_kv_heads, spec.head_dim, spec.sliding_window) == EXPECTED[name]
    hf = AutoModelForCausalLM.from_config(config)
    assert spec.num_params == sum(p.numel() for p in hf.parameters())   # independent count


def test_spec_from_dict_and_mla_fields():
    """DeepSeek-V3's published config (excerpt): MLA caches a 512-wide latent plus a 64-wide RoPE key."""
    spec = kvlab.ModelSpec.from_hf_config(dict(
        model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
        num_key_value_heads=128, intermediate_size=18432, moe_intermediate_size=2048, vocab_size=129280,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128))
    assert (spec.attention, spec.kv_lora_rank, spec.qk_rope_head_dim, spec.head_dim) == ("mla", 512, 64, 192)


def test_spec_of_smollm2(smollm2):
    s = smollm2.spec
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert s.attention == "gqa" and s.num_params == 134_515_008


def test_spec_invariants():
    with pytest.raises(ValueError, match="multiple of"):
        kvlab.ModelSpec(name="x", num_layers=1, hidden_size=64, num_heads=6, num_kv_heads=4, head_dim=16,
                        intermediate_size=64, vocab_size=10)


def test_spec_attention_kind_is_read_off_the_head_counts():
    """Regression: ModelSpec(num_heads=8, num_kv_heads=2) without `attention` used to be labelled "mha"."""
    shape = dict(name="x", num_layers=1, hidden_size=64, head_dim=8, intermediate_size=64, vocab_size=10)
    assert kvlab.ModelSpec(num_heads=8, num_kv_heads=2, **shape).attention == "gqa"
    assert kvlab.ModelSpec(num_heads=8, num_kv_heads=1, **shape).attention == "mqa"
    assert kvlab.ModelSpec(num_heads=8, num_kv_heads=8, **shape).attention == "mha"
    with pytest.raises(ValueError, match="make it 'gqa'"):
        kvlab.ModelSpec(num_heads=8, num_kv_heads=2, attention="mha", **shape)


def test_sliding_window_model_refuses_positions_past_its_window():
    """kvlab's attention has no window: past it, logits would silently differ from HF's, so it refuses."""
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    hf = AutoModelForCausalLM.from_config(config).eval()
    model = kvlab.Transformer.from_hf(hf)
    ids = random_ids(128, 1, 8)
    torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)   # up to the window: equal
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        model(random_ids(128, 1, 9))
