"""kvlab's engine against Hugging Face: greedy tokens equal HF `generate` for many prompts run
together, under every scheduling regime (ample memory, a pool so small that preemption happens
over and over, chunked prefill, prefix-cache hits, block sizes from 1 to 32 with scattered
blocks), with asynchronous scheduling off and on, and the engine's own promises: every request
finishes, every block is free at the end.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvlab import LLM, SamplingParams
from kvlab.engine import LLMEngine, EngineArgs

SENTENCES = [
    "The factory production line optimization requires",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three most important ideas in systems programming are",
    "Explain the difference between a process and a thread.",
    "In 1905, Albert Einstein published four papers that",
    "A KV cache stores the keys and values of earlier tokens so that",
    "The recipe calls for two cups of flour, one egg and",
    "Paris is the capital of France, and Berlin is",
    "To reverse a linked list in place, you",
    "The weather today is",
    "Hello",
]
NEW = 10


def mixed_prompts(lm, n: int = 22, seed: int = 0) -> list[list[int]]:
    """n prompts of 1 to ~150 tokens: single sentences and long concatenations."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        k = rng.choice([1, 1, 2, 4, 8])
        text = " ".join(rng.sample(SENTENCES, k)) if k > 1 else SENTENCES[i % len(SENTENCES)]
        prompts.append(lm.encode(text))
    return prompts


