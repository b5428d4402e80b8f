"""Counting a forward pass: FLOPs by part, bytes moved, and their ratio.

A matrix product of (m, k) by (k, n) costs 2·m·k·n FLOPs (a multiply and an add
per term). For T new tokens attending over S keys (S = cached context + T), per layer:

    projections   q, k, v, o      2·T·H·(2·Hq·D + 2·Hkv·D)        linear in T
    attention     QKᵀ and A·V      2·(2·T·S·Hq·D)                  T·S: quadratic in prefill (S = T)
    FFN           SwiGLU: 3 mats   2·T·3·H·I   (GPT-2: 2 mats)     linear in T
and once at the end the LM head, 2·T·H·V. Prefill with S = T computes the full
T×T score matrix (the causal mask zeroes half of it afterwards), so that is what
is counted. Norms, RoPE and softmax are O(T·H) or O(T·S) elementwise work: small
next to the matmuls, left out.

Bytes: a step must read every weight once (whatever T is) plus the cached K/V it
attends over. FLOPs / bytes (arithmetic intensity) is why prefill is compute-bound
and decode is memory-bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.model.spec import ModelSpec


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


def forward_flops(spec: ModelSpec, new_tokens: int, context: int = 0, batch_size: int = 1) -> FlopCount:
    """FLOPs of one forward pass over `new_tokens` per sequence, with `context` tokens already cached."""
    if new_tokens <= 0 or context < 0 or batch_size <= 0:
        raise ValueError(f"need new_tokens > 0, context >= 0, batch_size > 0; got {new_tokens}, {context}, {batch_size}")
    T, S = new_tokens, context + new_tokens
    H, D, L, V, I = spec.hidden_size, spec.head_dim, spec.num_layers, spec.vocab_size, spec.intermediate_size
    Hq, Hkv = spec.num_heads, spec.num_kv_heads
    ffn_mats = 2 if spec.architecture == "gpt2" else 3
    per_seq = FlopCount(
        projections=L * 2 * T * H * (2 * Hq * D + 2 * Hkv * D),
        attention=L * 2 * (2 * T * S * Hq * D),
        ffn=L * 2 * T * ffn_mats * H * I,
        lm_head=2 * T * H * V,
    )
    return FlopCount(*(batch_size * getattr(per_seq, f) for f in ("projections", "attention", "ffn", "lm_head")))


def step_bytes(spec: ModelSpec, new_tokens: int, context: int = 0, batch_size: int = 1,
               dtype_bytes: int = 2) -> int:
    """The fewest bytes one forward step must move: all weights once, plus the K/V it
    reads (context) and writes (new tokens) for every sequence. Activations are left out."""
    from kvlab.memory import kv_bytes_per_token

    if spec.num_params is None:
        raise ValueError(f"{spec.name}: num_params is unknown, so weight bytes cannot be counted")
    kv_dtype = {4: "float32", 2: "float16", 1: "int8"}[dtype_bytes]
    kv_per_token = kv_bytes_per_token(spec, kv_dtype=kv_dtype)
    return spec.num_params * dtype_bytes + batch_size * (context + new_tokens) * kv_per_token


def arithmetic_intensity(spec: ModelSpec, new_tokens: int, context: int = 0, batch_size: int = 1,
                         dtype_bytes: int = 2) -> float:
    """FLOPs per byte moved for one step. Compare with a GPU's ridge point, FLOP/s ÷ bytes/s: for an
    H100 SXM about 295 (`H100_SXM`: 989 TFLOP/s dense bf16 ÷ 3.35 TB/s, from the datasheet).
    Below it a step is memory-bound."""
    flops = forward_flops(spec, new_tokens, context, batch_size).total
    return flops / step_bytes(spec, new_tokens, context, batch_size, dtype_bytes)
