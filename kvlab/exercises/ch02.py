"""Chapter 02 exercises (notebooks/exercises/02_prefill_vs_decode.ipynb): a KV cache you manage yourself.

    02.1  KVCache(num_layers)            an attention function for kvlab.Transformer that appends each
                                         layer's new K/V and attends over everything cached so far
    02.2  greedy_decode(model, prompt_ids, max_new_tokens) -> token ids
                                         prefill once, then one token per step through the cache

References: `kvlab.ContiguousKVCache` (the course's cache, fed the same calls), kvlab's model on
the whole sequence without a cache, `kvlab.model.generate.greedy_generate`, and Hugging Face's
`generate` on SmolLM2-135M (its 16 greedy tokens are stored below; tests/test_exercises.py
recomputes them with Hugging Face and checks that no step is a near-tie).
"""

from __future__ import annotations

import torch

from kvlab.cache import ContiguousKVCache
from kvlab.exercises.harness import Case, Mismatch, Verdict, compare_equal, compare_tensors, matches, run_check, tol
from kvlab.exercises.models import PROMPT, smollm2, tiny_llama
from kvlab.model.attention import sdpa

ATOL = 1e-5
LOGITS_TOL = 1e-4

# Hugging Face generate (greedy, 16 new tokens) on SmolLM2-135M-Instruct, prompt PROMPT
# (" a multidisciplinary approach that involves data analysis, machine learning, and human judgment.\n")
SMOLLM2_GREEDY_16 = [253, 25000, 2424, 338, 3445, 940, 2318, 28, 3746, 1380, 28, 284, 1205, 9507, 30, 198]


# ---- 02.1 the cache as an attention function ------------------------------------------------------

class _Scenario:
    """A sequence of attention calls: chunks of new tokens per step, every layer each step."""

    def __init__(self, name: str, chunks: list[int], num_layers: int = 2, batch: int = 1, heads=(4, 2), dim: int = 8,
                 seed: int = 0):
        self.name, self.chunks, self.num_layers, self.batch = name, chunks, num_layers, batch
        g = torch.Generator().manual_seed(seed)
        Hq, Hkv = heads
        self.calls = []                                    # (layer, q, k, v, positions)
        start = 0
        for T in chunks:
            positions = torch.arange(start, start + T).expand(batch, T)     # (B, T)
            for layer in range(num_layers):
                self.calls.append((layer, torch.randn(batch, T, Hq, dim, generator=g),
                                   torch.randn(batch, T, Hkv, dim, generator=g),
                                   torch.randn(batch, T, Hkv, dim, generator=g), positions))
            start += T
        self.heads, self.dim, self.total = heads, dim, start

    def describe_call(self, i: int) -> str:
        layer, q, _, _, positions = self.calls[i]
        T, first = q.shape[1], int(positions[0, 0])
        kind = "a decode step (T = 1)" if T == 1 and first > 0 else f"a chunk of {T} tokens"
        return f"call {i + 1} of {len(self.calls)}: layer {layer}, {kind} at positions {first}..{first + T - 1}"

    def outputs(self, cache, upto: int | None = None) -> list:
        outs = []
        for layer, q, k, v, positions in self.calls[:upto]:
            outs.append(cache(layer, q.clone(), k.clone(), v.clone(), positions.clone()))
        return outs

    def reference(self) -> list:
        Hq, Hkv = self.heads
        return self.outputs(ContiguousKVCache(self.num_layers, self.batch, self.total, Hkv, self.dim))


class _Mistake:
    """Wrong caches learners write, to name the mistake an answer matches."""

    def __init__(self, num_layers: int, kind: str):
        self.k, self.v, self.kind = [None] * num_layers, [None] * num_layers, kind

    def __call__(self, layer, q, k, v, positions):
        if self.kind == "overwrite" or self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer], self.v[layer] = torch.cat([self.k[layer], k], 1), torch.cat([self.v[layer], v], 1)
        K, V = self.k[layer], self.v[layer]                                  # (B, S, Hkv, D)
        if self.kind == "no_mask":
            return sdpa(q, K, V)
        if self.kind == "by_position":                                       # right (the greedy mistakes use it)
            key_pos = torch.arange(K.shape[1])
            return sdpa(q, K, V, mask=key_pos[None, None, :] <= positions[:, :, None])
        return sdpa(q, K, V, is_causal=True)                                 # "top_left"; "overwrite" too


CACHE_MISTAKES = [
    ("no_mask", "Your cache attends without a causal mask: in a chunk of several tokens, token t also sees the "
                "tokens after it. Mask by position: query at position p sees cached keys at positions 0..p."),
    ("top_left", "Your mask is causal from the top-left corner (is_causal=True or tril(T, S)), which is only right "
                 "when the T new tokens are the whole sequence. After a context, query i sits at position "
                 "positions[i] and must see every key up to it: mask = key_positions <= positions[:, :, None]."),
    ("overwrite", "Your cache keeps only the latest call's K/V (it overwrites instead of appending): a decode step "
                  "then attends to itself alone. Concatenate the new k, v to the layer's cache along the token "
                  "dimension (dim 1)."),
]


