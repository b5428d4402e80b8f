"""The official `openai` Python client against `kvlab serve` on the real model (SmolLM2-135M-Instruct).

What a user of the server sees: completions and chat, streamed and not. The reference is the
offline engine (kvlab.LLM) in this process on the same prompt: greedy text must match
exactly, streamed or not; seeded sampling must match too (a request's seed fixes its text
whatever shares the batch); usage counts are the prompt's and the answer's token counts.
"""

from __future__ import annotations

import openai
import pytest
import torch

from kvlab.engine import LLM, SamplingParams
from kvlab.serve import ServerProcess

MODEL = "smollm2-135m"
PROMPT = "The factory production line optimization requires"
MESSAGES = [{"role": "user", "content": "What is a KV cache? One sentence."}]
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def served(smollm2):
    """(client, llm): an openai client of a server on the real model, and the same engine offline.
    Both use one CPU thread: on a small shared CPU, two processes of two threads each stall one
    another (and one thread each keeps their float sums in the same order)."""
    server = ServerProcess(["--model", MODEL, "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
                            "--torch-threads", "1"]).launch()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        llm = LLM(model=smollm2, **ENGINE)                   # loads while the server loads
        server.wait_ready()
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300), llm
    finally:
        torch.set_num_threads(threads)
        server.close()


def offline(llm, prompt, **params):
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def test_completion_streamed_or_not_equals_the_offline_engine(served):
    client, llm = served
    ref = offline(llm, PROMPT, temperature=0, max_tokens=24)
    done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert done.choices[0].text == ref.outputs[0].text
    assert done.choices[0].finish_reason == ref.outputs[0].finish_reason == "length"
    assert done.usage.prompt_tokens == len(llm.get_tokenizer().encode(PROMPT)) == len(ref.prompt_token_ids)
    assert done.usage.completion_tokens == len(ref.outputs[0].token_ids) == 24
    assert done.usage.total_tokens == done.usage.prompt_tokens + 24
    assert done.model == MODEL and done.object == "text_completion" and done.id.startswith("cmpl-")

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == done.choices[0].text        # many events, the same text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage     # the usage chunk comes last


def test_chat_streamed_or_not_equals_the_offline_engine_on_the_chat_template(served):
    client, llm = served
    ids = llm.get_tokenizer().apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]
    ref = offline(llm, {"prompt_token_ids": list(ids)}, temperature=0, max_tokens=20)
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == ref.outputs[0].text
    assert done.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), len(ref.outputs[0].token_ids))

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == done.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_n_2_returns_two_seeded_choices_and_stop_strings_cut_the_text(served):
    client, llm = served
    ref = offline(llm, PROMPT, n=2, temperature=0.8, seed=11, max_tokens=8)
    done = client.completions.create(model=MODEL, prompt=PROMPT, n=2, temperature=0.8, seed=11, max_tokens=8)
    assert [c.index for c in done.choices] == [0, 1]
    assert [c.text for c in done.choices] == [o.text for o in ref.outputs]
    assert done.choices[0].text != done.choices[1].text                    # two samples, not one twice
    assert done.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)

    ref = offline(llm, PROMPT, temperature=0, max_tokens=16, stop=[","])
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[","])
    assert cut.choices[0].finish_reason == "stop" and "," not in cut.choices[0].text
    assert cut.choices[0].text == ref.outputs[0].text


def test_the_client_sees_errors_as_openai_exceptions(served):
    client, _ = served
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert "temperature must be a number >= 0" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert "'gpt-4o' does not exist" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"best_of": 3})
