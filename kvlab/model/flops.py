"""Counting a forward pass: FLOPs by part, bytes moved, and their ratio.

A matrix product of (m, k) by (k, n) costs 2·m·k·n FLOPs (a multiply and an add
per term). For T new tokens attending over S keys (S = cached context + T), per layer:

    projections   q, k, v, o      2·T·H·(2·Hq·D + 2·Hkv·D)        linear in T
    attention     QKᵀ and A·V      2·(2·T·S·Hq·D)                  T·S: quadratic in prefill (S = T)
    FFN           SwiGLU: 3 mats   2·T·3·H·I   (GPT-2: 2 mats)     linear in T
and once at the end the LM head, 2·H·V per token it is applied to: every one of the T
tokens (`logits="all"`, what `Transformer.__call__` returns), or only the last token of each
sequence (`logits="last"`), which is all that generation samples from and all that an engine
computes (nanoGPT's `x[:, [-1], :]`, vLLM's logits indices). Prefill with S = T computes the full
T×T score matrix (the causal mask zeroes half of it afterwards), so that is what
is counted. Norms, RoPE and softmax are O(T·H) or O(T·S) elementwise work: small
next to the matmuls, left out.

So a prefill of T tokens costs c + a·T + b·T² (`prefill_fit`): b from attention, a from every
weight matrix applied per token, and c = 2·H·V when the LM head runs on the last token only.

Bytes: a step must read every weight once (whatever T is) plus the cached K/V it
attends over. FLOPs / bytes (arithmetic intensity) is why prefill is compute-bound
and decode is memory-bound. In a decode step the two reads behave differently
(`decode_intensity`): the weights are read once for the whole batch, so their FLOPs per
byte grow with the batch; each sequence's K/V is read for that sequence's query alone, so
attention's FLOPs per byte stay at about Hq/Hkv (in a 2-byte dtype) whatever the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvlab.model.spec import ModelSpec

LOGITS = ("all", "last")    # which new tokens the LM head runs on


@dataclass(frozen=True)
class GpuPeak:
    """A GPU's two ceilings, and the arithmetic intensity where they meet (the roofline's ridge)."""
    name: str
    bf16_tflops: float           # dense bf16 tensor-core FLOP/s, in TFLOP/s
    memory_tb_per_s: float       # memory bandwidth, in TB/s
    source: str

    @property
    def ridge_flops_per_byte(self) -> float:
        """Below this many FLOPs per byte moved, a kernel is memory-bound on this GPU."""
        return self.bf16_tflops / self.memory_tb_per_s


# The one peak the course quotes for the H100 (notebooks 02 and 06 both read it from here).
H100_SXM = GpuPeak("H100 SXM5 80GB", bf16_tflops=989.4, memory_tb_per_s=3.35,
                   source="NVIDIA H100 Tensor Core GPU datasheet (dense BF16, without sparsity; HBM3)")


@dataclass(frozen=True)
class FlopCount:
    projections: int
    attention: int
    ffn: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.projections + self.attention + self.ffn + self.lm_head

    def as_dict(self) -> dict[str, int]:
        return {"projections (QKV, O)": self.projections, "attention (QKᵀ, AV)": self.attention,
                "FFN": self.ffn, "LM head": self.lm_head}


def forward_flops(spec: ModelSpec, new_tokens: int, context: int = 0, batch_size: int = 1,
                  logits: str = "all") -> FlopCount:
    """FLOPs of one forward pass over `new_tokens` per sequence, with `context` tokens already cached.

    logits="all" applies the LM head to every new token (as `model(ids)` does); "last" to the
    last new token of each sequence only (as an engine does: it samples from that one).
    """
    if new_tokens <= 0 or context < 0 or batch_size <= 0:
        raise ValueError(f"need new_tokens > 0, context >= 0, batch_size > 0; got {new_tokens}, {context}, {batch_size}")
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
    T, S = new_tokens, context + new_tokens
    H, D, L, V, I = spec.hidden_size, spec.head_dim, spec.num_layers, spec.vocab_size, spec.intermediate_size
    Hq, Hkv = spec.num_heads, spec.num_kv_heads
    ffn_mats = 2 if spec.architecture == "gpt2" else 3
    per_seq = FlopCount(
        projections=L * 2 * T * H * (2 * Hq * D + 2 * Hkv * D),
        attention=L * 2 * (2 * T * S * Hq * D),
        ffn=L * 2 * T * ffn_mats * H * I,
        lm_head=2 * (T if logits == "all" else 1) * H * V,
    )
    return FlopCount(*(batch_size * getattr(per_seq, f) for f in ("projections", "attention", "ffn", "lm_head")))


@dataclass(frozen=True)
class PrefillFit:
    """Prefill FLOPs of one sequence of T tokens, exactly: constant + linear·T + quadratic·T²."""
    constant: int     # LM head on the last token only (0 when it runs on every token)
    linear: int       # FLOPs per token of every weight matrix (projections, FFN, LM head if on all tokens)
    quadratic: int    # attention's QKᵀ and A·V, per token²

    def __call__(self, T: int) -> int:
        return self.constant + self.linear * T + self.quadratic * T * T

    @property
    def crossover_tokens(self) -> float:
        """The T where attention's quadratic·T² equals everything else (constant + linear·T)."""
        a, b, c = self.linear, self.quadratic, self.constant
        return (a + math.sqrt(a * a + 4 * b * c)) / (2 * b)


