"""Chapter 01 exercises (notebooks/exercises/01_forward_pass.ipynb), checked against kvlab's model.

    01.1  attention_head(q, k, v) -> out     one causal attention head: (T, D) -> (T, D)
    01.2  attention_heads(q, k, v) -> out    every head of a layer, GQA: (T, Hq, D), (T, Hkv, D) -> (T, Hq, D)
    01.3  ffn(x, layer) -> out               RMSNorm, then the SwiGLU FFN of one layer: (T, H) -> (T, H)

The references are kvlab's own: `kvlab.model.attention.sdpa` (the attention every kvlab model
runs) and `kvlab.Transformer.ffn`; the last cases of each check run on SmolLM2-135M's real
weights (layer 0 of the course's prompt), where the answer must equal the model's own tensors.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kvlab.exercises.harness import Case, Mismatch, Verdict, compare_tensors, matches, run_check, tol
from kvlab.exercises.models import PROMPT, smollm2
from kvlab.model.attention import sdpa
from kvlab.model.transformer import Layer, Linear, Norm, Transformer

ATOL = 1e-5          # float32 attention: same operations in another order agree to ~1e-7
FFN_TOL = 1e-4       # FFN outputs reach ~30 on the real model: atol and rtol 1e-4


# ---- shared: the real model's layer-0 tensors on the course prompt --------------------------------

def _layer0_qkv():
    """q (T, 9, 64), k and v (T, 3, 64) of SmolLM2-135M's layer 0 on the prompt (after RoPE)."""
    lm, model = smollm2()
    ids = torch.tensor([lm.encode(PROMPT)])
    positions = torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        q, k, v = model.qkv(model.embed(ids, positions), 0, positions)
    return q[0].clone(), k[0].clone(), v[0].clone()


def _real_label(what: str) -> str:
    lm, _ = smollm2()
    return f"the real model: SmolLM2-135M, {what}, on the {len(lm.encode(PROMPT))}-token prompt {PROMPT!r}"


# ---- 01.1 one causal attention head ---------------------------------------------------------------

def _head_reference(q, k, v):
    return sdpa(q[None, :, None], k[None, :, None], v[None, :, None], is_causal=True)[0, :, 0]


def _softmax_weights(q, k, scale=None, mask="causal", dim=-1):
    """The usual mistakes, as the attention weights they compute (q, k: (T, D))."""
    T, D = q.shape
    scores = (q @ k.T) * (1 / math.sqrt(D) if scale is None else scale)          # (T, T)
    if mask == "causal":
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    elif mask == "future":
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).triu(), float("-inf"))
    return scores.softmax(dim=dim)


HEAD_MISTAKES = [
    (lambda q, k, v: _softmax_weights(q, k, mask=None) @ v,
     "Your output equals attention with no causal mask: token t also looks at the tokens after it. "
     "Mask the scores of keys j > t with -inf before the softmax (query t sees keys 0..t)."),
    (lambda q, k, v: _softmax_weights(q, k, mask="future") @ v,
     "Your mask is the wrong triangle: query t sees keys t..T-1 (the future) instead of 0..t. "
     "Keep the lower triangle (j <= t), e.g. torch.ones(T, T, dtype=torch.bool).tril()."),
    (lambda q, k, v: _softmax_weights(q, k, scale=1.0) @ v,
     "Your output equals attention without the 1/sqrt(D) scale: scores are (q @ k.T) / sqrt(head_dim)."),
    (lambda q, k, v: _softmax_weights(q, k, scale=1.0 / q.shape[-1]) @ v,
     "You scaled the scores by 1/D; the scale is 1/sqrt(D) (D = head_dim)."),
    (lambda q, k, v: _softmax_weights(q, k, dim=0) @ v,
     "Your softmax normalizes columns (dim=0): each query's row of weights must sum to 1 (softmax over the "
     "keys, dim=-1)."),
]


def _diagnose_with(mistakes, tol, *, rtol=0.0):
    def diagnose(case: Case, got) -> str | None:
        if isinstance(got, torch.Tensor) and got.is_floating_point() and not torch.isfinite(got).all() \
                and case.data.get("large"):
            return ("Your softmax overflowed: exp of a large score is inf, and inf / inf is NaN. Subtract each "
                    "row's maximum score before exp (softmax is unchanged by that shift), or use torch.softmax.")
        for model, hint in mistakes:
            if matches(model(*case.args), got, lambda e, g: compare_tensors(e, g, atol=tol, rtol=rtol)):
                return hint
        return None
    return diagnose


def _lazy(fn, *args):
    return lambda: fn(*args)


