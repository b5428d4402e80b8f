"""Shared fixtures: models are loaded once per test session (the default model from kvlab's cache)."""

import pytest
import torch

import kvlab


@pytest.fixture(scope="session")
def smollm2():
    return kvlab.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama():
    return kvlab.load_model("tiny-llama-random")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return kvlab.load_model("tiny-gpt2-random")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
