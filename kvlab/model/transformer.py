"""kvlab's own decoder-only forward pass, on the weights of a loaded HF model.

Two families, one shape of computation (a stack of pre-norm residual blocks):

    x = embed(ids)                                   # (B, T, H)
    for each layer:
        x = x + attention(norm(x))                   # tokens look at earlier tokens
        x = x + ffn(norm(x))                         # each token on its own
    logits = lm_head(norm(x))                        # (B, T, vocab)

- Llama family (Llama, Mistral, Qwen2, SmolLM2): RMSNorm, rotary position
  embeddings (RoPE) applied to q and k, grouped-query attention (GQA), SwiGLU FFN.
- GPT-2: learned position embeddings added to the token embeddings, LayerNorm,
  one fused QKV projection, GELU FFN.

The weights are the HF model's own tensors (no copies), so kvlab's logits can be
compared with HF's on the same parameters. Attention itself is a pluggable
function (`kvlab.model.attention`): the same model code runs without a cache,
with a contiguous cache, or on paged blocks with a Triton kernel.
(Structure after nanoGPT's model.py and the HF Llama/GPT-2 modeling files.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvlab.model.attention import AttentionFn, causal_attention
from kvlab.model.spec import ModelSpec


@dataclass
class Linear:
    """y = x @ weight.T + bias; weight (out, in), as in torch.nn.Linear."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass
class Norm:
    """RMSNorm (bias None) or LayerNorm (with bias)."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        # RMSNorm in float32, as HF Llama does, then back to the activations' dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class Layer:
    """One block's weights. Llama: q/k/v/o, gate/up/down. GPT-2: fused qkv, o, up/down."""
    attn_norm: Norm
    ffn_norm: Norm
    o: Linear
    down: Linear
    up: Linear
    q: Linear | None = None
    k: Linear | None = None
    v: Linear | None = None
    qkv: Linear | None = None      # GPT-2: one projection to [q | k | v]
    gate: Linear | None = None     # Llama: SwiGLU's gate


