"""Chapter 03 exercises (notebooks/exercises/03_kv_cache_memory.ipynb): the KV memory formula.

    03.1  kv_bytes_per_token(spec, kv_dtype) -> int         MHA, GQA, MQA and MLA, any KV dtype
    03.2  max_requests(spec, gpu_bytes, context_len, ...) -> int
                                                            requests of context_len that fit on one GPU
                                                            after the weights and a reserve
    03.3  kv_bytes_per_token_tp(spec, kv_dtype, tensor_parallel) -> int
                                                            one GPU's share under tensor parallelism

References: `kvlab.kv_bytes_per_token` and `kvlab.memory_plan` (chapter 03), on every model preset
(each copied from the model's published config) and a few made-up specs for the edge cases.
"""

from __future__ import annotations

import kvlab
from kvlab.exercises.harness import Case, Verdict, compare_equal, run_check
from kvlab.memory import GiB, KV_DTYPE_BITS
from kvlab.model.spec import ModelSpec

BITS = dict(KV_DTYPE_BITS)      # what the notebook gives the learner: dtype name -> bits per element


def _spec_line(s: ModelSpec) -> str:
    plural = lambda n, word: f"{n} {word}{'s' * (n != 1)}"
    line = (f"{s.name}: {s.attention.upper()}, {plural(s.num_layers, 'layer')}, {plural(s.num_heads, 'query head')}, "
            f"{plural(s.num_kv_heads, 'KV head')}, head_dim {s.head_dim}")
    if s.attention == "mla":
        line += f", kv_lora_rank {s.kv_lora_rank}, qk_rope_head_dim {s.qk_rope_head_dim}"
    if s.sliding_window:
        line += f", sliding_window {s.sliding_window}"
    return line


def _made_up() -> list[ModelSpec]:
    """Edge cases no preset has: an odd MLA width in int4 (half bytes: round up), one layer of MQA."""
    return [ModelSpec("tiny-mla", num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16,
                      intermediate_size=128, vocab_size=100, kv_lora_rank=3, qk_rope_head_dim=2, num_params=10_000,
                      source="made up"),
            ModelSpec("tiny-mqa", num_layers=1, hidden_size=48, num_heads=6, num_kv_heads=1, head_dim=8,
                      intermediate_size=96, vocab_size=100, num_params=10_000, source="made up")]


# ---- 03.1 bytes per token -------------------------------------------------------------------------