def hf_greedy(lm, ids: list[int], n: int = NEW) -> list[int]:
    """HF generate, one prompt at a time, greedy, stopping at EOS: the independent reference."""
    x = torch.tensor([ids])
    return lm.hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                pad_token_id=lm.tokenizer.eos_token_id)[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def prompts(smollm2):
    return mixed_prompts(smollm2)


@pytest.fixture(scope="module")
def hf_outputs(smollm2, prompts):
    return [hf_greedy(smollm2, p) for p in prompts]


def assert_clean(engine: LLMEngine):
    """Nothing lost, nothing leaked."""
    assert not engine.has_unfinished_requests() and not engine.scheduler.requests
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert engine.scheduler.num_seqs_in_use == 0


CONFIGS = {
    "ample memory": dict(),
    "tiny pool, preemption": dict(num_kv_blocks=40, block_size=8),
    "chunked prefill (budget 32)": dict(max_num_batched_tokens=32, max_num_seqs=32),
    "block size 1, scattered": dict(block_size=1, block_order_seed=1),
    "block size 32, scattered": dict(block_size=32, block_order_seed=2),
}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_hf_generate(smollm2, prompts, hf_outputs, name, async_scheduling):
    llm = LLM(model=smollm2, async_scheduling=async_scheduling, **CONFIGS[name])
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_outputs
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.finished and o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    steps = list(llm.engine.stats)
    if name.startswith("tiny pool"):
        assert llm.engine.scheduler.num_preemptions >= 5           # preemption happened, many times
        assert sum(o.metrics.num_preemptions for o in outs) == llm.engine.scheduler.num_preemptions
    if name.startswith("chunked"):
        assert max(s.num_scheduled_tokens for s in steps) <= 32
        assert any(s.num_prefill_seqs and s.num_decode_seqs for s in steps)    # chunks beside decodes
        assert max(map(len, prompts)) > 32                                    # so some prompt was chunked
    assert_clean(llm.engine)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prefix_cache_hits_give_the_same_tokens(smollm2, hf_outputs, prompts, async_scheduling):
    """The same prompts again, each after a shared system prefix (over 32 tokens) that a first request
    computes: the rest hit its blocks (after the step that computed them) and skip that prefill."""
    system = smollm2.encode("You are KV-Helper, a concise assistant for engineers who run large language "
                            "models in production. Answer briefly, with exact numbers where you know them, "
                            "and say when you are not sure.")
    assert len(system) >= 32
    llm = LLM(model=smollm2, block_size=16, async_scheduling=async_scheduling)
    engine = llm.engine
    engine.add_request("warm", system + prompts[0], SamplingParams(temperature=0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    shared = [system + p for p in prompts[:8]]
    outs = llm.generate(shared, SamplingParams(temperature=0, max_tokens=NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(smollm2, p) for p in shared]
    cached = [o.num_cached_tokens for o in outs]
    assert all(c >= (len(system) // 16) * 16 for c in cached) and engine.scheduler.num_cached_tokens == sum(cached)
    assert_clean(engine)


def test_triton_decode_kernel_in_the_engine_equals_hf(tiny_llama):
    """The same engine with decode rows through the Triton kernel (interpreter on the CPU)."""
    prompts = mixed_prompts(tiny_llama, n=6, seed=1)
    llm = LLM(model=tiny_llama, attention_backend="triton", block_size=4, block_order_seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    x = [hf_greedy(tiny_llama, p, 8) for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == x
    assert_clean(llm.engine)


# ---------------------------------------------------------------- sampling

def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(tiny_llama):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = tiny_llama.encode("The weather today is")
    alone = LLM(model=tiny_llama).generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [tiny_llama.encode(s) for s in SENTENCES[:6]]
    crowd = LLM(model=tiny_llama).generate(others[:3] + [prompt] + others[3:],
                                           [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)] * 3
                                           + [params] + [SamplingParams(temperature=0, max_tokens=5)] * 3,
                                           use_tqdm=False)
    assert crowd[3].outputs[0].token_ids == alone
    other_seed = LLM(model=tiny_llama).generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, top_k=50,
                                                                         seed=99, max_tokens=16, ignore_eos=True),
                                                use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples_share_the_prompt_blocks_then_diverge(tiny_llama):
    """n = 4: the prompt is prefilled once, then forked: right after that step its full blocks are
    held by all four samples (ref count 4); the samples then draw different continuations."""
    llm = LLM(model=tiny_llama, block_size=4)
    engine = llm.engine
    prompt = tiny_llama.encode(SENTENCES[2])
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))
    engine.step()                                       # prefill + fork
    seqs = engine.scheduler.requests["r"].sequences
    assert len(seqs) == 4
    full = len(prompt) // 4
    tables = [engine.allocator.block_table(s.seq_id) for s in seqs]
    assert all(t[:full] == tables[0][:full] for t in tables)
    assert all(engine.allocator.ref_count(b) == 4 for b in tables[0][:full])
    assert engine.allocator.num_used_blocks == -(-len(prompt) // 4)       # one copy of the prompt
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    (out,) = outs
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert all(len(o.token_ids) == 12 for o in out.outputs)
    assert_clean(engine)


def test_sampler_matches_the_exact_filtered_softmax():
    """Empirical frequencies of 20,000 draws per setting against `exact_probs` (the filtered softmax
    written out literally), Pearson's chi-square over the tokens with positive probability; the
    test fails with probability 1e-4 per setting if the sampler is right (5 settings: < 5e-4), and
    a token outside the top-k / top-p set must never be drawn."""
    from kvlab.engine.sampler import SamplingBatch, exact_probs, sample

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, generator=g) * 2
    draws = 20_000
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 8, 1.0), (1.3, 0, 0.8), (0.9, 12, 0.6)]:
        batch = SamplingBatch(torch.full((draws,), temperature), torch.full((draws,), top_k if top_k else 40),
                              torch.full((draws,), top_p), [], False, top_k > 0 or top_p < 1, -1)
        tokens = sample(logits.expand(draws, -1).clone(), batch, torch.Generator().manual_seed(1))
        counts = torch.bincount(tokens, minlength=40).double()
        p = exact_probs(logits, temperature, top_k, top_p)
        assert counts[p == 0].sum() == 0, "drew a token outside the filtered set"
        keep = p > 0
        expected = p[keep] * draws
        chi2 = ((counts[keep] - expected) ** 2 / expected).sum()
        dof = int(keep.sum()) - 1
        if dof == 0:
            continue
        p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2)
        assert p_value > 1e-4, (temperature, top_k, top_p, float(chi2), dof)


def test_top_k_1_and_temperature_0_are_greedy(tiny_llama):
    prompt = tiny_llama.encode(SENTENCES[0])
    greedy = LLM(model=tiny_llama).generate([prompt], SamplingParams(temperature=0, max_tokens=10,
                                                                     ignore_eos=True), use_tqdm=False)
    top1 = LLM(model=tiny_llama).generate([prompt], SamplingParams(temperature=1.0, top_k=1, max_tokens=10,
                                                                   ignore_eos=True), use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == top1[0].outputs[0].token_ids == hf_greedy(tiny_llama, prompt, 10)


def test_logprobs_are_the_models_log_softmax(tiny_llama):
    prompt = tiny_llama.encode(SENTENCES[3])
    out = LLM(model=tiny_llama).generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    ids = torch.tensor([prompt + out.token_ids])
    ref = tiny_llama.hf_model(ids).logits[0].log_softmax(-1)[len(prompt) - 1:-1]        # (5, vocab)
    chosen = ref.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert out.cumulative_logprob == pytest.approx(chosen.sum().item(), abs=1e-4)
    for lp, row, tok in zip(out.logprobs, ref, out.token_ids):
        top = row.topk(3)
        assert set(lp) == set(top.indices.tolist()) | {tok}
        assert lp[tok] == pytest.approx(row[tok].item(), abs=1e-4)


# ---------------------------------------------------------------- stopping and streaming

def test_stop_strings_stop_tokens_eos_and_max_tokens(smollm2):
    llm = LLM(model=smollm2)
    prompt = "The factory production line optimization requires"
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert full.text.startswith(" a multidisciplinary approach")          # FACTS.md: the known continuation
    assert full.finish_reason == "length" and len(full.token_ids) == 32
    stop = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, stop=["approach", "zzz"]),
                        use_tqdm=False)[0].outputs[0]
    assert stop.text == " a multidisciplinary " and (stop.finish_reason, stop.stop_reason) == ("stop", "approach")
    tok = full.token_ids[3]
    by_token = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[tok]),
                            use_tqdm=False)[0].outputs[0]
    assert by_token.token_ids == full.token_ids[:4] and by_token.stop_reason == tok
    chat = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}],
                                                 add_generation_prompt=True)["input_ids"]
    eos = llm.generate([chat], SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert eos.finish_reason == "stop" and eos.stop_reason is None
    assert eos.token_ids[-1] == smollm2.tokenizer.eos_token_id and eos.token_ids == hf_greedy(smollm2, chat, 64)
    assert_clean(llm.engine)


def test_stream_yields_the_same_text_as_generate(smollm2):
    llm = LLM(model=smollm2)
    prompts = [SENTENCES[0], SENTENCES[2]]
    params = SamplingParams(temperature=0, max_tokens=24, stop=[" and"])
    final = llm.generate(prompts, params, use_tqdm=False)
    pieces = {}
    for out in llm.stream(prompts, params):
        pieces.setdefault(out.request_id, []).append(out.outputs[0].text)
    texts = ["".join(p) for p in pieces.values()]
    assert texts == [o.outputs[0].text for o in final]
    assert all(len(p) > 3 for p in pieces.values())                  # streamed in several pieces
    assert_clean(llm.engine)


def test_incremental_detokenizer_across_multibyte_characters(smollm2):
    """Emoji and CJK characters span several byte-level tokens: the streamed pieces never hold a
    half character, and they add up to the full decode."""
    from kvlab.engine.detokenizer import IncrementalDetokenizer

    tok = smollm2.tokenizer
    text = " Hi 👋🏽 — 東京 and naïve café: ∑ ≈ 3.14 🚀!"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())                                  # multi-token characters
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"))
    pieces = [detok.add([t]) for t in ids] + [detok.add([], final=True)]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_the_detokenizers_fast_decode_equals_transformers_decode(smollm2):
    """The detokenizer calls the Rust tokenizer directly (four times cheaper per step): the text must
    be transformers' decode, special tokens skipped or kept, half characters and all; a tokenizer
    that cleans up spaces keeps transformers' decode."""
    import random

    from kvlab.engine.detokenizer import decoder

    tok = smollm2.tokenizer
    rng = random.Random(0)
    samples = [[rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    samples += [[1, *tok.encode(" Hi 👋🏽 東京"), 2], [0, 1, 2], tok.encode("🚀")[:1]]
    for skip in (True, False):
        fast = decoder(tok, skip)
        assert [fast(ids) for ids in samples] == [tok.decode(ids, skip_special_tokens=skip) for ids in samples]

    class Cleaning:                                   # a tokenizer whose decode does more than the backend
        backend_tokenizer, clean_up_tokenization_spaces = tok.backend_tokenizer, True

        def decode(self, ids, skip_special_tokens):
            return "cleaned"

    assert decoder(Cleaning(), True)([5]) == "cleaned"


# ---------------------------------------------------------------- abort, bad input, metrics

def test_abort_mid_generation_frees_blocks_and_spares_the_others(tiny_llama):
    prompts = mixed_prompts(tiny_llama, n=6, seed=3)
    engine = LLMEngine(EngineArgs(model=tiny_llama, block_size=4))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for _ in range(4):
        engine.step()
    used = engine.allocator.num_used_blocks
    engine.abort_request(["1", "4"])
    assert engine.allocator.num_used_blocks < used
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["0", "2", "3", "5"]
    for i in (0, 2, 3, 5):
        assert done[str(i)].outputs[0].token_ids == hf_greedy(tiny_llama, prompts[i], 10)
    assert_clean(engine)
    with pytest.raises(ValueError, match="unknown request id"):
        engine.abort_request("1")


@pytest.mark.parametrize("prompt,params,match", [
    ([], dict(), "prompt is empty"),
    ("", dict(), "prompt is empty"),
    ([1] * 5000, dict(), "at most 1023"),
    ([49152], dict(), "outside the vocabulary"),
    ([1, 2], dict(n=300), "max_num_seqs"),
])
def test_bad_requests_are_refused_when_added_and_the_engine_keeps_serving(tiny_llama, prompt, params, match):
    engine = LLMEngine(EngineArgs(model=tiny_llama))
    engine.add_request("good", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match=match) as err:
        engine.add_request("bad", prompt, SamplingParams(**params, max_tokens=4))
    assert "'bad'" in str(err.value)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == ["good"] and len(outs[0].outputs[0].token_ids) == 4
    assert_clean(engine)


@pytest.mark.parametrize("field,value,match", [
    ("max_tokens", 0, "max_tokens must be"), ("max_tokens", -1, "max_tokens must be"),
    ("temperature", -0.5, "temperature must be"), ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
    ("top_p", 1.5, "top_p must be"), ("n", 0, "n must be"), ("top_k", -2, "top_k must be"),
    ("temperature", float("nan"), "temperature must be"), ("stop", [""], "stop must be"),
])
def test_bad_sampling_params_say_what_is_allowed(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})
    with pytest.raises(TypeError, match="max_tokens must be"):
        SamplingParams(max_tokens=True)


def test_metrics_and_step_stats(tiny_llama):
    llm = LLM(model=tiny_llama, max_num_batched_tokens=64, max_num_seqs=8)
    outs = llm.generate(mixed_prompts(tiny_llama, n=10, seed=5),
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.num_generation_tokens == 6 and m.tpot is not None and m.ttft > 0
    stats = list(llm.engine.stats)
    assert sum(s.num_scheduled_tokens for s in stats) == sum(len(o.prompt_token_ids) + 5 for o in outs)
    assert all(s.num_running <= 8 and s.host_time > 0 and s.forward_time > 0 for s in stats)


def test_soak_random_arrivals_and_aborts(tiny_llama):
    """500 requests arriving at random steps into a small pool (preemptions), 10% aborted at random
    moments: every other request completes with exactly the tokens it gets when run alone, and no
    block or row leaks."""
    rng = random.Random(0)
    requests = [([rng.randrange(3, 49152) for _ in range(rng.randint(1, 48))], rng.randint(1, 16))
                for _ in range(500)]
    arrive = sorted(rng.randrange(0, 400) for _ in requests)
    aborts = {i: arrive[i] + rng.randint(0, 6) for i in rng.sample(range(500), 50)}
    engine = LLMEngine(EngineArgs(model=tiny_llama, num_kv_blocks=48, block_size=4, max_num_seqs=32,
                                    max_num_batched_tokens=96))
    done, nxt, step = {}, 0, 0
    while nxt < len(requests) or engine.has_unfinished_requests():
        while nxt < len(requests) and arrive[nxt] <= step:
            prompt, n = requests[nxt]
            engine.add_request(str(nxt), prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            nxt += 1
        for i, when in aborts.items():
            if when == step and str(i) in engine.scheduler.requests:
                engine.abort_request(str(i))
        done.update({o.request_id: o for o in engine.step() if o.finished})
        step += 1
    assert engine.scheduler.num_preemptions > 0
    finished = {int(r) for r in done}
    assert finished | set(aborts) == set(range(500))
    alone = LLMEngine(EngineArgs(model=tiny_llama, max_num_seqs=1, max_num_batched_tokens=64))
    for i in sorted(finished):
        prompt, n = requests[i]
        alone.add_request("x", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        while alone.has_unfinished_requests():
            out = alone.step()
        assert done[str(i)].outputs[0].token_ids == out[0].outputs[0].token_ids, i
    assert_clean(engine)


def test_quick_start_script_runs_with_only_its_import_changed(tiny_llama):
    """vLLM's quick-start, with `from vllm import ...` replaced by `from kvlab import ...` (the model
    is the offline default; trust_remote_code is accepted and ignored)."""
    prompts = ["Hello, my name is", "The president of the United States is",
               "The capital of France is", "The future of AI is"]
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    llm = LLM(model=tiny_llama, trust_remote_code=True)
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        assert prompt in prompts and isinstance(generated_text, str)
    assert [o.prompt for o in outputs] == prompts and all(len(o.outputs[0].token_ids) <= 16 for o in outputs)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(model=tiny_llama, tensor_parallel_size=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        LLM(model=tiny_llama, bogus=1)