class Transformer:
    """A decoder-only transformer: `model(input_ids) -> logits`. Build with `Transformer.from_hf(hf_model)`."""

    def __init__(self, spec: ModelSpec, embed_tokens: torch.Tensor, layers: list[Layer], final_norm: Norm,
                 lm_head: Linear, embed_positions: torch.Tensor | None = None, rope_theta: float | None = None):
        self.spec = spec
        self.arch = "gpt2" if embed_positions is not None else "llama"
        self.embed_tokens = embed_tokens          # (vocab, H)
        self.embed_positions = embed_positions    # (max_positions, H), GPT-2 only
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.rope_theta = rope_theta              # Llama only
        self.head_dim = spec.head_dim
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        if rope_theta is not None:       # cos/sin of every position up to the model's maximum, once
            self._build_rope_table(spec.max_position_embeddings or 4096)
        self._fused: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] | None = None

    # ----------------------------------------------------------------- the whole pass
    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                 attn: AttentionFn | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab).

        positions (B, T): where each token sits in its sequence (default 0..T-1: the
        tokens are the whole sequence). attn: where keys and values go (default: no cache).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        self.check_positions(int(positions.max()) if positions.numel() else 0)
        return self.forward(input_ids, positions, attn or causal_attention)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """The pass itself, with no checks and no host-device syncs (the engine's hot path, and
        what a CUDA graph captures).

        input_ids and positions: (B, T), or one flattened batch (N,) of every token scheduled
        in an engine step (many sequences, no padding: `attn` knows where each one starts).
        logits_indices: flat indices of the tokens whose logits are wanted (the last token of
        each sequence that samples); None: every token's. Returns (*input_ids.shape, vocab), or
        (len(logits_indices), vocab): the LM head, the largest matmul of a small model, then
        runs on those rows only (nanoGPT's `x[:, [-1], :]` in generate).
        """
        if self._fused is not None:
            return self._forward_fused(input_ids, positions, attn, logits_indices)
        rope = self.rope(positions)                          # cos/sin looked up once, used by every layer
        x = self.embed(input_ids, positions)                 # (B, T, H) or (N, H)
        for i in range(len(self.layers)):
            x = self.block(x, i, positions, attn, rope=rope)
        if logits_indices is not None:
            x = x.reshape(-1, x.shape[-1])[logits_indices]   # (num_sampled, H)
        return self.logits(x)                                # (..., vocab)

    def check_positions(self, max_position: int) -> None:
        """Refuse positions this model cannot compute as HF does (past its sliding window), and
        grow the RoPE table if needed. The engine calls this once per request, not per step."""
        window = self.spec.sliding_window
        if window is not None and max_position >= window:
            raise ValueError(f"{self.spec.name}: position {max_position} is past the model's sliding window "
                             f"of {window} tokens; kvlab's attention attends to every earlier token, so it only "
                             f"matches this model for sequences of up to {window} tokens")
        if self.rope_theta is not None and max_position >= self._rope_cos.shape[0]:
            self._build_rope_table(max_position + 1)

    # ----------------------------------------------------------------- its parts
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens[input_ids]                     # (B, T, H)
        if self.embed_positions is not None:
            x = x + self.embed_positions[positions]          # GPT-2: learned absolute positions
        return x

    def block(self, x: torch.Tensor, i: int, positions: torch.Tensor, attn: AttentionFn, rope=None) -> torch.Tensor:
        x = x + self.attention(x, i, positions, attn, rope)  # mix information across tokens
        return x + self.ffn(x, i)                            # transform each token on its own

    def qkv(self, x: torch.Tensor, i: int, positions: torch.Tensor, rope=None):
        """Normalize, project and split into heads; RoPE on q and k for Llama.
        x (B, T, H) -> q (B, T, Hq, D), k and v (B, T, Hkv, D); a flattened x (N, H) gives (N, heads, D).
        rope: (cos, sin) from self.rope(positions), if the caller already looked them up."""
        layer = self.layers[i]
        h = layer.attn_norm(x)
        lead = x.shape[:-1]                                  # (B, T) or (N,)
        if layer.qkv is not None:
            q, k, v = layer.qkv(h).split(self.num_heads * self.head_dim, dim=-1)
        else:
            q, k, v = layer.q(h), layer.k(h), layer.v(h)
        q = q.view(*lead, self.num_heads, self.head_dim)     # (B, T, Hq, D)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            cos, sin = rope if rope is not None else self.rope(positions)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attention(self, x: torch.Tensor, i: int, positions: torch.Tensor, attn: AttentionFn, rope=None) -> torch.Tensor:
        q, k, v = self.qkv(x, i, positions, rope)
        out = attn(i, q, k, v, positions)                    # (B, T, Hq, D)
        return self.layers[i].o(out.flatten(-2))             # (B, T, H)

    def ffn(self, x: torch.Tensor, i: int) -> torch.Tensor:
        layer = self.layers[i]
        h = layer.ffn_norm(x)
        if layer.gate is not None:
            return layer.down(F.silu(layer.gate(h)) * layer.up(h))       # SwiGLU
        return layer.down(F.gelu(layer.up(h), approximate="tanh"))       # GPT-2's "gelu_new"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(x))

    # ----------------------------------------------------------------- the fused path (NEW: the engine, on a GPU)
    @property
    def fused(self) -> bool:
        """forward() runs the fused kernels (use_fused_kernels was called)."""
        return self._fused is not None

    def can_fuse(self) -> bool:
        """The fused kernels cover the Llama family (RMSNorm, RoPE, SwiGLU) with head_dim / 2 a power of two."""
        half = self.head_dim // 2
        return self.arch == "llama" and self.head_dim % 2 == 0 and half & (half - 1) == 0

    def use_fused_kernels(self) -> None:
        """Make forward() run the fused path: q, k, v as one matmul and gate, up as one (their
        weights concatenated once: copies of HF's tensors), and add + RMSNorm, RoPE and
        SiLU * up each as one kernel (kvlab.kernels.fused). Same function, ~12 kernels per layer
        instead of ~40: what makes a small model's decode step fast."""
        if not self.can_fuse():
            raise ValueError(f"the fused kernels cover Llama-family models with head_dim / 2 a power of two; "
                             f"{self.spec.name} is {self.arch} with head_dim {self.head_dim}")
        fused = []
        for layer in self.layers:
            qkv_w = torch.cat([layer.q.weight, layer.k.weight, layer.v.weight])          # ((Hq + 2 Hkv) D, H)
            qkv_b = None if layer.q.bias is None else torch.cat([layer.q.bias, layer.k.bias, layer.v.bias])
            gate_up_w = torch.cat([layer.gate.weight, layer.up.weight])                  # (2 I, H)
            fused.append((qkv_w, qkv_b, gate_up_w))
        self._fused = fused

    def _forward_fused(self, input_ids, positions, attn, logits_indices):
        """forward() with the fused kernels, on a flattened batch (N,): the pieces between the
        attention calls (fused_piece), and attention in between."""
        x, residual = self.fused_piece(0, input_ids, None, positions)
        for i in range(len(self.layers)):
            q, k, v = self.split_qkv(x)
            x, residual = self.fused_piece(i + 1, attn(i, q, k, v, positions), residual, positions)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.lm_head(x)                                                   # (N or num_sampled, vocab)

    def fused_piece(self, j: int, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor):
        """Piece j of the fused forward pass: everything between attention j - 1 and attention j.

            piece 0        embed the token ids x (N,), then layer 0's norm, q k v and RoPE
            piece j        x = attention j - 1's output (N, Hq, D): finish layer j - 1 (o-proj, add +
                           norm, MLP, add + norm), then layer j's q k v and RoPE
            piece L        finish the last layer; its add + norm is the final norm

        Returns (qkv (N, (Hq + 2 Hkv) D), residual), q and k rotated (split_qkv gives the heads);
        piece L returns (the normalized last hidden state (N, H), residual). The residual stream
        is carried beside: each add_rms_norm adds a sub-layer's output to it, in place, and
        normalizes for the next sub-layer. No piece depends on which sequence a token belongs
        to, so a piece can be captured in a CUDA graph for any step with N tokens, mixed
        prefill and decode included (vLLM v1's piecewise CUDA graphs; kvlab.engine.model_runner).
        """
        from kvlab.kernels.fused import add_rms_norm, rope_, silu_mul

        eps = self.final_norm.eps
        if j == 0:
            h, residual = add_rms_norm(self.embed_tokens[x], None, self.layers[0].attn_norm.weight, eps)
        else:
            layer = self.layers[j - 1]
            h, residual = add_rms_norm(layer.o(x.flatten(-2)), residual, layer.ffn_norm.weight, eps)
            mlp = layer.down(silu_mul(F.linear(h, self._fused[j - 1][2])))      # (N, H); [2]: gate and up
            norm = self.layers[j].attn_norm if j < len(self.layers) else self.final_norm
            h, residual = add_rms_norm(mlp, residual, norm.weight, eps)
        if j == len(self.layers):
            return h, residual
        qkv_w, qkv_b, _ = self._fused[j]
        qkv = F.linear(h, qkv_w, qkv_b)                                          # (N, (Hq + 2 Hkv) D)
        q, k, _ = self.split_qkv(qkv)
        rope_(q, k, self._rope_cos, self._rope_sin, positions)                   # in place, in qkv
        return qkv, residual

    def split_qkv(self, qkv: torch.Tensor):
        """(N, (Hq + 2 Hkv) D) -> q (N, Hq, D), k and v (N, Hkv, D): views, no copy."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return (qkv[:, :q_width].view(-1, self.num_heads, self.head_dim),
                qkv[:, q_width:q_width + kv_width].view(-1, self.num_kv_heads, self.head_dim),
                qkv[:, q_width + kv_width:].view(-1, self.num_kv_heads, self.head_dim))

    # ----------------------------------------------------------------- rotary embeddings
    def rope(self, positions: torch.Tensor):
        """(cos, sin) for each position, shaped (*positions.shape, 1, D) to broadcast over heads;
        None for GPT-2. A lookup in a table built once, so a forward pass computes no angles."""
        if self.rope_theta is None:
            return None
        return self._rope_cos[positions][..., None, :], self._rope_sin[positions][..., None, :]

    def _build_rope_table(self, num_positions: int) -> None:
        positions = torch.arange(num_positions, device=self.embed_tokens.device)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, self.embed_tokens.dtype)
        self._rope_cos, self._rope_sin = cos[:, 0], sin[:, 0]          # (num_positions, D)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, hf_model) -> "Transformer":
        """Wrap a transformers LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel."""
        config = hf_model.config
        spec = ModelSpec.from_hf_config(config)
        if config.model_type == "gpt2":
            return cls._from_gpt2(hf_model, spec)
        if config.model_type in ("llama", "mistral", "qwen2"):
            return cls._from_llama(hf_model, spec)
        raise ValueError(f"kvlab.Transformer runs Llama-family (llama, mistral, qwen2) and gpt2 models, "
                         f"not {config.model_type!r}")

    @classmethod
    def _from_llama(cls, hf_model, spec: ModelSpec) -> "Transformer":
        config, m = hf_model.config, hf_model.model
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"only plain RoPE is implemented; this model uses rope_type={rope_type!r}")
        theta = rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)
        eps = config.rms_norm_eps
        lin = lambda mod: Linear(mod.weight, mod.bias)
        layers = [Layer(attn_norm=Norm(l.input_layernorm.weight, None, eps),
                        ffn_norm=Norm(l.post_attention_layernorm.weight, None, eps),
                        q=lin(l.self_attn.q_proj), k=lin(l.self_attn.k_proj), v=lin(l.self_attn.v_proj),
                        o=lin(l.self_attn.o_proj), gate=lin(l.mlp.gate_proj), up=lin(l.mlp.up_proj),
                        down=lin(l.mlp.down_proj))
                  for l in m.layers]
        return cls(spec, m.embed_tokens.weight, layers, Norm(m.norm.weight, None, eps),
                   lin(hf_model.lm_head), rope_theta=float(theta))

    @classmethod
    def _from_gpt2(cls, hf_model, spec: ModelSpec) -> "Transformer":
        # GPT-2's Conv1D stores weight as (in, out): y = x @ W + b. `.T` is a view, not a copy.
        conv = lambda mod: Linear(mod.weight.T, mod.bias)
        t, eps = hf_model.transformer, hf_model.config.layer_norm_epsilon
        layers = [Layer(attn_norm=Norm(b.ln_1.weight, b.ln_1.bias, eps), ffn_norm=Norm(b.ln_2.weight, b.ln_2.bias, eps),
                        qkv=conv(b.attn.c_attn), o=conv(b.attn.c_proj), up=conv(b.mlp.c_fc), down=conv(b.mlp.c_proj))
                  for b in t.h]
        return cls(spec, t.wte.weight, layers, Norm(t.ln_f.weight, t.ln_f.bias, eps),
                   Linear(hf_model.lm_head.weight), embed_positions=t.wpe.weight)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Rotary embedding angles for each position: cos and sin of shape (*positions.shape, 1, D).

    Pair i of a head (dimensions i and i + D/2) rotates by angle position * theta^(-2i/D).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq     # (..., D/2)
    angles = torch.cat([angles, angles], dim=-1)          # (..., D)
    return angles.cos().to(dtype)[..., None, :], angles.sin().to(dtype)[..., None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+D/2}) pair of x (..., heads, D) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin
