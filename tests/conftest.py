"""Shared fixtures: models are loaded once per test session (the default model from kvlab's cache);
a server beside its offline answers, for the server tests."""

import contextlib

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


@contextlib.contextmanager
def server_and_offline_answers(model: str, server_args: list[str], prompts: list, params, **llm_kwargs):
    """A kvlab server started in a child process (one torch thread) and, computed here while it loads,
    each prompt's offline answer (LLM.generate on one thread: on CI's two cores the two processes do not
    stall each other). Yields (server, texts) once the server is ready; stops the server after."""
    from kvlab import LLM
    from kvlab.serve import ServerProcess

    server = ServerProcess(["--model", model, *server_args, "--torch-threads", "1"]).launch()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        llm = LLM(model=model, **llm_kwargs)
        texts = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].text for p in prompts]
        del llm
        torch.set_num_threads(threads)
        server.wait_ready()
        yield server, texts
    finally:
        torch.set_num_threads(threads)
        server.close()
