"""KV-cache memory math: bytes per token, per request, and how many requests fit on a GPU.

Read the formula off the cache's shapes. Every layer keeps, for every token it has seen,
one key and one value vector per KV head:

    K, V per layer: (batch, num_kv_heads, seq_len, head_dim)      # two tensors
    bytes per token = num_layers * 2 * num_kv_heads * head_dim * bytes_per_element

MHA has num_kv_heads == num_heads, GQA shares each KV head among a group of query
heads, MQA keeps a single KV head. DeepSeek's multi-head latent attention (MLA) caches,
per layer and token, one compressed latent of width `kv_lora_rank` plus one decoupled
RoPE key of width `qk_rope_head_dim`, shared by all heads; keys and values are rebuilt
from the latent, so there is no separate V:

    MLA bytes per token = num_layers * (kv_lora_rank + qk_rope_head_dim) * bytes_per_element

With sliding-window attention a layer only attends to the last `sliding_window` tokens,
so a request's cache stops growing there.

The common rule of thumb `num_layers * 2 * hidden_size * bytes` is the MHA case
(hidden_size == num_heads * head_dim); for GQA it overstates by num_heads / num_kv_heads.

`memory_plan` turns this into a serving budget per GPU, the way vLLM does: a fraction
`gpu_memory_utilization` of the card, minus the weights (split over tensor-parallel
GPUs), minus a reserve for activations and workspace, is the KV budget; that budget
divided by the bytes one request's cache needs is how many requests fit at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kvlab import checks
from kvlab.model.spec import ModelSpec

GiB = 1024**3
MiB = 1024**2

# Bits per cached element. Quantized formats (fp8, int8, int4) are counted as their raw
# elements only: the scales that dequantize them are NOT counted. vLLM's fp8 KV cache uses
# one scale per tensor (a few bytes per layer, negligible); int8/int4 schemes with per-group
# scales (e.g. one fp16 scale per 64 elements) add a few percent on top of these numbers.
KV_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "fp8": 8, "int8": 8, "int4": 4}
_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
    "bf16": "bfloat16", "float8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
}

# GPU memory, nominal: the marketed size in GiB (the driver reports a little less, e.g. an
# H100 80GB shows 79.6 GiB; gpu_memory_utilization leaves room for that and for the CUDA context).
GPUS = {
    "T4-16GB": 16 * GiB,
    "A10G-24GB": 24 * GiB,
    "L4-24GB": 24 * GiB,
    "RTX-4090-24GB": 24 * GiB,
    "A100-40GB": 40 * GiB,
    "A100-80GB": 80 * GiB,
    "H100-80GB": 80 * GiB,
    "H200-141GB": 141 * GiB,
}

# Reserve per GPU for activations, temporary buffers and library workspace during a forward
# pass. vLLM measures this by profiling one forward pass at its largest batch; kvlab states
# a round figure instead, so the plan can be computed without a GPU.
DEFAULT_RESERVE_BYTES = 1 * GiB


def list_gpus() -> dict[str, int]:
    """GPU presets: name -> memory in bytes (nominal size, in GiB)."""
    return dict(GPUS)


def dtype_bits(dtype, *, arg: str = "dtype") -> int:
    """Bits per element of a KV or weight dtype name ("float16", "fp8", "int4", ... or a torch.dtype).
    `arg` names the argument in an error message."""
    allowed = f"{', '.join(KV_DTYPE_BITS)} (or aliases {', '.join(_DTYPE_ALIASES)})"
    if not isinstance(dtype, str) and type(dtype).__name__ != "dtype":       # torch.dtype (or numpy's)
        raise TypeError(f"{arg} must be a dtype name or a torch.dtype, one of {allowed}; got {checks.shown(dtype)}")
    name = str(dtype).removeprefix("torch.").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in KV_DTYPE_BITS:
        raise ValueError(f"{arg}: unknown dtype {dtype!r}; allowed: {allowed}")
    return KV_DTYPE_BITS[name]


def check_spec(spec) -> ModelSpec:
    """spec itself, when it is a ModelSpec (which checked its own fields when it was made)."""
    if not isinstance(spec, ModelSpec):
        hint = f" (for a preset: ModelSpec.preset({spec!r}))" if isinstance(spec, str) else ""
        raise TypeError(f"spec must be a ModelSpec{hint}, got {checks.shown(spec)}")
    return spec


def kv_heads_per_gpu(spec: ModelSpec, tensor_parallel: int = 1, *, arg: str = "tensor_parallel") -> int:
    """KV heads each GPU caches under tensor parallelism.

    Query heads are split evenly over the GPUs, and each GPU keeps the KV heads its query
    heads read. With more GPUs than KV heads (e.g. Llama-3-8B's 8 KV heads on 16 GPUs), KV
    heads are *replicated*: each GPU still holds one whole KV head, so the per-GPU cache stops
    shrinking. MLA's latent is shared by all heads, so every GPU caches all of it (returns 1).
    `arg` names the argument in an error message.
    """
    check_spec(spec)
    tensor_parallel = checks.count(arg, tensor_parallel)
    if spec.num_heads % tensor_parallel:
        raise ValueError(f"{arg}={tensor_parallel} must divide {spec.name}'s {spec.num_heads} "
                         f"query heads; allowed: {_divisors(spec.num_heads)}")
    if spec.attention == "mla":
        return 1
    if spec.num_kv_heads >= tensor_parallel:
        if spec.num_kv_heads % tensor_parallel:
            raise ValueError(f"{arg}={tensor_parallel} must divide {spec.name}'s {spec.num_kv_heads} KV heads "
                             f"(or be a multiple of them); allowed: {_allowed_tp(spec)}")
        return spec.num_kv_heads // tensor_parallel
    if tensor_parallel % spec.num_kv_heads:
        raise ValueError(f"{arg}={tensor_parallel} exceeds {spec.name}'s {spec.num_kv_heads} KV heads and "
                         f"is not a multiple of them, so KV heads cannot be replicated evenly; allowed: {_allowed_tp(spec)}")
    return 1  # replicated: tensor_parallel / num_kv_heads GPUs hold a copy of each KV head


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _allowed_tp(spec: ModelSpec) -> list[int]:
    ok = []
    for tp in _divisors(spec.num_heads):
        kv = spec.num_kv_heads
        if spec.attention == "mla" or (kv % tp == 0 if kv >= tp else tp % kv == 0):
            ok.append(tp)
    return ok


def kv_bytes_per_token(spec: ModelSpec, kv_dtype="float16", tensor_parallel: int = 1) -> int:
    """Bytes of KV cache one token adds, over all layers (per GPU when tensor_parallel > 1).

    MHA/GQA/MQA: num_layers * 2 (K and V) * num_kv_heads * head_dim * bytes_per_element.
    MLA: num_layers * (kv_lora_rank + qk_rope_head_dim) * bytes_per_element (no separate V).
    Quantization scales are not counted (see KV_DTYPE_BITS). int4 packs two elements a byte.
    """
    check_spec(spec)
    bits = dtype_bits(kv_dtype, arg="kv_dtype")
    heads = kv_heads_per_gpu(spec, tensor_parallel)  # also checks that TP divides the heads
    if spec.attention == "mla":
        elements = spec.num_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim)  # latent c_KV + RoPE key k^R
    else:
        elements = spec.num_layers * 2 * heads * spec.head_dim                    # K and V, each (heads, head_dim)
    return -(-elements * bits // 8)                     # ceil, in exact integers


def cached_tokens(spec: ModelSpec, seq_len: int, *, arg: str = "seq_len") -> int:
    """Tokens a request of seq_len tokens keeps in its cache: all of them, or the sliding window.
    `arg` names the argument in an error message."""
    check_spec(spec)
    seq_len = checks.count(arg, seq_len)
    if spec.max_position_embeddings and seq_len > spec.max_position_embeddings:
        raise ValueError(f"{arg} {seq_len} exceeds {spec.name}'s maximum context of "
                         f"{spec.max_position_embeddings} tokens; allowed: 1..{spec.max_position_embeddings}")
    return min(seq_len, spec.sliding_window) if spec.sliding_window else seq_len


def kv_cache_bytes(spec: ModelSpec, seq_len: int, batch_size: int = 1, kv_dtype="float16",
                   tensor_parallel: int = 1) -> int:
    """Bytes of KV cache for batch_size requests of seq_len tokens each (per GPU under TP).

    With a sliding window the cache holds at most `sliding_window` tokens per layer.
    """
    check_spec(spec)
    batch_size = checks.count("batch_size", batch_size)
    return batch_size * cached_tokens(spec, seq_len) * kv_bytes_per_token(spec, kv_dtype, tensor_parallel)


def rule_of_thumb_bytes_per_token(spec: ModelSpec, kv_dtype="float16") -> int:
    """The common rule of thumb, num_layers * 2 * hidden_size * bytes: right for MHA only."""
    check_spec(spec)
    return -(-spec.num_layers * 2 * spec.hidden_size * dtype_bits(kv_dtype, arg="kv_dtype") // 8)


def weight_bytes(spec: ModelSpec, weight_dtype="bfloat16", tensor_parallel: int = 1) -> int:
    """Bytes of weights per GPU: num_params * bytes_per_param, split evenly over tensor-parallel GPUs.

    (Norms and biases are in fact replicated, but they are a tiny fraction of the weights.)
    """
    check_spec(spec)
    bits = dtype_bits(weight_dtype, arg="weight_dtype")
    tensor_parallel = checks.count("tensor_parallel", tensor_parallel)
    if spec.num_params is None:
        raise ValueError(f"{spec.name} has no num_params, so its weight memory is unknown; set num_params")
    return -(-spec.num_params * bits // (8 * tensor_parallel))     # ceil, in exact integers


def gpu_bytes(gpu, *, arg: str = "gpu") -> tuple[str, int]:
    """(name, bytes) for a GPU preset name or a plain byte count (an int, or a whole float such
    as 80e9; at least 1 and below 2**63). `arg` names the argument in an error message."""
    allowed = f"a GPU preset name ({', '.join(GPUS)}) or a positive whole number of bytes below 2**63"
    if isinstance(gpu, str):
        if gpu not in GPUS:
            raise ValueError(f"unknown GPU {gpu!r} for {arg}; allowed: {allowed}")
        return gpu, GPUS[gpu]
    gpu = checks.whole_number(arg, gpu, 1, allowed)
    if gpu > checks.INT64_MAX:
        raise ValueError(f"{arg} must be {allowed}, got {checks.brief(gpu)}")
    return f"{gpu / GiB:.1f} GiB", gpu


@dataclass(frozen=True)
class MemoryPlan:
    """How one GPU's memory is spent serving a model. Every byte count is per GPU."""

    model: str
    gpu: str
    gpu_bytes: int                  # the card's memory
    usable_bytes: int               # gpu_bytes * gpu_memory_utilization
    weight_bytes: int               # this GPU's share of the weights
    reserve_bytes: int              # activations and workspace (stated, not profiled)
    kv_budget_bytes: int            # usable - weights - reserve, floored at 0
    kv_bytes_per_token: int         # this GPU's share of one token's K and V
    kv_bytes_per_request: int       # one request at context_len (capped by a sliding window)
    max_cached_tokens: int          # tokens the KV budget holds
    max_concurrent_requests: int    # requests of context_len that fit at once
    fits: bool                      # weights fit and at least one full request's cache fits
    context_len: int
    tensor_parallel: int
    gpu_memory_utilization: float
    weight_dtype: str
    kv_dtype: str
    kv_heads_per_gpu: int           # 1 for MLA (the latent is not split by head)
    kv_heads_replicated: bool       # more GPUs than KV heads: each KV head is copied
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        return d


def memory_plan(spec: ModelSpec, gpu="H100-80GB", weight_dtype="bfloat16", kv_dtype="bfloat16",
                context_len: int = 4096, gpu_memory_utilization: float = 0.9, tensor_parallel: int = 1,
                reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> MemoryPlan:
    """Plan one GPU's memory for serving `spec` with requests of `context_len` tokens.

    usable = gpu * gpu_memory_utilization; kv_budget = usable - weights/TP - reserve;
    max_concurrent_requests = (kv_budget // kv_bytes_per_token) // cached tokens per request.
    When the weights (plus reserve) alone do not fit, fits is False and max_concurrent_requests is 0.
    """
    check_spec(spec)
    gpu_name, total = gpu_bytes(gpu)
    gpu_memory_utilization = checks.in_range("gpu_memory_utilization", gpu_memory_utilization, 0, 1,
                                             "a number in (0, 1]", low_open=True)
    allowed = "a whole number of bytes >= 0 and below 2**63"
    reserve_bytes = checks.whole_number("reserve_bytes", reserve_bytes, 0, allowed)
    if reserve_bytes > checks.INT64_MAX:
        raise ValueError(f"reserve_bytes must be {allowed}, got {checks.brief(reserve_bytes)}")
    context_len = checks.count("context_len", context_len)             # plain ints from here on
    tensor_parallel = checks.count("tensor_parallel", tensor_parallel)
    per_token = kv_bytes_per_token(spec, kv_dtype, tensor_parallel)   # checks kv_dtype and TP
    tokens_per_request = cached_tokens(spec, context_len, arg="context_len")
    weights = weight_bytes(spec, weight_dtype, tensor_parallel)        # checks weight_dtype

    usable = int(total * gpu_memory_utilization)
    budget = max(0, usable - weights - reserve_bytes)
    max_tokens = budget // per_token
    max_requests = max_tokens // tokens_per_request
    heads = kv_heads_per_gpu(spec, tensor_parallel)
    replicated = spec.attention != "mla" and tensor_parallel > spec.num_kv_heads

    notes = []
    if weights + reserve_bytes > usable:
        notes.append(f"does not fit: weights ({weights / GiB:.1f} GiB per GPU) plus the reserve "
                     f"({reserve_bytes / GiB:.1f} GiB) exceed the usable {usable / GiB:.1f} GiB")
    elif max_requests == 0:
        notes.append(f"does not fit: the KV budget ({budget / GiB:.2f} GiB) is smaller than one request's "
                     f"cache at {context_len} tokens ({tokens_per_request * per_token / GiB:.2f} GiB)")
    if replicated:
        notes.append(f"{spec.num_kv_heads} KV heads over {tensor_parallel} GPUs: each KV head is replicated on "
                     f"{tensor_parallel // spec.num_kv_heads} GPUs, so the per-GPU cache does not shrink further")
    if spec.attention == "mla" and tensor_parallel > 1:
        notes.append("MLA: the compressed latent is shared by all heads, so every GPU caches all of it")
    if spec.sliding_window and context_len > spec.sliding_window:
        notes.append(f"sliding window: each request caches only the last {spec.sliding_window} tokens")

    return MemoryPlan(
        model=spec.name, gpu=gpu_name, gpu_bytes=total, usable_bytes=usable, weight_bytes=weights,
        reserve_bytes=reserve_bytes, kv_budget_bytes=budget, kv_bytes_per_token=per_token,
        kv_bytes_per_request=tokens_per_request * per_token, max_cached_tokens=max_tokens,
        max_concurrent_requests=max_requests, fits=max_requests > 0, context_len=context_len,
        tensor_parallel=tensor_parallel, gpu_memory_utilization=float(gpu_memory_utilization),
        weight_dtype=str(weight_dtype), kv_dtype=str(kv_dtype), kv_heads_per_gpu=heads,
        kv_heads_replicated=replicated, notes=tuple(notes),
    )


def measured_cache_bytes(past_key_values) -> int:
    """Bytes actually held by a Hugging Face cache: the sum of its key and value tensors.

    Works on transformers' DynamicCache (per-layer tensors under `.layers[i].keys` and
    `.values`) and on the legacy tuple-of-(key, value) format. This is the measurement the
    formula above is checked against.
    """
    if hasattr(past_key_values, "layers"):
        pairs = [(layer.keys, layer.values) for layer in past_key_values.layers]
    elif isinstance(past_key_values, (tuple, list)):
        pairs = [tuple(layer) for layer in past_key_values]
    else:
        raise TypeError(f"past_key_values must be a transformers Cache (with .layers) or a tuple of (key, value) "
                        f"pairs, got {checks.shown(past_key_values)}")
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if t is not None)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as memory is sized."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