def _run_scenario(cache_cls, case: Case):
    scenario: _Scenario = case.data["scenario"]
    cache = cache_cls(scenario.num_layers)
    expected = case.reference()
    for i, (call, want) in enumerate(zip(scenario.calls, expected)):
        layer, q, k, v, positions = call
        got = cache(layer, q.clone(), k.clone(), v.clone(), positions.clone())
        problem = compare_tensors(want, got, atol=ATOL, name="attention output")
        if problem is not None:
            hint = problem.hint
            for kind, text in CACHE_MISTAKES:
                mistake_out = scenario.outputs(_Mistake(scenario.num_layers, kind), upto=i + 1)[-1]
                if matches(mistake_out, got, lambda e, g: compare_tensors(e, g, atol=ATOL)):
                    hint = text
                    break
            raise Mismatch(f"{scenario.describe_call(i)}: {problem.where}", problem.expected, problem.got, hint)
    return "ok"


def _run_model(cache_cls, case: Case):
    """tiny-llama-random through the learner's cache: prefill, then decode steps; logits vs no cache."""
    lm, model = tiny_llama()
    ids = case.data["ids"]
    cache = cache_cls(model.spec.num_layers)
    P = case.data["prompt_len"]
    full = model(ids)                                       # (1, N, vocab): the whole sequence, no cache
    steps = [(0, P)] + [(t, t + 1) for t in range(P, ids.shape[1])]
    for a, b in steps:
        positions = torch.arange(a, b)[None]
        got = model(ids[:, a:b], positions=positions, attn=cache)
        problem = compare_tensors(full[:, a:b], got, atol=LOGITS_TOL, rtol=LOGITS_TOL, name="logits")
        if problem is not None:
            what = f"the prefill of {P} tokens" if a == 0 else f"the decode step at position {a}"
            raise Mismatch(f"{what}: {problem.where}", problem.expected, problem.got)
    return "ok"


def _cache_cases():
    scenarios = [
        _Scenario("a prefill of 4 tokens, one layer, one KV head per query head", [4], num_layers=1, heads=(2, 2)),
        _Scenario("a prefill of 5 tokens, then 3 decode steps; 2 layers, 4 query heads over 2 KV heads", [5, 1, 1, 1],
                  seed=1),
        _Scenario("a prompt in chunks of 3, 4 and 2 tokens (chunked prefill), then 2 decode steps", [3, 4, 2, 1, 1],
                  seed=2),
        _Scenario("a batch of 2 sequences (B = 2): a prefill of 6 tokens, then 2 decode steps", [6, 1, 1], batch=2,
                  heads=(4, 1), seed=3),
    ]
    for i, s in enumerate(scenarios, start=1):
        yield Case(f"case {i}: {s.name}", inputs=f"q: float32 (B, T, {s.heads[0]}, {s.dim}); k, v: float32 "
                   f"(B, T, {s.heads[1]}, {s.dim}); random normal; positions continue from call to call",
                   expected=s.reference, call=_run_scenario, data={"scenario": s})
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 49152, (1, 11), generator=g)
    yield Case(f"case {len(scenarios) + 1}: the tiny-llama-random model (2 layers) through your cache: a prefill of "
               f"7 tokens, then 4 decode steps, logits against the model on the whole sequence without a cache",
               inputs="11 random token ids", expected="ok", call=_run_model, data={"ids": ids, "prompt_len": 7})


def check_kv_cache(KVCache) -> Verdict:
    """02.1: KVCache(num_layers) is an attention function (layer_idx, q, k, v, positions) -> (B, T, Hq, D) that
    appends k, v to layer layer_idx's cache and attends over every cached key at a position <= the query's;
    it must give kvlab's ContiguousKVCache's outputs, and the model's logits through it must equal the
    model's on the whole sequence."""
    return run_check(
        "02.1 KVCache", KVCache, _cache_cases(),
        compare=lambda e, g: None,
        checked=lambda n: (f"{n} cases agree with kvlab's ContiguousKVCache within {tol(ATOL)}, call by call: one "
                           f"prefill, prefill + decode steps over 2 layers with GQA, a prompt in 3 chunks (the mask "
                           f"must go by position), a batch of 2; and tiny-llama-random's logits through your cache "
                           f"equal its logits without a cache within {tol(LOGITS_TOL)}."),
        todo="Write KVCache.__init__ and KVCache.__call__, then run this cell again.",
        what="a class (KVCache itself, not an instance)",
        generic_hint="Per layer keep K and V of shape (B, S, Hkv, D); on each call concatenate the new k, v along "
                     "dim 1, then return sdpa(q, K, V, mask) with mask[b, i, j] = j <= positions[b, i].")


# ---- 02.2 greedy decoding through it --------------------------------------------------------------

