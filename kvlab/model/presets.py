"""Model presets: the shapes of well-known models, copied from their published configs.

Each preset is a ModelSpec whose numbers come from the model's `config.json` on the
Hugging Face hub (named in `source`), so the KV-cache calculator can answer "how much
memory does Llama-3-70B need at 32k context?" without downloading anything.

Parameter counts (`num_params`, which sets weight memory) are counted exactly from the
config's shapes for the dense models (the same formulas `ModelSpec.from_hf_config` uses,
and they agree with the hub's safetensors totals, e.g. Llama-2-7B 6,738,415,616); for the
mixture-of-experts DeepSeek models they are the totals published with the model.

Derivations of every preset's KV bytes per token are written out in tests/test_memory.py.
"""

from __future__ import annotations

from kvlab.model.spec import ModelSpec

_HF = "https://huggingface.co/{}/blob/main/config.json"


def _preset(repo: str, **fields) -> ModelSpec:
    return ModelSpec(source=_HF.format(repo), **fields)


PRESETS: dict[str, ModelSpec] = {
    # --- classic multi-head attention (every query head has its own K and V) ---
    "gpt2": _preset(
        "openai-community/gpt2", name="gpt2", architecture="gpt2", attention="mha",
        num_layers=12, hidden_size=768, num_heads=12, num_kv_heads=12, head_dim=64,
        intermediate_size=3072, vocab_size=50257, max_position_embeddings=1024,
        num_params=124_439_808,
    ),
    "opt-13b": _preset(
        "facebook/opt-13b", name="opt-13b", architecture="opt", attention="mha",
        num_layers=40, hidden_size=5120, num_heads=40, num_kv_heads=40, head_dim=128,
        intermediate_size=20480, vocab_size=50272, max_position_embeddings=2048,
        num_params=12_853_473_280,
    ),
    "llama-2-7b": _preset(
        "meta-llama/Llama-2-7b-hf", name="llama-2-7b", architecture="llama", attention="mha",
        num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128,
        intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
        num_params=6_738_415_616,
    ),
    "llama-2-13b": _preset(
        "meta-llama/Llama-2-13b-hf", name="llama-2-13b", architecture="llama", attention="mha",
        num_layers=40, hidden_size=5120, num_heads=40, num_kv_heads=40, head_dim=128,
        intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096,
        num_params=13_015_864_320,
    ),
    # --- grouped-query attention (groups of query heads share one K/V head) ---
    "smollm2-135m": _preset(
        "HuggingFaceTB/SmolLM2-135M-Instruct", name="smollm2-135m", architecture="llama", attention="gqa",
        num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
        intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
        num_params=134_515_008,
    ),
    "llama-2-70b": _preset(
        "meta-llama/Llama-2-70b-hf", name="llama-2-70b", architecture="llama", attention="gqa",
        num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128,
        intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096,
        num_params=68_976_648_192,
    ),
    "llama-3-8b": _preset(
        "meta-llama/Meta-Llama-3-8B", name="llama-3-8b", architecture="llama", attention="gqa",
        num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
        num_params=8_030_261_248,
    ),
    "llama-3-70b": _preset(
        "meta-llama/Meta-Llama-3-70B", name="llama-3-70b", architecture="llama", attention="gqa",
        num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128,
        intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192,
        num_params=70_553_706_496,
    ),
    "mistral-7b": _preset(  # v0.1: GQA plus a 4096-token sliding window
        "mistralai/Mistral-7B-v0.1", name="mistral-7b", architecture="mistral", attention="gqa",
        num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
        sliding_window=4096, num_params=7_241_732_096,
    ),
    "qwen2.5-7b": _preset(  # its config names sliding_window=131072 but sets use_sliding_window=false
        "Qwen/Qwen2.5-7B", name="qwen2.5-7b", architecture="qwen2", attention="gqa",
        num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128,
        intermediate_size=18944, vocab_size=152064, max_position_embeddings=131072,
        num_params=7_615_616_512,
    ),
    # --- multi-query attention (one K/V head for all query heads) ---
    "falcon-7b": _preset(  # multi_query=true: one shared K/V head of width 4544/71 = 64
        "tiiuae/falcon-7b", name="falcon-7b", architecture="falcon", attention="mqa",
        num_layers=32, hidden_size=4544, num_heads=71, num_kv_heads=1, head_dim=64,
        intermediate_size=18176, vocab_size=65024, max_position_embeddings=2048,
        num_params=6_921_720_704,
    ),
    # --- multi-head latent attention (DeepSeek): cache a compressed latent + a shared RoPE key ---
    "deepseek-v2-lite": _preset(  # 15.7B total parameters (2.4B active), per the model card
        "deepseek-ai/DeepSeek-V2-Lite", name="deepseek-v2-lite", architecture="deepseek_v2", attention="mla",
        num_layers=27, hidden_size=2048, num_heads=16, num_kv_heads=16, head_dim=128 + 64,
        intermediate_size=1408, vocab_size=102400, max_position_embeddings=163840,
        kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128,
        num_params=15_700_000_000,
    ),
    "deepseek-v3": _preset(  # 671B total parameters (37B active) in the main model, per the model card
        "deepseek-ai/DeepSeek-V3", name="deepseek-v3", architecture="deepseek_v3", attention="mla",
        num_layers=61, hidden_size=7168, num_heads=128, num_kv_heads=128, head_dim=128 + 64,
        intermediate_size=2048, vocab_size=129280, max_position_embeddings=163840,
        kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128,
        num_params=671_000_000_000,
    ),
}


def list_presets() -> list[str]:
    """Names accepted by `ModelSpec.preset`, grouped by attention kind (MHA, GQA, MQA, MLA)."""
    return list(PRESETS)