def _head_cases():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, generator=g) for _ in range(3))
    yield Case("case 1: a single token (T = 1)", (q, k, v), expected=_lazy(_head_reference, q, k, v),
               inputs="q, k, v: float32 (1, 8); one token can only look at itself, so the output is v")
    shapes = [(2, 4), (3, 8), (5, 16), (7, 8), (8, 64), (12, 32), (17, 16), (24, 64)]
    for i, (T, D) in enumerate(shapes, start=2):
        q, k, v = (torch.randn(T, D, generator=g) for _ in range(3))
        yield Case(f"case {i}: random, T = {T}, D = {D}", (q, k, v), expected=_lazy(_head_reference, q, k, v),
                   inputs=f"q, k, v: float32 ({T}, {D}), random normal")
    T, D = 6, 16
    q, k, v = (torch.randn(T, D, generator=g) * s for s in (10.0, 10.0, 1.0))
    yield Case(f"case {len(shapes) + 2}: large scores (T = {T}, D = {D}, scores up to a few hundred)", (q, k, v),
               expected=_lazy(_head_reference, q, k, v), data={"large": True},
               inputs=f"q, k: float32 ({T}, {D}) random normal x 10; v: ({T}, {D}) random normal")
    q, k, v = _layer0_qkv()
    yield Case(f"case {len(shapes) + 3}: " + _real_label("layer 0, query head 0 (it reads KV head 0)"),
               (q[:, 0].clone(), k[:, 0].clone(), v[:, 0].clone()),
               expected=_lazy(lambda: sdpa(q[None], k[None], v[None], is_causal=True)[0, :, 0]),
               inputs=f"q, k, v: float32 ({q.shape[0]}, 64), after RoPE")


def check_attention_head(attention_head) -> Verdict:
    """01.1: attention_head(q, k, v) with q, k, v of shape (T, D) returns softmax(q k^T / sqrt(D) + causal
    mask) v, of shape (T, D): the same as kvlab's attention, within 1e-5."""
    return run_check(
        "01.1 attention_head", attention_head, _head_cases(),
        compare=lambda e, g: compare_tensors(e, g, atol=ATOL),
        checked=lambda n: (f"{n} cases agree with kvlab's causal attention within {tol(ATOL)}: one token, 8 random "
                           f"shapes (T 2..24, D 4..64), large scores (a softmax that does not subtract the row "
                           f"maximum overflows there), and head 0 of SmolLM2-135M's layer 0 on the course prompt."),
        todo="Write the body of attention_head(q, k, v), then run this cell again.",
        diagnose=_diagnose_with(HEAD_MISTAKES, ATOL),
        on_error=lambda case, err: ("q, k and v are (T, D) for one head: the scores are q @ k.T, shape (T, T)."
                                    if isinstance(err, RuntimeError) else None),
        generic_hint="Compare with the recipe: scores = q @ k.T / sqrt(D); set scores[t, j] = -inf for j > t; "
                     "softmax over the last dimension; multiply by v.")


# ---- 01.2 every head of a layer, with GQA ---------------------------------------------------------

def _heads_reference(q, k, v):
    return sdpa(q[None], k[None], v[None], is_causal=True)[0]


