"""ModelSpec: the shapes of a transformer that decide its memory and compute.

A ModelSpec is what the KV-cache calculator, the FLOP counter and the engine need
to know about a model, without its weights: layer count, hidden size, how many
query and key/value heads it has (MHA, GQA, MQA), or, for DeepSeek's multi-head
latent attention (MLA), the width of the compressed latent it caches instead.

Specs come from a Hugging Face config (`ModelSpec.from_hf_config`) or from the
presets in `kvlab.model.presets`, each copied from the model's published config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from kvlab import checks

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int                      # query heads
    num_kv_heads: int                   # key/value heads: == num_heads (MHA), 1 (MQA), in between (GQA)
    head_dim: int                       # width of one query/key head
    intermediate_size: int              # FFN inner width (per expert for MoE models)
    vocab_size: int
    attention: str | None = None        # "mha" | "gqa" | "mqa" | "mla"; None: read off the head counts
    kv_lora_rank: int | None = None     # MLA: width of the cached compressed KV latent
    qk_rope_head_dim: int | None = None # MLA: width of the decoupled RoPE key, cached beside the latent
    v_head_dim: int | None = None       # MLA: value head width (not cached: V is rebuilt from the latent)
    sliding_window: int | None = None   # tokens a layer attends to; the cache stops growing there
    max_position_embeddings: int | None = None  # longest context the model was trained for
    num_params: int | None = None       # total parameters (all experts for MoE): sets weight memory
    architecture: str = "llama"         # HF model_type, e.g. "llama", "gpt2", "deepseek_v3"
    source: str = ""                    # where the numbers come from

    def __post_init__(self):
        """Validate once, here, so that everything computed from a spec can trust it: counts are
        positive ints (numpy integers are converted, bool is refused), the optional ones too
        when set, and the attention kind agrees with the head counts."""
        checks.text("ModelSpec name", self.name, "a non-empty string")
        where = f"ModelSpec {self.name!r}"
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                      "vocab_size"):
            object.__setattr__(self, field, checks.count(f"{where}: {field}", getattr(self, field)))
        for field in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "sliding_window", "max_position_embeddings",
                      "num_params"):      # frozen dataclass: set once, here
            object.__setattr__(self, field, checks.count(f"{where}: {field}", getattr(self, field), optional=True))
        for field in ("architecture", "source"):
            if not isinstance(getattr(self, field), str):
                raise TypeError(f"{where}: {field} must be a string, got {checks.shown(getattr(self, field))}")
        implied = _attention_kind(self.num_heads, self.num_kv_heads, self.kv_lora_rank)
        if self.attention is None:
            object.__setattr__(self, "attention", implied)
        elif not isinstance(self.attention, str):
            raise TypeError(f"{where}: attention must be one of {ATTENTION_KINDS} or None, "
                            f"got {checks.shown(self.attention)}")
        elif self.attention not in ATTENTION_KINDS:
            raise ValueError(f"{where}: attention must be one of {ATTENTION_KINDS} or None, got {self.attention!r}")
        elif self.attention != implied:
            raise ValueError(
                f"{where}: attention={self.attention!r} does not match the shapes: "
                f"{self.num_heads} query heads, {self.num_kv_heads} KV heads"
                f"{f', kv_lora_rank {self.kv_lora_rank}' if self.kv_lora_rank else ''} make it {implied!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{where}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) so that each KV head serves a whole group of query heads"
            )
        if self.attention == "mla" and not (self.kv_lora_rank and self.qk_rope_head_dim):
            raise ValueError(f"{where}: MLA needs kv_lora_rank and qk_rope_head_dim (positive integers)")

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (1 for MHA, num_heads for MQA)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "ModelSpec":
        from kvlab.model.presets import PRESETS

        if not isinstance(name, str):
            raise TypeError(f"preset name must be a string, one of {', '.join(sorted(PRESETS))}; "
                            f"got {checks.shown(name)}")
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None) -> "ModelSpec":
        """Read a Hugging Face config (object or dict): Llama, Mistral, Qwen2, GPT-2, OPT, Falcon, DeepSeek-V2/V3."""
        c = _Config(config)
        model_type = c.get("model_type", default="llama")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or None, got {checks.shown(name)}")
        name = name or c.get("_name_or_path", "name_or_path", default="") or model_type

        if model_type == "gpt2":
            hidden, heads = c["n_embd"], c["n_head"]
            spec = dict(num_layers=c["n_layer"], hidden_size=hidden, num_heads=heads, num_kv_heads=heads,
                        head_dim=_head_dim(hidden, heads, None), intermediate_size=c.get("n_inner") or 4 * hidden,
                        max_position_embeddings=c.get("n_positions"))
        elif model_type == "opt":
            hidden, heads = c["hidden_size"], c["num_attention_heads"]
            spec = dict(num_layers=c["num_hidden_layers"], hidden_size=hidden, num_heads=heads, num_kv_heads=heads,
                        head_dim=_head_dim(hidden, heads, None), intermediate_size=c["ffn_dim"],
                        max_position_embeddings=c.get("max_position_embeddings"))
        elif model_type == "falcon":
            hidden, heads = c["hidden_size"], c["num_attention_heads"]
            if c.get("new_decoder_architecture", default=False):
                kv_heads = c["num_kv_heads"]
            else:
                kv_heads = 1 if c.get("multi_query", default=True) else heads
            spec = dict(num_layers=c["num_hidden_layers"], hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                        head_dim=_head_dim(hidden, heads, None),
                        intermediate_size=c.get("ffn_hidden_size") or 4 * hidden,
                        max_position_embeddings=c.get("max_position_embeddings", default=2048))
        else:  # llama, mistral, qwen2, deepseek_v2/v3 and other Llama-family configs
            hidden, heads = c["hidden_size"], c["num_attention_heads"]
            kv_heads = c.get("num_key_value_heads") or heads
            spec = dict(num_layers=c["num_hidden_layers"], hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                        head_dim=_head_dim(hidden, heads, c.get("head_dim")), intermediate_size=c["intermediate_size"],
                        max_position_embeddings=c.get("max_position_embeddings"))
            window = c.get("sliding_window")
            if window and c.get("use_sliding_window", default=True):
                spec["sliding_window"] = window
            if c.get("kv_lora_rank"):
                spec.update(kv_lora_rank=c["kv_lora_rank"], qk_rope_head_dim=c["qk_rope_head_dim"],
                            v_head_dim=c.get("v_head_dim"),
                            head_dim=c.get("qk_nope_head_dim", default=0) + c["qk_rope_head_dim"],
                            intermediate_size=c.get("moe_intermediate_size") or c["intermediate_size"])

        spec.update(vocab_size=c["vocab_size"], architecture=model_type, name=name, source="Hugging Face config")
        checked = cls(**spec)                              # every field checked before the counts use them
        spec = dataclasses.asdict(checked)
        return checked.replace(num_params=c.get("num_params") or _count_dense_params(model_type, spec, c))


def _head_dim(hidden, heads, explicit) -> int:
    """The config's head_dim, or hidden_size / num_heads when it names none; that division must
    be exact (flooring it would describe a model that does not exist)."""
    if explicit:
        return explicit
    hidden = checks.positive_int("config hidden size", hidden)
    heads = checks.positive_int("config number of attention heads", heads)
    if hidden % heads:
        raise ValueError(f"config: hidden size {hidden} is not divisible by {heads} attention heads and the config "
                         f"names no head_dim, so the head width is unknown; set head_dim in the config")
    return hidden // heads


def _attention_kind(num_heads: int, num_kv_heads: int, kv_lora_rank: int | None) -> str:
    if kv_lora_rank:
        return "mla"
    if num_kv_heads == num_heads:
        return "mha"
    return "mqa" if num_kv_heads == 1 else "gqa"


def _count_dense_params(model_type: str, s: dict, c: "_Config") -> int | None:
    """Exact parameter count for the dense architectures kvlab runs (GPT-2 and Llama-family); None otherwise."""
    H, L, V, I = s["hidden_size"], s["num_layers"], s["vocab_size"], s["intermediate_size"]
    tied = c.get("tie_word_embeddings", default=True)
    if model_type == "gpt2":
        if s["max_position_embeddings"] is None:
            return None
        per_layer = 2 * 2 * H + (H * 3 * H + 3 * H) + (H * H + H) + (H * I + I) + (I * H + H)
        return V * H + s["max_position_embeddings"] * H + L * per_layer + 2 * H
    if model_type in ("llama", "mistral", "qwen2"):
        q, kv = s["num_heads"] * s["head_dim"], s["num_kv_heads"] * s["head_dim"]
        bias = c.get("attention_bias", default=model_type == "qwen2")
        attn = H * q + 2 * H * kv + q * H + ((q + 2 * kv) if bias else 0)
        per_layer = attn + 3 * H * I + 2 * H
        return V * H * (1 if tied else 2) + L * per_layer + H
    return None


class _Config:
    """Uniform read access to a transformers config object or a plain dict."""

    def __init__(self, config: Any):
        if isinstance(config, Mapping):
            self._d = dict(config)
        elif hasattr(config, "to_dict") and not isinstance(config, type):
            self._d = config.to_dict()
        else:
            raise TypeError(f"config must be a transformers PretrainedConfig or a dict of its fields, "
                            f"got {checks.shown(config)}")
        if not all(isinstance(k, str) for k in self._d):
            raise TypeError("config keys must be strings (the field names of a config.json)")

    def __getitem__(self, key: str):
        if self._d.get(key) is None:
            raise ValueError(f"config has no {key!r}; cannot build a ModelSpec from it (keys: {sorted(self._d)[:20]}...)")
        return self._d[key]

    def get(self, *keys: str, default=None):
        for key in keys:
            if self._d.get(key) is not None:
                return self._d[key]
        return default
