"""EngineConfig: every knob of kvlab's engine, each default with its reason.

The names are vLLM's where vLLM has the knob (block_size, max_num_seqs,
max_num_batched_tokens, gpu_memory_utilization, enable_prefix_caching,
enable_chunked_prefill, enforce_eager, max_model_len, ...), so `kvlab.LLM(...)` takes
the keyword arguments a vLLM script passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvlab.engine.sampling_params import _float, _int


@dataclass
class EngineConfig:
    model: object = "smollm2-135m"            # a kvlab.load_model name, hub id, local dir, or a LoadedModel
    block_size: int = 16                       # vLLM's default: <= 15 wasted slots per sequence, short tables
    num_kv_blocks: int | None = None           # None: size the pool from memory (below)
    gpu_memory_utilization: float = 0.9        # GPU: share of the card the engine may fill (weights + peak + KV)
    kv_cache_memory_bytes: int | None = None   # pool size in bytes; CPU default: min(1 GiB, all rows at max length)
    max_num_seqs: int = 256                    # sequences running at once (rows of a decode batch)
    max_num_batched_tokens: int = 2048         # tokens per step: bounds a step's activations and latency
    max_model_len: int | None = None           # None: the model's maximum (capped by the pool)
    enable_prefix_caching: bool = True         # reuse computed blocks of earlier prompts (vLLM v1's default)
    enable_chunked_prefill: bool = True        # split long prompts across steps beside the decodes
    watermark: float = 0.01                    # share of blocks admission keeps free (vLLM's block manager)
    device: str | None = None                  # None: CUDA if available, else CPU
    dtype: str | None = None                   # None: bfloat16 on CUDA, float32 on CPU
    attention_backend: str = "auto"            # "triton" (paged decode and prefill kernels) or "torch"
                                               # (gather + SDPA); auto: triton on CUDA, torch on CPU (faster
                                               # there: measured)
    enforce_eager: bool = False                # True: no CUDA graphs
    fused_kernels: bool | None = None          # fused add+RMSNorm, RoPE, SiLU*up, merged QKV / gate-up
                                               # matmuls; None: on CUDA (Llama family), off on the CPU
    cuda_graph_batch_sizes: list[int] | None = None   # None: 1, 2, 4, 8, then every 8 up to max_num_seqs
    seed: int = 0                              # unseeded sampling draws from torch's generator seeded with this
    block_order_seed: int | None = None        # scatter the free-block queue (nothing may depend on adjacency)
    skip_tokenizer_init: bool = False          # token-id prompts only (no text in or out)
    extra: dict = field(default_factory=dict)  # vLLM keywords kvlab accepts and ignores (e.g. trust_remote_code)

    def __post_init__(self):
        self.block_size = _int("block_size", self.block_size, low=1)
        if self.num_kv_blocks is not None:
            self.num_kv_blocks = _int("num_kv_blocks", self.num_kv_blocks, low=1,
                                      allowed="None or an integer >= 1")
        self.gpu_memory_utilization = _float("gpu_memory_utilization", self.gpu_memory_utilization, low=0.0,
                                             low_open=True, high=1.0, allowed="a fraction in (0, 1]")
        if self.kv_cache_memory_bytes is not None:
            self.kv_cache_memory_bytes = _int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, low=1,
                                              allowed="None or a positive number of bytes")
        self.max_num_seqs = _int("max_num_seqs", self.max_num_seqs, low=1)
        self.max_num_batched_tokens = _int("max_num_batched_tokens", self.max_num_batched_tokens, low=1)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence must fit its decode token in a step")
        if self.max_model_len is not None:
            self.max_model_len = _int("max_model_len", self.max_model_len, low=2,
                                      allowed="None or an integer >= 2 (a prompt token and a generated one)")
        self.watermark = _float("watermark", self.watermark, low=0.0, high=0.5, allowed="a fraction in [0, 0.5]")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"attention_backend must be 'auto', 'triton' or 'torch', got {self.attention_backend!r}")
        if self.cuda_graph_batch_sizes is not None:
            sizes = [_int("cuda_graph_batch_sizes", b, low=1) for b in self.cuda_graph_batch_sizes]
            self.cuda_graph_batch_sizes = sorted(set(sizes))
        if self.fused_kernels is not None and not isinstance(self.fused_kernels, bool):
            raise TypeError(f"fused_kernels must be None, True or False, got {self.fused_kernels!r}")
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager", "skip_tokenizer_init"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self.seed = _int("seed", self.seed, low=0)
        if self.block_order_seed is not None:
            self.block_order_seed = _int("block_order_seed", self.block_order_seed, low=0)

    def graph_batch_sizes(self) -> list[int]:
        """Decode batch sizes captured as CUDA graphs; a step pads up to the next one."""
        if self.cuda_graph_batch_sizes is not None:
            return [b for b in self.cuda_graph_batch_sizes if b <= self.max_num_seqs]
        sizes = [b for b in (1, 2, 4) if b < self.max_num_seqs] + list(range(8, self.max_num_seqs + 1, 8))
        if sizes[-1] != self.max_num_seqs:
            sizes.append(self.max_num_seqs)
        return sizes

    def piece_token_sizes(self) -> list[int]:
        """Token counts of mixed steps captured as piecewise CUDA graphs (kvlab.engine.model_runner):
        16 ... 256 by powers of two, then every 256 up to max_num_batched_tokens; a step pads up."""
        top = self.max_num_batched_tokens
        sizes = [n for n in (16, 32, 64, 128, 256) if n < top] + list(range(512, top, 256))
        return sizes + [top]