def _heads_with(q, k, v, kv_head_of):
    """Attention where query head h reads KV head kv_head_of(h, Hq, Hkv) (a mistake model)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    return torch.stack([_head_reference(q[:, h], k[:, kv_head_of(h, Hq, Hkv)], v[:, kv_head_of(h, Hq, Hkv)])
                        for h in range(Hq)], dim=1)


HEADS_MISTAKES = [
    (lambda q, k, v: _heads_with(q, k, v, lambda h, Hq, Hkv: h % Hkv),
     "Query head h must read KV head h // (Hq // Hkv): consecutive query heads share a KV head (heads 0, 1, 2 "
     "read KV head 0 when the group is 3). Yours pairs head h with KV head h % Hkv, which is what "
     "k.repeat(...) gives; repeat_interleave(group, dim=1) gives the right order."),
    (lambda q, k, v: _heads_with(q, k, v, lambda h, Hq, Hkv: 0),
     "Every query head in your output read KV head 0. Query head h reads KV head h // (Hq // Hkv)."),
    (lambda q, k, v: torch.stack([_softmax_weights(q[:, h], k[:, h // (q.shape[1] // k.shape[1])], mask=None)
                                  @ v[:, h // (q.shape[1] // k.shape[1])] for h in range(q.shape[1])], dim=1),
     "The heads are paired right, but there is no causal mask: token t also looks at later tokens."),
]


def _heads_cases():
    g = torch.Generator().manual_seed(2)
    shapes = [(1, 1, 1, 8), (4, 4, 4, 8), (5, 4, 2, 8), (6, 4, 1, 16), (7, 6, 2, 8), (9, 9, 3, 16), (11, 8, 2, 32)]
    for i, (T, Hq, Hkv, D) in enumerate(shapes, start=1):
        q = torch.randn(T, Hq, D, generator=g)
        k, v = torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
        kind = "MHA" if Hq == Hkv else "MQA" if Hkv == 1 else "GQA"
        yield Case(f"case {i}: random {kind}, T = {T}, Hq = {Hq}, Hkv = {Hkv}, D = {D}", (q, k, v),
                   expected=_lazy(_heads_reference, q, k, v),
                   inputs=f"q: float32 ({T}, {Hq}, {D}); k, v: float32 ({T}, {Hkv}, {D}); random normal")
    q, k, v = _layer0_qkv()
    yield Case(f"case {len(shapes) + 1}: " + _real_label("layer 0, all 9 query heads over 3 KV heads"), (q, k, v),
               expected=_lazy(_heads_reference, q, k, v),
               inputs=f"q: float32 ({q.shape[0]}, 9, 64); k, v: float32 ({q.shape[0]}, 3, 64); after RoPE")


def check_attention_heads(attention_heads) -> Verdict:
    """01.2: attention_heads(q, k, v) with q (T, Hq, D), k and v (T, Hkv, D) returns (T, Hq, D): causal
    attention per query head, head h reading KV head h // (Hq // Hkv); equal to kvlab's attention."""
    return run_check(
        "01.2 attention_heads", attention_heads, _heads_cases(),
        compare=lambda e, g: compare_tensors(e, g, atol=ATOL),
        checked=lambda n: (f"{n} cases agree with kvlab's attention within {tol(ATOL)}: MHA, GQA and MQA head counts "
                           f"(groups of 1 to 6 query heads per KV head) and all 9 heads of SmolLM2-135M's layer 0 "
                           f"(3 KV heads) on the course prompt."),
        todo="Write the body of attention_heads(q, k, v) (you may call your attention_head), then run this "
             "cell again.",
        diagnose=_diagnose_with(HEADS_MISTAKES, ATOL),
        on_error=lambda case, err: ("k and v have fewer heads than q (GQA): query head h reads KV head "
                                    "h // (Hq // Hkv), so index k[:, h // group], not k[:, h]."
                                    if isinstance(err, (IndexError, RuntimeError)) else None),
        generic_hint="For each query head h: kv = h // (Hq // Hkv); out[:, h] = attention_head(q[:, h], k[:, kv], "
                     "v[:, kv]).")


# ---- 01.3 the FFN, per token ----------------------------------------------------------------------

def _ffn_reference(x, layer):
    return Transformer.ffn(SimpleNamespace(layers=[layer]), x, 0)         # kvlab's own FFN, on this layer


def _rms(x, weight, eps, dim=-1):
    return weight * (x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + eps))


FFN_MISTAKES = [
    (lambda x, l: l.down(F.silu(l.gate(x)) * l.up(x)),
     "Your FFN skips the RMSNorm: normalize x first, h = x * rsqrt(mean(x**2, last dim) + eps) * weight "
     "(layer.ffn_norm.weight, layer.ffn_norm.eps), then gate and up act on h."),
    (lambda x, l: l.down(F.silu(l.up(_rms(x, l.ffn_norm.weight, l.ffn_norm.eps)))
                         * l.gate(_rms(x, l.ffn_norm.weight, l.ffn_norm.eps))),
     "SiLU goes on the gate projection, not on up: down(silu(gate(h)) * up(h))."),
    (lambda x, l: l.down(F.gelu(l.gate(_rms(x, l.ffn_norm.weight, l.ffn_norm.eps)))
                         * l.up(_rms(x, l.ffn_norm.weight, l.ffn_norm.eps))),
     "Llama-family models (SmolLM2 too) use SiLU (x * sigmoid(x)) in SwiGLU, not GELU."),
    (lambda x, l: l.down(F.silu(l.gate(_rms(x, l.ffn_norm.weight, l.ffn_norm.eps, dim=0)))
                         * l.up(_rms(x, l.ffn_norm.weight, l.ffn_norm.eps, dim=0))),
     "Your RMSNorm averages over the tokens (dim 0), so each token's output depends on the others. Normalize "
     "each token over its own hidden dimension (dim=-1): the FFN works on every token alone."),
    (lambda x, l: l.down(F.silu(l.gate(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + l.ffn_norm.eps)))
                         * l.up(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + l.ffn_norm.eps))),
     "Your RMSNorm forgets its learned scale: multiply the normalized x by layer.ffn_norm.weight."),
]