def _kvlab_greedy(model, prompt_ids, n):
    from kvlab.model.generate import greedy_generate
    return greedy_generate(model, list(prompt_ids), n).token_ids[0]


def _greedy_mistakes(model, prompt_ids, n):
    """Token lists of the usual wrong loops (each with a right, appending cache)."""
    def loop(kind):
        ids = torch.tensor([list(prompt_ids)])
        cache = _Mistake(model.spec.num_layers, "by_position")
        logits = model(ids, attn=cache)
        out, seq = [], list(prompt_ids)
        for _ in range(n):
            token = int(logits[0, -1].argmax())
            out.append(token)
            seq.append(token)
            last = torch.tensor([[token]])
            if kind == "no_positions":
                logits = model(last, attn=cache)                       # positions default to 0
            elif kind == "no_cache":
                logits = model(last)                                   # the last token alone: context lost
        return out
    return [(loop("no_positions"),
             "Your tokens equal a loop that feeds each new token without its position: it then sits at position 0, "
             "so RoPE rotates it as the first token and the causal mask lets it see only key 0. Pass "
             "positions=torch.tensor([[p]]) with p = the number of tokens before it."),
            (loop("no_cache"),
             "Your tokens equal feeding the last token alone, without the cache (chapter 02, section 5): the model "
             "sees a one-token sequence and the context is lost. Keep one cache for the whole generation and pass "
             "it as attn= at every step.")]


def _greedy_call(fn, case: Case):
    model = case.data["model"]()
    return fn(model, list(case.data["prompt_ids"]), case.data["n"])


def _greedy_diagnose(case: Case, got) -> str | None:
    got = got if isinstance(got, list) else (got.tolist() if hasattr(got, "tolist") else got)
    want, n, prompt = case.reference(), case.data["n"], list(case.data["prompt_ids"])
    if isinstance(got, list):
        flat = got[0] if got and isinstance(got[0], list) else got
        if flat[:len(prompt)] == prompt and len(flat) == len(prompt) + n:
            return "Return only the new tokens (max_new_tokens of them), not the prompt followed by them."
        if len(flat) == n + 1 and flat[:n] == want:
            return "You return one token too many: the prefill samples the first new token, then n - 1 decode steps."
        if len(flat) == n - 1 and flat == want[:n - 1]:
            return "You return one token too few: the prefill's argmax is the first new token (keep it)."
        if len(flat) == n and got and isinstance(got[0], list):
            return "Return a flat list of token ids, not a list of lists."
    for tokens, hint in _greedy_mistakes(case.data["model"](), prompt, n):
        if got == tokens:
            return hint
    return None


def _greedy_cases():
    tiny = lambda: tiny_llama()[1]
    g = torch.Generator().manual_seed(5)
    for i, (P, n) in enumerate([(1, 6), (5, 8), (12, 8)], start=1):
        prompt = torch.randint(0, 49152, (P,), generator=g).tolist()
        yield Case(f"case {i}: tiny-llama-random, a prompt of {P} random token{'s' * (P > 1)}, {n} new tokens", inputs=
                   f"model: tiny-llama-random (kvlab.Transformer); prompt_ids: {P} ints; max_new_tokens = {n}",
                   expected=(lambda p=prompt, n=n: _kvlab_greedy(tiny(), p, n)), call=_greedy_call,
                   data={"model": tiny, "prompt_ids": prompt, "n": n})
    real = lambda: smollm2()[1]
    yield Case("case 4: SmolLM2-135M, the course prompt, 16 new tokens (against Hugging Face's generate)",
               inputs=f"model: SmolLM2-135M; prompt_ids: the {len(smollm2()[0].encode(PROMPT))} tokens of {PROMPT!r}; "
                      f"max_new_tokens = 16", expected=SMOLLM2_GREEDY_16, call=_greedy_call,
               data={"model": real, "prompt_ids": smollm2()[0].encode(PROMPT), "n": 16})


def check_greedy_decode(greedy_decode) -> Verdict:
    """02.2: greedy_decode(model, prompt_ids, max_new_tokens) returns the max_new_tokens greedy tokens (a list
    of ints), one forward pass per token after the prefill: equal to kvlab's greedy_generate, and to Hugging
    Face's generate on SmolLM2-135M."""
    return run_check(
        "02.2 greedy_decode", greedy_decode, _greedy_cases(),
        compare=lambda e, g: compare_equal(e, g, name="token ids"),
        checked=lambda n: (f"{n} cases give exactly the expected tokens: three on tiny-llama-random (against "
                           f"kvlab's greedy_generate) and 16 tokens of SmolLM2-135M on the course prompt, equal to "
                           f"Hugging Face's generate."),
        todo="Write the body of greedy_decode(model, prompt_ids, max_new_tokens), then run this cell again.",
        diagnose=_greedy_diagnose,
        generic_hint="cache = KVCache(model.spec.num_layers); logits = model(prompt, attn=cache); then each step: "
                     "token = argmax of the last row; feed [[token]] with positions [[its position]] and attn=cache.")