def _ceil_bytes(elements: int, bits: int) -> int:
    return -(-elements * bits // 8)


def _per_token_mistakes(spec: ModelSpec, dtype: str):
    L, bits = spec.num_layers, BITS[dtype]
    heads_kv = 2 * spec.num_kv_heads * spec.head_dim
    out = [
        (L * 2 * spec.num_heads * spec.head_dim * bits // 8,
         "You counted every query head; only the KV heads are cached. With GQA/MQA, num_kv_heads < num_heads: "
         "use spec.num_kv_heads (forgetting it overstates by num_heads / num_kv_heads)."),
        (L * 2 * spec.hidden_size * bits // 8,
         "That is the rule of thumb layers x 2 x hidden_size x bytes: right for MHA only. The cache holds "
         "num_kv_heads x head_dim per layer for K and for V."),
        (L * spec.num_kv_heads * spec.head_dim * bits // 8,
         "You counted K or V, not both: every layer caches a key AND a value per KV head (the factor 2)."),
        (L * 2 * spec.num_kv_heads * spec.head_dim * bits,
         "That is bits, not bytes: divide by 8."),
        (L * 2 * spec.num_kv_heads * spec.head_dim * (bits // 8),
         "int4 has half a byte per element: count bits (elements x bits) and divide by 8 at the end, rounding up."),
    ]
    if spec.attention == "mla":
        out.insert(0, (_ceil_bytes(L * heads_kv, bits),
                       "MLA caches no per-head K and V: per layer one latent of kv_lora_rank plus one RoPE key of "
                       "qk_rope_head_dim, shared by all heads (and no separate V)."))
        out.append((L * (spec.kv_lora_rank + spec.qk_rope_head_dim) * bits // 8,
                    "Round up: an odd number of int4 elements still fills its last byte (ceil of bits / 8)."))
    return out


def _per_token_cases():
    dtypes = ["float16", "bfloat16", "float32", "fp8", "int8", "int4"]
    specs = [kvlab.ModelSpec.preset(n) for n in kvlab.list_presets()] + _made_up()
    i = 0
    for spec in specs:
        for dtype in (dtypes if spec.source == "made up" or spec.name in ("llama-3-8b", "deepseek-v3") else
                      ["float16", "fp8"]):
            i += 1
            yield Case(f"case {i}: {spec.name}, KV cache in {dtype}", (spec, dtype),
                       inputs=_spec_line(spec) + f"; kv_dtype {dtype!r} ({BITS[dtype]} bits)",
                       expected=(lambda s=spec, d=dtype: kvlab.kv_bytes_per_token(s, d)),
                       data={"spec": spec, "dtype": dtype})


def _diagnose_per_token(case: Case, got) -> str | None:
    for value, hint in _per_token_mistakes(case.data["spec"], case.data["dtype"]):
        if compare_equal(value, got) is None:
            return hint
    return None


def check_kv_bytes_per_token(kv_bytes_per_token) -> Verdict:
    """03.1: kv_bytes_per_token(spec, kv_dtype) returns the bytes of KV cache one token adds over all layers,
    as an int: num_layers x 2 x num_kv_heads x head_dim x bits / 8 (MHA/GQA/MQA), num_layers x
    (kv_lora_rank + qk_rope_head_dim) x bits / 8 for MLA, rounded up to whole bytes."""
    return run_check(
        "03.1 kv_bytes_per_token", kv_bytes_per_token, _per_token_cases(),
        compare=lambda e, g: compare_equal(e, g, name="bytes per token"),
        checked=lambda n: (f"{n} cases equal kvlab.kv_bytes_per_token exactly: every model preset (MHA, GQA, MQA, "
                           f"MLA) and two made-up specs, in float32, 16-bit, 8-bit and int4 caches (an odd number of "
                           f"int4 elements rounds up to a whole byte)."),
        todo="Write the body of kv_bytes_per_token(spec, kv_dtype), then run this cell again.",
        diagnose=_diagnose_per_token,
        generic_hint="Elements per token: num_layers x 2 x num_kv_heads x head_dim (MLA: num_layers x (kv_lora_rank "
                     "+ qk_rope_head_dim)); bytes = ceil(elements x BITS[kv_dtype] / 8).")


# ---- 03.2 how many requests fit -------------------------------------------------------------------

def _plan_args(spec, gpu_bytes, context_len, weight_dtype, kv_dtype, util, reserve):
    return kvlab.memory_plan(spec, gpu=gpu_bytes, weight_dtype=weight_dtype, kv_dtype=kv_dtype, context_len=context_len,
                             gpu_memory_utilization=util, reserve_bytes=reserve)


def _requests_mistakes(spec, gpu, T, wdt, kdt, util, reserve):
    per_token = kvlab.kv_bytes_per_token(spec, kdt)
    weights = -(-spec.num_params * BITS[wdt] // 8)
    usable = int(gpu * util)
    cached = min(T, spec.sliding_window) if spec.sliding_window else T
    budget = usable - weights - reserve
    out = [
        ((usable - reserve) // per_token // cached,
         "You did not subtract the weights: they take num_params x weight bytes of the GPU before any KV cache."),
        (max(0, gpu - weights - reserve) // per_token // cached,
         "Only gpu_memory_utilization of the card is usable (vLLM leaves the rest for the CUDA context and "
         "fragmentation): usable = int(gpu_bytes x gpu_memory_utilization)."),
        (max(0, usable - weights) // per_token // cached,
         "Subtract the reserve (activations and workspace) too: kv_budget = usable - weights - reserve."),
        (max(0, budget) // per_token // T,
         "A sliding-window model caches at most sliding_window tokens per request, however long the context: "
         "divide by min(context_len, sliding_window)."),
        (budget // per_token // cached,
         "When the weights and the reserve alone exceed the usable memory, nothing fits: floor the KV budget at 0 "
         "(the answer is 0 requests, never negative)."),
        (max(0, usable - spec.num_params * BITS[kdt] // 8 - reserve) // per_token // cached,
         "The weights are stored in weight_dtype, the cache in kv_dtype: count the weights with the weight "
         "dtype's bits."),
    ]
    return out


GPU_CASES = [
    # spec, gpu bytes, context, weight dtype, kv dtype
    ("llama-3-8b", 80 * GiB, 4096, "bfloat16", "bfloat16"),
    ("llama-2-7b", 80 * GiB, 4096, "bfloat16", "bfloat16"),
    ("llama-2-7b", 24 * GiB, 2048, "bfloat16", "float16"),
    ("smollm2-135m", 16 * GiB, 8192, "float32", "float32"),
    ("llama-3-8b", 80 * GiB, 8192, "bfloat16", "fp8"),
    ("llama-3-8b", 40 * GiB, 8192, "fp8", "int4"),
    ("mistral-7b", 80 * GiB, 32768, "bfloat16", "bfloat16"),       # a sliding window of 4096
    ("mistral-7b", 24 * GiB, 2048, "bfloat16", "bfloat16"),        # below the window
    ("qwen2.5-7b", 141 * GiB, 32768, "bfloat16", "bfloat16"),
    ("deepseek-v2-lite", 80 * GiB, 16384, "bfloat16", "bfloat16"),  # MLA
    ("llama-3-70b", 80 * GiB, 4096, "bfloat16", "bfloat16"),       # the weights alone do not fit: 0
    ("llama-2-13b", 40 * GiB, 4096, "float16", "float16"),
]


def _requests_cases():
    for i, (name, gpu, T, wdt, kdt) in enumerate(GPU_CASES, start=1):
        spec = kvlab.ModelSpec.preset(name)
        args = dict(spec=spec, gpu_bytes=gpu, context_len=T, weight_dtype=wdt, kv_dtype=kdt,
                    gpu_memory_utilization=0.9, reserve_bytes=GiB)
        yield Case(f"case {i}: {name} on a GPU of {gpu // GiB} GiB, {T:,}-token requests", kwargs=args,
                   inputs=_spec_line(spec) + f", {spec.num_params:,} parameters; gpu_bytes {gpu:,} ({gpu // GiB} GiB), "
                          f"context_len {T}, weight_dtype {wdt!r}, kv_dtype {kdt!r}, gpu_memory_utilization 0.9, "
                          f"reserve_bytes {GiB:,} (1 GiB)",
                   expected=(lambda s=spec, g=gpu, T=T, w=wdt, k=kdt:
                             _plan_args(s, g, T, w, k, 0.9, GiB).max_concurrent_requests),
                   data={"args": (spec, gpu, T, wdt, kdt, 0.9, GiB)})


def check_max_requests(max_requests) -> Verdict:
    """03.2: max_requests(spec, gpu_bytes, context_len, weight_dtype, kv_dtype, gpu_memory_utilization,
    reserve_bytes) returns how many requests of context_len tokens fit at once: kvlab.memory_plan's
    max_concurrent_requests."""
    return run_check(
        "03.2 max_requests", max_requests, _requests_cases(),
        compare=lambda e, g: compare_equal(e, g, name="number of requests"),
        checked=lambda n: (f"{n} cases equal kvlab.memory_plan(...).max_concurrent_requests exactly: MHA, GQA and "
                           f"MLA models on 16 to 141 GiB cards, weights in 32, 16 and 8 bits, KV caches from fp32 to "
                           f"int4, a sliding-window model past and below its window, and a model whose weights alone "
                           f"do not fit (0 requests)."),
        todo="Write the body of max_requests(...), then run this cell again.",
        diagnose=lambda case, got: next((h for v, h in _requests_mistakes(*case.data["args"])
                                         if compare_equal(v, got) is None), None),
        generic_hint="usable = int(gpu_bytes x utilization); kv_budget = max(0, usable - weights - reserve); "
                     "requests = kv_budget // (bytes per token x tokens cached per request).")


# ---- 03.3 tensor parallelism ----------------------------------------------------------------------

TP_CASES = [("llama-3-70b", 1), ("llama-3-70b", 2), ("llama-3-70b", 8), ("llama-3-70b", 16), ("llama-3-70b", 32),
            ("smollm2-135m", 3), ("smollm2-135m", 9), ("llama-2-7b", 4), ("qwen2.5-7b", 4), ("qwen2.5-7b", 28),
            ("deepseek-v3", 8), ("deepseek-v2-lite", 4), ("falcon-7b", 71), ("mistral-7b", 16)]


def _tp_mistakes(spec: ModelSpec, dtype: str, tp: int):
    bits = BITS[dtype]
    full = kvlab.kv_bytes_per_token(spec, dtype)
    if spec.attention == "mla":
        return [(full // tp, "MLA's latent is shared by every head, so it cannot be split by head: each GPU caches "
                             "all of it (the per-GPU bytes equal the single-GPU bytes).")]
    return [(spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * bits // 8 // tp,
             "With more GPUs than KV heads the heads cannot be split further: each GPU still holds one whole KV head "
             "(replicated), so num_kv_heads per GPU = max(1, num_kv_heads // tensor_parallel)."
             if tp > spec.num_kv_heads else None),
            (int(spec.num_layers * 2 * (spec.num_kv_heads / tp) * spec.head_dim * bits / 8),
             "A GPU cannot hold a fraction of a KV head: with more GPUs than KV heads, each GPU keeps one whole "
             "(replicated) head." if tp > spec.num_kv_heads else None),
            (0, "0 bytes: num_kv_heads // tensor_parallel is 0 when there are more GPUs than KV heads, but every GPU "
                "keeps at least one whole KV head (replicated): max(1, num_kv_heads // tensor_parallel)."
             if tp > spec.num_kv_heads else None),
            (full, "Each GPU holds only its share of the KV heads: num_kv_heads // tensor_parallel of them (at least "
                   "one)." if tp > 1 else None)]


def _tp_cases():
    for i, (name, tp) in enumerate(TP_CASES, start=1):
        spec = kvlab.ModelSpec.preset(name)
        yield Case(f"case {i}: {name} over {tp} GPU{'s' * (tp > 1)}", (spec, "bfloat16", tp),
                   inputs=_spec_line(spec) + f"; kv_dtype 'bfloat16', tensor_parallel {tp}",
                   expected=(lambda s=spec, t=tp: kvlab.kv_bytes_per_token(s, "bfloat16", tensor_parallel=t)),
                   data={"spec": spec, "tp": tp})


def check_kv_bytes_per_token_tp(kv_bytes_per_token_tp) -> Verdict:
    """03.3: kv_bytes_per_token_tp(spec, kv_dtype, tensor_parallel) returns one GPU's bytes of KV per token when
    the model is split over tensor_parallel GPUs: kvlab.kv_bytes_per_token(spec, kv_dtype, tensor_parallel)."""
    return run_check(
        "03.3 kv_bytes_per_token_tp", kv_bytes_per_token_tp, _tp_cases(),
        compare=lambda e, g: compare_equal(e, g, name="bytes per token per GPU"),
        checked=lambda n: (f"{n} cases equal kvlab.kv_bytes_per_token(spec, 'bfloat16', tensor_parallel) exactly: "
                           f"KV heads split evenly, replicated when there are more GPUs than KV heads (Llama-3-70B "
                           f"on 16 and 32 GPUs, SmolLM2 on 9, Falcon-7B's single head on 71), and MLA's shared "
                           f"latent, which every GPU keeps whole."),
        todo="Write the body of kv_bytes_per_token_tp(spec, kv_dtype, tensor_parallel), then run this cell again.",
        diagnose=lambda case, got: next((h for v, h in _tp_mistakes(case.data["spec"], "bfloat16", case.data["tp"])
                                         if h and compare_equal(v, got) is None), None),
        generic_hint="KV heads per GPU = num_kv_heads // tensor_parallel when tensor_parallel <= num_kv_heads, else 1 "
                     "(replicated); MLA: the whole latent on every GPU.")