def _random_layer(H: int, I: int, g: torch.Generator) -> Layer:
    lin = lambda o, i: Linear(torch.randn(o, i, generator=g) / math.sqrt(i))
    norm = Norm(1 + 0.1 * torch.randn(H, generator=g), None, 1e-5)
    return Layer(attn_norm=norm, ffn_norm=Norm(1 + 0.1 * torch.randn(H, generator=g), None, 1e-5),
                 o=lin(H, H), down=lin(H, I), up=lin(I, H), gate=lin(I, H))


def _ffn_inputs(layer_index: int):
    """The residual stream entering layer i's FFN on the prompt: (T, 576)."""
    lm, model = smollm2()
    ids = torch.tensor([lm.encode(PROMPT)])
    positions = torch.arange(ids.shape[1])[None]
    from kvlab.model.attention import causal_attention
    with torch.inference_mode():
        x = model.embed(ids, positions)
        for i in range(layer_index):
            x = model.block(x, i, positions, causal_attention)
        x = x + model.attention(x, layer_index, positions, causal_attention)
    return x[0].clone(), model.layers[layer_index]


def _each_token_alone(fn, case: Case):
    """Run fn on all T tokens at once, then on each token alone: the rows must agree."""
    x, layer = case.args
    batch = fn(x, layer)
    problem = compare_tensors(_ffn_reference(x, layer), batch, atol=FFN_TOL, rtol=FFN_TOL)
    if problem is not None:
        return batch
    for t in range(x.shape[0]):
        alone = fn(x[t:t + 1], layer)
        if compare_tensors(batch[t:t + 1], alone, atol=FFN_TOL, rtol=FFN_TOL) is not None:
            raise Mismatch(f"your FFN of token {t} alone differs from row {t} of your FFN of all {x.shape[0]} "
                           f"tokens", hint="The FFN must not mix tokens: every operation acts on each row "
                           "(token) by itself. Check that the norm averages over the last dimension only.")
    return batch


def _ffn_cases():
    g = torch.Generator().manual_seed(3)
    for i, T in enumerate((1, 5), start=1):
        layer = _random_layer(8, 16, g)
        x = torch.randn(T, 8, generator=g)
        yield Case(f"case {i}: a random layer (H = 8, I = 16), T = {T}", (x, layer),
                   expected=_lazy(_ffn_reference, x, layer),
                   inputs=f"x: float32 ({T}, 8) random normal; layer: random weights")
    for i, index in enumerate((0, 14, 29), start=3):
        x, layer = _ffn_inputs(index)
        yield Case(f"case {i}: " + _real_label(f"layer {index}'s FFN (H = 576, I = 1536)"), (x, layer),
                   expected=_lazy(_ffn_reference, x, layer),
                   inputs=f"x: float32 ({x.shape[0]}, 576), the residual stream entering layer {index}'s FFN")
    x, layer = _ffn_inputs(0)
    yield Case(f"case 6: each of the {x.shape[0]} prompt tokens alone through layer 0's FFN, against its row of "
               f"the batch", (x, layer), expected=_lazy(_ffn_reference, x, layer), call=_each_token_alone,
               inputs=f"x: float32 ({x.shape[0]}, 576), then each row x[t:t+1] alone")


def check_ffn(ffn) -> Verdict:
    """01.3: ffn(x, layer) with x (T, H) returns down(silu(gate(h)) * up(h)), h = RMSNorm(x) with the
    layer's ffn_norm: equal to kvlab's Transformer.ffn; and each token alone gives its row of the batch."""
    return run_check(
        "01.3 ffn", ffn, _ffn_cases(),
        compare=lambda e, g: compare_tensors(e, g, atol=FFN_TOL, rtol=FFN_TOL),
        checked=lambda n: (f"{n} cases agree with kvlab's FFN within {tol(FFN_TOL)} (atol and rtol): random layers, "
                           f"SmolLM2-135M's layers 0, 14 and 29 on the course prompt, and every prompt token run "
                           f"alone gives its row of the batch: the FFN never looks at another token."),
        todo="Write the body of ffn(x, layer), then run this cell again.",
        diagnose=_diagnose_with(FFN_MISTAKES, FFN_TOL, rtol=FFN_TOL),
        generic_hint="h = x * rsqrt(mean(x**2 over the last dim) + eps) * layer.ffn_norm.weight; then "
                     "layer.down(silu(layer.gate(h)) * layer.up(h)).")