def prefill_fit(spec: ModelSpec, logits: str = "all") -> PrefillFit:
    """The coefficients of `forward_flops(spec, T, logits=logits).total` as a polynomial in T,
    read off the counter at T = 1, 2, 3 (it is exactly quadratic)."""
    f1, f2, f3 = (forward_flops(spec, T, logits=logits).total for T in (1, 2, 3))
    quadratic = (f3 - 2 * f2 + f1) // 2
    linear = f2 - f1 - 3 * quadratic
    fit = PrefillFit(constant=f1 - linear - quadratic, linear=linear, quadratic=quadratic)
    assert fit(3) == f3, "forward_flops is not quadratic in T"
    return fit


def _kv_dtype(dtype_bytes: int) -> str:
    """The KV dtype name for a width in bytes (what kvlab.memory counts by)."""
    names = {4: "float32", 2: "float16", 1: "int8"}
    if dtype_bytes not in names:
        raise ValueError(f"dtype_bytes must be one of {sorted(names)} (bytes per element), got {dtype_bytes!r}")
    return names[dtype_bytes]


def step_bytes(spec: ModelSpec, new_tokens: int, context: int = 0, batch_size: int = 1,
               dtype_bytes: int = 2) -> int:
    """The fewest bytes one forward step must move: all weights once, plus the K/V it
    reads (context) and writes (new tokens) for every sequence. Activations are left out."""
    from kvlab.memory import kv_bytes_per_token

    if spec.num_params is None:
        raise ValueError(f"{spec.name}: num_params is unknown, so weight bytes cannot be counted")
    kv_dtype = _kv_dtype(dtype_bytes)
    kv_per_token = kv_bytes_per_token(spec, kv_dtype=kv_dtype)
    return spec.num_params * dtype_bytes + batch_size * (context + new_tokens) * kv_per_token


def arithmetic_intensity(spec: ModelSpec, new_tokens: int, context: int = 0, batch_size: int = 1,
                         dtype_bytes: int = 2, logits: str = "all") -> float:
    """FLOPs per byte moved for one step. Compare with a GPU's ridge point, FLOP/s ÷ bytes/s: for an
    H100 SXM about 295 (`H100_SXM`: 989 TFLOP/s dense bf16 ÷ 3.35 TB/s, from the datasheet).
    Below it a step is memory-bound."""
    flops = forward_flops(spec, new_tokens, context, batch_size, logits).total
    return flops / step_bytes(spec, new_tokens, context, batch_size, dtype_bytes)


@dataclass(frozen=True)
class PartCost:
    """FLOPs and the fewest bytes one part of a step must move."""
    flops: int
    bytes: int

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes

    def seconds(self, gpu: GpuPeak) -> float:
        """Roofline time on `gpu`: the longer of doing the FLOPs at peak and moving the bytes at peak."""
        return max(self.flops / (gpu.bf16_tflops * 1e12), self.bytes / (gpu.memory_tb_per_s * 1e12))


@dataclass(frozen=True)
class DecodeStepCost:
    """One decode step of `batch_size` sequences at `context` cached tokens each, split in two:
    the weight matmuls (projections, FFN, LM head: one read of the weights for the whole batch)
    and attention (QKᵀ and A·V: each sequence reads its own K/V)."""
    batch_size: int
    context: int
    weights: PartCost
    attention: PartCost

    @property
    def step(self) -> PartCost:
        return PartCost(self.weights.flops + self.attention.flops, self.weights.bytes + self.attention.bytes)

    def seconds(self, gpu: GpuPeak) -> float:
        """Roofline time of the step: each part at its own bound (they run one after the other)."""
        return self.weights.seconds(gpu) + self.attention.seconds(gpu)

    def tokens_per_second(self, gpu: GpuPeak) -> float:
        """Output tokens per second at the roofline time: one token per sequence per step."""
        return self.batch_size / self.seconds(gpu)


def decode_step_cost(spec: ModelSpec, context: int, batch_size: int = 1, dtype_bytes: int = 2) -> DecodeStepCost:
    """Split one decode step (one new token per sequence, `context` tokens cached) into weights and attention.

    weights:   FLOPs 2·(matmul weights) per sequence; bytes: every weight once (`num_params`).
    attention: FLOPs 4·S·Hq·D per layer per sequence (S = context + 1); bytes: the K/V of S tokens
               per sequence (the new token's K/V is written, then read back: counted once).
    Their intensities: weights ≈ batch_size · 2 / dtype_bytes; attention = 2·Hq / (Hkv · dtype_bytes),
    the same at every batch size and context.
    """
    from kvlab.memory import kv_bytes_per_token

    if spec.num_params is None:
        raise ValueError(f"{spec.name}: num_params is unknown, so weight bytes cannot be counted")
    if spec.attention == "mla":
        raise ValueError(f"{spec.name}: MLA attends over a compressed latent; this split counts GQA/MHA attention only")
    f = forward_flops(spec, 1, context=context, batch_size=batch_size, logits="last")
    kv_dtype = _kv_dtype(dtype_bytes)
    weights = PartCost(flops=f.projections + f.ffn + f.lm_head, bytes=spec.num_params * dtype_bytes)
    attention = PartCost(flops=f.attention,
                         bytes=batch_size * (context + 1) * kv_bytes_per_token(spec, kv_dtype=kv_dtype))
    return DecodeStepCost(batch_size=batch_size, context=context, weights=weights, attention=attention)
