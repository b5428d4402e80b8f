"""KV-cache memory math, checked against hand derivations and against real cache tensors."""

from __future__ import annotations

import html

import numpy as np
import pytest
import torch

import kvlab
from kvlab.memory import (GiB, MiB, DEFAULT_RESERVE_BYTES, kv_heads_per_gpu, measured_cache_bytes,
                          rule_of_thumb_bytes_per_token, weight_bytes)

# Bytes per token at fp16 (2 bytes an element), derived by hand from each published config:
#   MHA/GQA/MQA: num_hidden_layers * 2 (K and V) * num_key_value_heads * head_dim * 2
#   MLA:         num_hidden_layers * (kv_lora_rank + qk_rope_head_dim) * 2
# head_dim = hidden_size / num_attention_heads unless the config names it.
HAND_DERIVED_FP16 = {
    "gpt2":             12 * 2 * 12 * (768 // 12) * 2,      # n_layer 12, n_head 12, n_embd 768      = 36,864
    "opt-13b":          40 * 2 * 40 * (5120 // 40) * 2,     # 40 layers, 40 heads, hidden 5120       = 819,200
    "llama-2-7b":       32 * 2 * 32 * (4096 // 32) * 2,     # 32 layers, 32 KV heads, hidden 4096    = 524,288
    "llama-2-13b":      40 * 2 * 40 * (5120 // 40) * 2,     # 40 layers, 40 KV heads, hidden 5120    = 819,200
    "smollm2-135m":     30 * 2 * 3 * 64 * 2,                # 30 layers, 3 KV heads, head_dim 64     = 23,040
    "llama-2-70b":      80 * 2 * 8 * (8192 // 64) * 2,      # 80 layers, 8 KV heads of 64, hid 8192  = 327,680
    "llama-3-8b":       32 * 2 * 8 * (4096 // 32) * 2,      # 32 layers, 8 KV heads, hidden 4096     = 131,072
    "llama-3-70b":      80 * 2 * 8 * (8192 // 64) * 2,      # 80 layers, 8 KV heads, hidden 8192     = 327,680
    "mistral-7b":       32 * 2 * 8 * (4096 // 32) * 2,      # 32 layers, 8 KV heads, hidden 4096     = 131,072
    "qwen2.5-7b":       28 * 2 * 4 * (3584 // 28) * 2,      # 28 layers, 4 KV heads, hidden 3584     = 57,344
    "falcon-7b":        32 * 2 * 1 * (4544 // 71) * 2,      # 32 layers, multi_query: 1 KV head, 64  = 8,192
    "deepseek-v2-lite": 27 * (512 + 64) * 2,                # 27 layers, kv_lora_rank 512, rope 64   = 31,104
    "deepseek-v3":      61 * (512 + 64) * 2,                # 61 layers, kv_lora_rank 512, rope 64   = 70,272
}


def test_every_preset_is_derived_by_hand():
    assert set(kvlab.list_presets()) == set(HAND_DERIVED_FP16)


@pytest.mark.parametrize("name", sorted(HAND_DERIVED_FP16))
def test_bytes_per_token_matches_hand_derivation(name):
    spec = kvlab.ModelSpec.preset(name)
    assert kvlab.kv_bytes_per_token(spec, "float16") == HAND_DERIVED_FP16[name]
    assert spec.source.startswith("https://huggingface.co/") and spec.source.endswith("config.json")
    assert spec.num_params and spec.num_params > 0


# The fields of each published config.json that decide the spec (copied from the files named in `source`).
PUBLISHED_CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "opt-13b": dict(model_type="opt", num_hidden_layers=40, hidden_size=5120, num_attention_heads=40, ffn_dim=20480,
                    max_position_embeddings=2048, vocab_size=50272),
    "llama-3-8b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                       max_position_embeddings=8192, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                       max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       max_position_embeddings=131072, sliding_window=131072, use_sliding_window=False,
                       tie_word_embeddings=False),
    "falcon-7b": dict(model_type="falcon", num_hidden_layers=32, hidden_size=4544, num_attention_heads=71,
                      multi_query=True, new_decoder_architecture=False, vocab_size=65024),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", num_hidden_layers=27, hidden_size=2048, num_attention_heads=16,
                             num_key_value_heads=16, intermediate_size=10944, moe_intermediate_size=1408,
                             kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, vocab_size=102400, max_position_embeddings=163840),
    "deepseek-v3": dict(model_type="deepseek_v3", num_hidden_layers=61, hidden_size=7168, num_attention_heads=128,
                        num_key_value_heads=128, intermediate_size=18432, moe_intermediate_size=2048,
                        kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, vocab_size=129280, max_position_embeddings=163840),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_presets_agree_with_from_hf_config(name):
    """A preset equals what ModelSpec.from_hf_config reads from the same published config
    (parameter counts too, where from_hf_config can count them: the dense GPT-2 and Llama families)."""
    read = kvlab.ModelSpec.from_hf_config(PUBLISHED_CONFIGS[name], name=name)
    preset = kvlab.ModelSpec.preset(name)
    assert read.replace(source=preset.source, num_params=read.num_params or preset.num_params) == preset


def test_numbers_usually_quoted_for_llama_7b():
    spec = kvlab.ModelSpec.preset("llama-2-7b")
    assert kvlab.kv_bytes_per_token(spec, "float16") == 524_288 == 512 * 1024
    assert kvlab.kv_cache_bytes(spec, 1024, kv_dtype="float16") == 512 * MiB
    assert kvlab.kv_cache_bytes(spec, 1024, batch_size=10, kv_dtype="float16") == 5 * GiB


def test_rule_of_thumb_overstates_gqa_by_head_ratio():
    for name in kvlab.list_presets():
        spec = kvlab.ModelSpec.preset(name)
        if spec.attention == "mla":
            continue
        thumb, real = rule_of_thumb_bytes_per_token(spec), kvlab.kv_bytes_per_token(spec)
        # thumb / real == num_heads / num_kv_heads (exactly, since hidden = num_heads * head_dim here)
        assert thumb * spec.num_kv_heads == real * spec.num_heads, name
    llama3 = kvlab.ModelSpec.preset("llama-3-8b")
    assert rule_of_thumb_bytes_per_token(llama3) == 4 * kvlab.kv_bytes_per_token(llama3)


@pytest.mark.parametrize("dtype, bits", [("float32", 32), ("fp32", 32), ("float16", 16), ("bfloat16", 16),
                                         ("bf16", 16), ("fp8", 8), ("int8", 8), ("int4", 4),
                                         (torch.float16, 16), (torch.bfloat16, 16), (torch.float32, 32)])
def test_kv_dtypes(dtype, bits):
    spec = kvlab.ModelSpec.preset("llama-3-8b")
    assert kvlab.kv_bytes_per_token(spec, dtype) == 32 * 2 * 8 * 128 * bits // 8


def test_int4_rounds_up_to_whole_bytes():
    odd = kvlab.ModelSpec("odd", num_layers=1, hidden_size=8, num_heads=1, num_kv_heads=1, head_dim=8,
                          intermediate_size=8, vocab_size=8, attention="mla", kv_lora_rank=3, qk_rope_head_dim=2)
    assert kvlab.kv_bytes_per_token(odd, "int4") == 3  # 5 elements * 4 bits = 20 bits -> 3 bytes


def test_mla_caches_latent_and_rope_key_only():
    v3 = kvlab.ModelSpec.preset("deepseek-v3")
    assert kvlab.kv_bytes_per_token(v3, "bfloat16") == 61 * 576 * 2
    # MHA with the same 128 heads of (128 nope + 64 rope) keys and 128-wide values would need
    # 61 * 128 * (192 + 128) * 2 bytes: MLA is 71x smaller.
    mha_equivalent = 61 * 128 * (192 + 128) * 2
    assert mha_equivalent // kvlab.kv_bytes_per_token(v3, "bfloat16") == 71
    # the latent is shared by all heads: tensor parallelism does not split it
    assert kvlab.kv_bytes_per_token(v3, "bfloat16", tensor_parallel=8) == 61 * 576 * 2
    plan = kvlab.memory_plan(v3, "H200-141GB", weight_dtype="fp8", tensor_parallel=8)
    assert plan.kv_bytes_per_token == 61 * 576 * 2 and any("latent" in n for n in plan.notes)


def test_sliding_window_stops_growing():
    mistral = kvlab.ModelSpec.preset("mistral-7b")
    per_token = kvlab.kv_bytes_per_token(mistral)
    assert kvlab.kv_cache_bytes(mistral, 1000) == 1000 * per_token
    assert kvlab.kv_cache_bytes(mistral, 4096) == 4096 * per_token
    assert kvlab.kv_cache_bytes(mistral, 32768) == 4096 * per_token
    llama3 = kvlab.ModelSpec.preset("llama-3-8b")
    assert kvlab.kv_cache_bytes(llama3, 8192) == 8192 * per_token  # same per-token size, no window
    plan = kvlab.memory_plan(mistral, "A100-80GB", context_len=32768)
    assert plan.kv_bytes_per_request == 4096 * plan.kv_bytes_per_token


def test_tensor_parallel_splits_kv_heads_then_replicates():
    spec = kvlab.ModelSpec.preset("llama-3-8b")   # 32 query heads, 8 KV heads
    full = kvlab.kv_bytes_per_token(spec)
    assert [kv_heads_per_gpu(spec, tp) for tp in (1, 2, 4, 8, 16, 32)] == [8, 4, 2, 1, 1, 1]
    assert kvlab.kv_bytes_per_token(spec, tensor_parallel=2) == full // 2
    assert kvlab.kv_bytes_per_token(spec, tensor_parallel=8) == full // 8
    assert kvlab.kv_bytes_per_token(spec, tensor_parallel=16) == full // 8   # replicated, stops shrinking
    plan = kvlab.memory_plan(spec, "H100-80GB", tensor_parallel=16)
    assert plan.kv_heads_replicated and any("replicated" in n for n in plan.notes)
    assert not kvlab.memory_plan(spec, "H100-80GB", tensor_parallel=8).kv_heads_replicated
    assert weight_bytes(spec, "bfloat16", tensor_parallel=2) == spec.num_params * 2 // 2


def test_memory_plan_by_hand():
    """Llama-3-8B, bf16 weights, fp8 KV, TP 2 on H100s, 8k context: every number derived by hand."""
    spec = kvlab.ModelSpec.preset("llama-3-8b")
    plan = kvlab.memory_plan(spec, gpu="H100-80GB", weight_dtype="bfloat16", kv_dtype="fp8",
                             context_len=8192, gpu_memory_utilization=0.9, tensor_parallel=2)
    usable = int(80 * GiB * 0.9)                        # 77,309,411,328
    weights = 8_030_261_248 * 2 // 2                    # bf16, half on each GPU
    per_token = 32 * 2 * (8 // 2) * 128 * 1             # 4 KV heads per GPU, 1 byte each
    budget = usable - weights - DEFAULT_RESERVE_BYTES
    assert (plan.usable_bytes, plan.weight_bytes, plan.kv_bytes_per_token) == (usable, weights, per_token)
    assert plan.kv_budget_bytes == budget
    assert plan.max_cached_tokens == budget // per_token == 2_081_463
    assert plan.max_concurrent_requests == budget // per_token // 8192 == 254
    assert plan.fits and plan.kv_bytes_per_request == 8192 * per_token


def test_weights_that_do_not_fit():
    plan = kvlab.memory_plan(kvlab.ModelSpec.preset("llama-3-70b"), "H100-80GB")   # 141 GB of bf16 weights
    assert not plan.fits
    assert plan.max_concurrent_requests == 0 and plan.max_cached_tokens == 0 and plan.kv_budget_bytes == 0
    assert "does not fit" in plan.notes[0]
    # ... but on 2 GPUs it does
    assert kvlab.memory_plan(kvlab.ModelSpec.preset("llama-3-70b"), "H100-80GB", tensor_parallel=2).fits


def test_custom_gpu_bytes_and_list_gpus():
    gpus = kvlab.list_gpus()
    for name in ("T4-16GB", "A10G-24GB", "L4-24GB", "RTX-4090-24GB", "A100-40GB", "A100-80GB",
                 "H100-80GB", "H200-141GB"):
        assert name in gpus
    spec = kvlab.ModelSpec.preset("smollm2-135m")
    assert kvlab.memory_plan(spec, gpus["A100-40GB"]) .max_concurrent_requests == \
        kvlab.memory_plan(spec, "A100-40GB").max_concurrent_requests


def test_concurrency_is_limited_by_kv_not_weights():
    """Llama-3-8B on one H100 at 4k: weights take 15 GiB, yet KV for 112 requests of 4k fills the rest."""
    plan = kvlab.memory_plan(kvlab.ModelSpec.preset("llama-3-8b"), "H100-80GB", context_len=4096)
    assert plan.kv_bytes_per_request == 4096 * 131_072 == 512 * MiB
    assert plan.max_concurrent_requests == (int(80 * GiB * 0.9) - 8_030_261_248 * 2 - GiB) // (512 * MiB) == 112
    assert plan.kv_budget_bytes > 3 * plan.weight_bytes


@pytest.mark.parametrize("call, message", [
    (lambda s: kvlab.kv_cache_bytes(s, 0), "seq_len"),
    (lambda s: kvlab.kv_cache_bytes(s, -5), "seq_len"),
    (lambda s: kvlab.kv_cache_bytes(s, 10, batch_size=0), "batch_size"),
    (lambda s: kvlab.kv_cache_bytes(s, 8193), "maximum context"),
    (lambda s: kvlab.kv_bytes_per_token(s, "float12"), "unknown dtype"),
    (lambda s: kvlab.memory_plan(s, gpu="B200"), "unknown GPU"),
    (lambda s: kvlab.memory_plan(s, gpu=-1), "gpu must be a GPU preset name .* or a positive whole number of bytes"),
    (lambda s: kvlab.memory_plan(s, tensor_parallel=3), "must divide"),
    (lambda s: kvlab.memory_plan(s, tensor_parallel=0), "tensor_parallel"),
    (lambda s: kvlab.memory_plan(s, context_len=100_000), "maximum context"),
    (lambda s: kvlab.memory_plan(s, gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (lambda s: kvlab.memory_plan(s, weight_dtype="int3"), "unknown dtype"),
])
def test_bad_input_raises_clear_value_error(call, message):
    spec = kvlab.ModelSpec.preset("llama-3-8b")
    with pytest.raises(ValueError, match=message) as info:
        call(spec)
    assert "allowed" in str(info.value) or "must" in str(info.value)


# ---- bad input: every message names the argument and what is allowed (issue 12) ----------------

SHAPE = dict(name="x", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
             intermediate_size=128, vocab_size=100, num_params=10_000)


@pytest.mark.parametrize("field, value, error, message", [
    ("num_layers", True, TypeError, "num_layers must be a positive integer below 2**63, got the bool True"),
    ("num_layers", 2.0, TypeError, "num_layers must be a positive integer below 2**63, got float 2.0"),
    ("hidden_size", "64", TypeError, "hidden_size must be a positive integer below 2**63, got str '64'"),
    ("head_dim", None, TypeError, "head_dim must be a positive integer below 2**63, got None"),
    ("num_params", -7_000_000_000, ValueError, "num_params must be a positive integer below 2**63 or None, got -7"),
    ("num_params", 0, ValueError, "num_params must be a positive integer below 2**63 or None, got 0"),
    ("num_params", 7e9, TypeError, "num_params must be a positive integer below 2**63 or None, got float"),
    ("sliding_window", 4096.5, TypeError, "sliding_window must be a positive integer below 2**63 or None"),
    ("sliding_window", 0, ValueError, "sliding_window must be a positive integer below 2**63 or None, got 0"),
    ("max_position_embeddings", -1, ValueError, "max_position_embeddings must be a positive integer"),
    ("intermediate_size", -1, ValueError, "intermediate_size must be a positive integer below 2**63, got -1"),
    ("vocab_size", 2**63, ValueError, "vocab_size must be a positive integer below 2**63, got 9223372036854775808"),
    ("attention", "linear", ValueError, "attention must be one of ('mha', 'gqa', 'mqa', 'mla') or None"),
    ("name", "", ValueError, "ModelSpec name must be a non-empty string"),
    ("name", None, TypeError, "ModelSpec name must be a non-empty string, got None"),
])
def test_spec_rejects_impossible_fields(field, value, error, message):
    """Before: a negative or zero num_params gave fits=True with a KV budget larger than the card,
    a fractional sliding window made byte counts floats, num_layers=True was one layer."""
    with pytest.raises(error) as info:
        kvlab.ModelSpec(**{**SHAPE, field: value})
    assert message in str(info.value)


@pytest.mark.parametrize("changes, message", [
    (dict(kv_lora_rank=-512, qk_rope_head_dim=64), "kv_lora_rank must be a positive integer below 2**63 or None"),
    (dict(kv_lora_rank=512, qk_rope_head_dim=0), "qk_rope_head_dim must be a positive integer below 2**63 or None"),
    (dict(kv_lora_rank=512), "MLA needs kv_lora_rank and qk_rope_head_dim"),
])
def test_spec_rejects_impossible_mla_fields(changes, message):
    """Before: a negative kv_lora_rank gave negative bytes per token and a negative request count."""
    with pytest.raises(ValueError) as info:
        kvlab.ModelSpec(**{**SHAPE, "num_kv_heads": 4, **changes})
    assert message in str(info.value)


def test_spec_takes_numpy_integers_as_plain_ints():
    spec = kvlab.ModelSpec(**{**SHAPE, "num_layers": np.int64(2), "num_params": np.int32(10_000),
                              "sliding_window": np.uint16(8)})
    assert spec == kvlab.ModelSpec(**{**SHAPE, "sliding_window": 8})
    assert type(spec.num_layers) is int and type(spec.num_params) is int and type(spec.sliding_window) is int
    assert kvlab.kv_bytes_per_token(spec, "float16") == 2 * 2 * 2 * 16 * 2


def test_from_hf_config_refuses_a_head_dim_it_would_have_to_floor():
    """hidden 100 over 3 heads is no whole head width; it used to become 33 without a word."""
    config = dict(model_type="llama", hidden_size=100, num_attention_heads=3, num_hidden_layers=2,
                  intermediate_size=64, vocab_size=100)
    with pytest.raises(ValueError, match="hidden size 100 is not divisible by 3 attention heads and the config "
                                         "names no head_dim"):
        kvlab.ModelSpec.from_hf_config(config)
    with pytest.raises(ValueError, match="not divisible"):
        kvlab.ModelSpec.from_hf_config(dict(model_type="gpt2", n_embd=100, n_head=3, n_layer=1, vocab_size=10))
    assert kvlab.ModelSpec.from_hf_config({**config, "head_dim": 32}).head_dim == 32   # named: no division


@pytest.mark.parametrize("config, error, message", [
    (None, TypeError, "config must be a transformers PretrainedConfig or a dict of its fields, got None"),
    ("llama-3-8b", TypeError, "got str 'llama-3-8b'"),
    (dict(model_type="llama", hidden_size=64), ValueError, "config has no 'num_attention_heads'"),
    (dict(model_type="llama", hidden_size=64.0, num_attention_heads=4, num_hidden_layers=2, intermediate_size=8,
          vocab_size=10), TypeError, "config hidden size must be a positive integer, got float 64.0"),
])
def test_from_hf_config_bad_configs(config, error, message):
    with pytest.raises(error) as info:
        kvlab.ModelSpec.from_hf_config(config)
    assert message in str(info.value)


@pytest.mark.parametrize("call, error, message", [
    (lambda s: kvlab.kv_bytes_per_token(None), TypeError, "spec must be a ModelSpec, got None"),
    (lambda s: kvlab.kv_bytes_per_token("llama-3-8b"), TypeError,
     "spec must be a ModelSpec (for a preset: ModelSpec.preset('llama-3-8b')), got str 'llama-3-8b'"),
    (lambda s: kvlab.memory_plan({"num_layers": 32}), TypeError, "spec must be a ModelSpec, got dict"),
    (lambda s: kvlab.kv_cache_bytes(s, 4096.0), TypeError, "seq_len must be a positive integer below 2**63, got float"),
    (lambda s: kvlab.kv_cache_bytes(s, True), TypeError, "seq_len must be a positive integer below 2**63, got the bool"),
    (lambda s: kvlab.kv_cache_bytes(s, 10, batch_size=None), TypeError, "batch_size must be a positive integer"),
    (lambda s: kvlab.kv_bytes_per_token(s, None), TypeError, "kv_dtype must be a dtype name or a torch.dtype"),
    (lambda s: kvlab.kv_bytes_per_token(s, torch.int64), ValueError, "kv_dtype: unknown dtype torch.int64; allowed"),
    (lambda s: kvlab.memory_plan(s, gpu=float("inf")), ValueError, "gpu must be a GPU preset name"),
    (lambda s: kvlab.memory_plan(s, gpu=float("nan")), ValueError, "positive whole number of bytes below 2**63, got nan"),
    (lambda s: kvlab.memory_plan(s, gpu=80.5e9 + 0.5), ValueError, "positive whole number of bytes"),
    (lambda s: kvlab.memory_plan(s, gpu=2**70), ValueError, "below 2**63, got 1180591620717411303424"),
    (lambda s: kvlab.memory_plan(s, gpu=None), TypeError, "gpu must be a GPU preset name"),
    (lambda s: kvlab.memory_plan(s, gpu_memory_utilization=float("nan")), ValueError,
     "gpu_memory_utilization must be a number in (0, 1], got nan"),
    (lambda s: kvlab.memory_plan(s, gpu_memory_utilization=True), TypeError,
     "gpu_memory_utilization must be a number in (0, 1], got the bool True"),
    (lambda s: kvlab.memory_plan(s, gpu_memory_utilization="0.9"), TypeError, "got str '0.9'"),
    (lambda s: kvlab.memory_plan(s, reserve_bytes=-1), ValueError, "reserve_bytes must be a whole number of bytes >= 0"),
    (lambda s: kvlab.memory_plan(s, reserve_bytes=float("inf")), ValueError, "reserve_bytes must be a whole number"),
    (lambda s: kvlab.memory_plan(s, context_len=8193), ValueError,
     "context_len 8193 exceeds llama-3-8b's maximum context of 8192 tokens; allowed: 1..8192"),
    (lambda s: kvlab.memory_plan(s, context_len=0), ValueError, "context_len must be a positive integer"),
    (lambda s: kvlab.memory_plan(s, tensor_parallel=2.0), TypeError, "tensor_parallel must be a positive integer"),
    (lambda s: kvlab.memory_plan(s, weight_dtype="fp6"), ValueError, "weight_dtype: unknown dtype 'fp6'; allowed"),
])
def test_bad_arguments_name_the_argument_and_what_is_allowed(call, error, message):
    spec = kvlab.ModelSpec.preset("llama-3-8b")
    with pytest.raises(error) as info:
        call(spec)
    assert message in str(info.value)


def test_numpy_numbers_are_numbers():
    """np.int64(4096) is a context length and np.float32(0.9) a utilization (they used to be
    refused with 'must be a positive integer, got np.int64(4096)')."""
    spec = kvlab.ModelSpec.preset("llama-3-8b")
    plain = kvlab.memory_plan(spec, "H100-80GB", context_len=4096, gpu_memory_utilization=0.875, tensor_parallel=2)
    numpy = kvlab.memory_plan(spec, "H100-80GB", context_len=np.int64(4096), gpu_memory_utilization=np.float32(0.875),
                              tensor_parallel=np.int8(2), reserve_bytes=np.int64(GiB))
    assert numpy == plain and type(numpy.context_len) is int and type(numpy.tensor_parallel) is int
    assert kvlab.memory_plan(spec, np.int64(80 * GiB)) == kvlab.memory_plan(spec, 80 * GiB)
    assert kvlab.memory_plan(spec, 85_899_345_920.0) == kvlab.memory_plan(spec, 80 * GiB)   # a whole float
    assert kvlab.kv_cache_bytes(spec, np.int32(1024), batch_size=np.int64(3)) == kvlab.kv_cache_bytes(spec, 1024, 3)


def test_tp_error_lists_allowed_degrees():
    with pytest.raises(ValueError, match=r"allowed: \[1, 71\]"):
        kvlab.kv_bytes_per_token(kvlab.ModelSpec.preset("falcon-7b"), tensor_parallel=2)
    with pytest.raises(ValueError, match="KV heads"):   # 12 divides 24 query heads but not 8 KV heads
        kvlab.kv_bytes_per_token(kvlab.ModelSpec.preset("llama-3-8b").replace(num_heads=24), tensor_parallel=12)


# ---- measured = predicted: the bytes of real cache tensors --------------------------------------

def _cache_after_prefill(model, input_ids):
    with torch.no_grad():
        out = model(input_ids, use_cache=True)
    return out.cache                       # transformers >= 5.24 (4.x called it past_key_values)


def test_measured_equals_predicted_gqa_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    spec = kvlab.ModelSpec.from_hf_config(config, name="tiny")
    for batch, n in [(1, 1), (1, 17), (3, 9)]:
        cache = _cache_after_prefill(model, torch.randint(0, 100, (batch, n)))
        assert measured_cache_bytes(cache) == kvlab.kv_cache_bytes(spec, n, batch_size=batch, kv_dtype="float32")
    cache = _cache_after_prefill(model.to(torch.bfloat16), torch.randint(0, 100, (2, 5)))
    assert measured_cache_bytes(cache) == kvlab.kv_cache_bytes(spec, 5, batch_size=2, kv_dtype="bfloat16")


def test_measured_equals_predicted_mla_tiny_deepseek():
    """transformers' DeepSeek-V3 caches the compressed latent and the RoPE key, as DeepSeek does."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=100, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                              q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                              first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=128)
    model = DeepseekV3ForCausalLM(config).eval()
    spec = kvlab.ModelSpec.from_hf_config(config, name="tiny-mla")
    assert spec.attention == "mla"
    cache = _cache_after_prefill(model, torch.randint(0, 100, (2, 11)))
    assert measured_cache_bytes(cache) == kvlab.kv_cache_bytes(spec, 11, batch_size=2, kv_dtype="float32") \
        == 2 * 11 * 2 * (16 + 8) * 4


def test_measured_sliding_window_tiny_mistral():
    """HF keeps window - 1 tokens between steps (the next token's K/V complete the window);
    kvlab counts the full window, the most a layer holds while it attends."""
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                           max_position_embeddings=128)
    model = MistralForCausalLM(config).eval()
    spec = kvlab.ModelSpec.from_hf_config(config, name="tiny-swa")
    per_token = kvlab.kv_bytes_per_token(spec, "float32")
    cache = _cache_after_prefill(model, torch.randint(0, 100, (1, 5)))     # shorter than the window
    assert measured_cache_bytes(cache) == kvlab.kv_cache_bytes(spec, 5, kv_dtype="float32")
    cache = _cache_after_prefill(model, torch.randint(0, 100, (1, 20)))    # longer: capped
    assert measured_cache_bytes(cache) == kvlab.kv_cache_bytes(spec, 20, kv_dtype="float32") - per_token
    assert kvlab.kv_cache_bytes(spec, 20, kv_dtype="float32") == kvlab.kv_cache_bytes(spec, 8, kv_dtype="float32")


def test_measured_equals_predicted_real_smollm2():
    """The real default model: after a prefill of N tokens its cache holds exactly kv_cache_bytes(spec, N)."""
    lm = kvlab.load_model("smollm2-135m")
    ids = torch.tensor([lm.encode("The factory production line optimization requires careful planning.")])
    n = ids.shape[1]
    cache = _cache_after_prefill(lm.hf_model, ids)
    kv_dtype = str(lm.dtype).removeprefix("torch.")
    assert lm.spec.num_layers == 30 and lm.spec.num_kv_heads == 3 and lm.spec.head_dim == 64
    assert measured_cache_bytes(cache) == kvlab.kv_cache_bytes(lm.spec, n, kv_dtype=kv_dtype) \
        == n * 30 * 2 * 3 * 64 * torch.tensor([], dtype=lm.dtype).element_size()
    assert kvlab.kv_bytes_per_token(lm.spec, "float16") == kvlab.kv_bytes_per_token(kvlab.ModelSpec.preset("smollm2-135m"))


# ---- the calculator's logic (its browser behaviour is tests/test_browser.py) --------------------

def test_calculator_shows_memory_plan_and_readable_errors():
    from kvlab.ui.memory_calculator import MemoryCalculator
    calc = MemoryCalculator(model="llama-3-8b", gpu="H100-80GB", context_len=4096, plot=False)
    expected = kvlab.memory_plan(kvlab.ModelSpec.preset("llama-3-8b"), "H100-80GB", context_len=4096)
    assert calc.plan == expected
    assert f"<span class='kvlab-max-concurrency'>{expected.max_concurrent_requests}</span>" in calc.results.value
    calc.model.value = "llama-2-7b"
    calc.context.value = 2048
    assert calc.plan == kvlab.memory_plan(kvlab.ModelSpec.preset("llama-2-7b"), "H100-80GB", context_len=2048)
    calc.context.value = 8192                     # beyond Llama-2's 4096: a message, not a traceback
    assert calc.plan is None and "maximum context" in calc.error
    assert "kvlab-error" in calc.results.value and "Traceback" not in calc.results.value
    assert "<span class='kvlab-max-concurrency'>n/a</span>" in calc.results.value
    calc.context.value = 4096
    calc.model.value = "falcon-7b"                # 71 heads: TP 2 is invalid
    calc.context.value, calc.tp.value = 2048, 2
    assert calc.plan is None and "allowed: [1, 71]" in calc.error
    calc.tp.value = 1
    calc.model.value = "llama-3-70b"              # does not fit on one GPU: a warning and 0
    assert calc.plan.max_concurrent_requests == 0 and "does not fit" in calc.results.value


def test_calculator_custom_model_and_gpu():
    from kvlab.ui.memory_calculator import MemoryCalculator
    calc = MemoryCalculator(plot=False)
    calc.model.value = "custom"
    calc.c_layers.value, calc.c_heads.value, calc.c_kv_heads.value, calc.c_head_dim.value = 32, 32, 8, 128
    calc.c_attention.value, calc.c_params_b.value = "gqa", 8.0
    assert calc.plan.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    calc.c_attention.value = "mqa"
    assert calc.plan.kv_bytes_per_token == 32 * 2 * 1 * 128 * 2
    calc.c_attention.value = "mla"
    assert calc.plan.kv_bytes_per_token == 32 * (512 + 64) * 2
    calc.c_heads.value = 20                      # not a multiple of the hidden KV-heads field (8): no matter for MLA
    assert calc.c_kv_heads.layout.display == "none" and calc.c_kv_heads.value == 8
    assert calc.error is None and calc.plan.kv_bytes_per_token == 32 * (512 + 64) * 2
    calc.c_heads.value = 0
    assert calc.plan is None and "query heads must be a positive integer" in calc.error
    calc.c_heads.value = 32
    calc.gpu.value = "custom"
    calc.gpu_gib.value = 24.0
    assert calc.plan.gpu_bytes == 24 * GiB
    calc.gpu_gib.value = 0.0
    assert calc.plan is None and "GPU memory must be a positive finite number of GiB, got 0.0" in calc.error


@pytest.mark.parametrize("field, value, message", [
    ("gpu_gib", float("inf"), "GPU memory must be a positive finite number of GiB, got inf"),   # was OverflowError
    ("gpu_gib", float("nan"), "GPU memory must be a positive finite number of GiB, got nan"),
    ("gpu_gib", -24.0, "GPU memory must be a positive finite number of GiB, got -24.0"),
    ("gpu_gib", 1e-12, "GPU memory must be at least 1 byte"),
    ("gpu_gib", 1e30, "below 2**63 bytes"),
    ("c_params_b", float("inf"), "params (billions) must be a positive finite number, got inf"),  # was OverflowError
    ("c_params_b", float("nan"), "params (billions) must be a positive finite number, got nan"),
    ("c_params_b", -8.0, "params (billions) must be a positive finite number, got -8.0"),
    ("c_params_b", 1e20, "params (billions) must be below"),
    ("c_layers", -3, "custom model: layers must be a positive integer, got -3"),
])
def test_calculator_shows_bad_custom_values_in_its_readout(field, value, message):
    """Issue 12: custom GPU size or parameter count set to inf raised OverflowError out of the
    callback and the readout kept the previous message. Now the readout says what is wrong, the
    figure is cleared, and a good value brings the plan back."""
    from kvlab.ui.memory_calculator import MemoryCalculator
    calc = MemoryCalculator(plot=False)
    calc.model.value, calc.gpu.value = "custom", "custom"
    good = calc.plan
    assert good is not None and calc.error is None
    widget = getattr(calc, field)
    before = widget.value
    widget.value = value                              # would raise here if the callback raised
    assert calc.plan is None and message in calc.error
    assert "kvlab-error" in calc.results.value and "<span class='kvlab-max-concurrency'>n/a</span>" in calc.results.value
    assert html.escape(message) in calc.results.value
    widget.value = before
    assert calc.plan == good and calc.error is None and "kvlab-error" not in calc.results.value


def test_comparison_rows():
    from kvlab.ui.memory_calculator import compare
    rows = compare(["llama-2-7b", "llama-3-8b", "falcon-7b", "deepseek-v3"], gpu="H100-80GB", context_len=2048)
    by = {r["model"]: r for r in rows}
    assert by["llama-3-8b"]["kv_bytes_per_token"] * 4 == by["llama-2-7b"]["kv_bytes_per_token"]
    assert by["falcon-7b"]["max_concurrent_requests"] > by["llama-3-8b"]["max_concurrent_requests"]
    assert by["deepseek-v3"]["fits"] is False and by["deepseek-v3"]["max_concurrent_requests"] == 0
    assert compare(["falcon-7b"], context_len=4096)[0]["error"].startswith("context_len 4096 exceeds")


def test_calculator_widgets_do_not_share_layouts():
    """Regression: one shared Layout let hiding the custom-model fields hide the model dropdown too
    (found by tests/test_browser.py: the dropdown had display:none in JupyterLab)."""
    from kvlab.ui.memory_calculator import MemoryCalculator
    calc = MemoryCalculator(plot=False)
    inputs = [calc.model, calc.kv_dtype, calc.weight_dtype, calc.gpu, calc.gpu_gib, calc.tp, calc.context,
              *calc.custom_box.children]
    assert len({id(w.layout) for w in inputs}) == len(inputs)
    assert calc.custom_box.layout.display == "none" and calc.gpu_gib.layout.display == "none"
    for w in (calc.model, calc.kv_dtype, calc.weight_dtype, calc.gpu, calc.tp, calc.context):
        assert w.layout.display is None
