"""EngineArgs: every knob of kvlab's engine, written once: its default, its reason, its help.

The names are vLLM's where vLLM has the knob (block_size, max_num_seqs,
max_num_batched_tokens, gpu_memory_utilization, enable_prefix_caching,
enable_chunked_prefill, enforce_eager, max_model_len, async_scheduling, ...), and, as
vLLM's `EngineArgs`, this one list makes everything else:

    kvlab.LLM(model, **kwargs)          its keyword arguments are these fields
    LLMEngine(EngineArgs(...))          the engine reads them
    kvlab generate / serve / bench serve   EngineArgs.add_cli_args(parser): one flag per field
                                        (--max-num-seqs, --no-enable-prefix-caching, ...),
                                        EngineArgs.from_cli_args(args) back again

A flag left out keeps the default below; an error about a field reads the same in Python
("max_num_seqs must be ...") and on the command line ("--max-num-seqs must be ...").
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field

from kvlab import checks


def arg(default, help: str, cli: bool = True):
    """A field with its help text (cli=False: not a command-line flag)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "cli": cli})
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass
class EngineArgs:
    model: object = arg("smollm2-135m", "a kvlab.load_model name, Hugging Face hub id or local dir (or, in "
                                        "Python, a LoadedModel)")
    block_size: int = arg(16, "tokens per KV block; vLLM's default: <= 15 wasted slots per sequence, short tables")
    num_kv_blocks: int | None = arg(None, "KV blocks in the pool; None: sized from memory")
    gpu_memory_utilization: float = arg(0.9, "GPU: share of the card the engine may fill (weights, activation "
                                             "peak and KV pool)")
    kv_cache_memory_bytes: int | None = arg(None, "KV pool size in bytes; None: on a GPU what "
                                                  "gpu_memory_utilization leaves, on the CPU every running "
                                                  "sequence at full length, at most 1 GiB")
    max_num_seqs: int = arg(256, "sequences running at once (rows of a decode batch)")
    max_num_batched_tokens: int = arg(2048, "tokens per step: bounds a step's activations and its latency")
    max_model_len: int | None = arg(None, "longest prompt + output; None: the model's maximum (lowered, with "
                                          "a warning, to what the KV pool can hold)")
    enable_prefix_caching: bool = arg(True, "reuse computed blocks of earlier prompts (vLLM v1's default)")
    enable_chunked_prefill: bool = arg(True, "split long prompts across steps beside the decodes")
    async_scheduling: bool | None = arg(None, "schedule and prepare step N + 1 while step N runs on the GPU "
                                              "(vLLM's --async-scheduling); None: on with CUDA, off on the CPU "
                                              "(nothing to overlap there; it works, and the tests run it)")
    watermark: float = arg(0.01, "share of blocks admission keeps free while anything runs (vLLM's block "
                                 "manager): a newcomer is not preempted at once")
    device: str | None = arg(None, "cpu or cuda; None: cuda if available, else cpu")
    dtype: str | None = arg(None, "float32, bfloat16 or float16; None: bfloat16 on CUDA, float32 on the CPU")
    attention_backend: str = arg("auto", "triton (paged decode and prefill kernels) or torch (gather + SDPA); "
                                         "auto: triton on CUDA, torch on the CPU (faster there: measured)")
    enforce_eager: bool = arg(False, "no CUDA graphs")
    fused_kernels: bool | None = arg(None, "fused add+RMSNorm, RoPE, SiLU*up, merged QKV and gate-up "
                                           "matmuls; None: on with CUDA (Llama family), off on the CPU")
    cuda_graph_batch_sizes: list[int] | None = arg(None, "decode batch sizes captured as CUDA graphs; None: "
                                                         "1, 2, 4, 8, then every 8 up to max_num_seqs")
    seed: int = arg(0, "seed of the generator that unseeded sampling draws from")
    block_order_seed: int | None = arg(None, "scatter the free-block queue with this seed (tests: nothing "
                                             "may depend on adjacent blocks)", cli=False)
    skip_tokenizer_init: bool | None = arg(None, "token ids in and out, no text; None: only when the model has "
                                                 "no tokenizer")
    stream_interval: int = arg(1, "streamed (DELTA) outputs: a request's first tokens at once, then an output only "
                                  "once this many new tokens wait, or at its end (vLLM's --stream-interval); "
                                  "larger: less work per token for the engine and the server, burstier text")
    extra: dict = arg({}, "vLLM keywords kvlab accepts and ignores (trust_remote_code, ...)", cli=False)

    def __post_init__(self):
        big = checks.INT64_MAX
        self.block_size = _int("block_size", self.block_size, 1, MAX_BLOCK_SIZE)
        if self.num_kv_blocks is not None:
            self.num_kv_blocks = _int("num_kv_blocks", self.num_kv_blocks, 1, big, "None or an integer >= 1")
        self.gpu_memory_utilization = checks.in_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.0,
                                                      1.0, "a fraction in (0, 1]", low_open=True)
        if self.kv_cache_memory_bytes is not None:
            self.kv_cache_memory_bytes = _int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1, big,
                                              "None or a positive number of bytes")
        self.max_num_seqs = _int("max_num_seqs", self.max_num_seqs, 1, MAX_NUM_SEQS)
        self.max_num_batched_tokens = _int("max_num_batched_tokens", self.max_num_batched_tokens, 1,
                                           MAX_BATCHED_TOKENS)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence must fit its decode token in a step")
        if self.max_model_len is not None:
            self.max_model_len = _int("max_model_len", self.max_model_len, 2, big,
                                      "None or an integer >= 2 (a prompt token and a generated one)")
        self.stream_interval = _int("stream_interval", self.stream_interval, 1, MAX_STREAM_INTERVAL)
        self.watermark = checks.in_range("watermark", self.watermark, 0.0, 0.5, "a fraction in [0, 0.5]")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"attention_backend must be 'auto', 'triton' or 'torch', got "
                             f"{checks.brief(self.attention_backend)}")
        if self.cuda_graph_batch_sizes is not None:
            if isinstance(self.cuda_graph_batch_sizes, (str, bytes)) or not hasattr(self.cuda_graph_batch_sizes,
                                                                                    "__iter__"):
                raise TypeError(f"cuda_graph_batch_sizes must be None or a list of batch sizes, got "
                                f"{checks.shown(self.cuda_graph_batch_sizes)}")
            sizes = [_int("cuda_graph_batch_sizes", b, 1, MAX_NUM_SEQS) for b in self.cuda_graph_batch_sizes]
            if not sizes:
                raise ValueError("cuda_graph_batch_sizes must be None or a non-empty list of batch sizes, got []")
            self.cuda_graph_batch_sizes = sorted(set(sizes))
        for name in ("fused_kernels", "async_scheduling", "skip_tokenizer_init"):
            if getattr(self, name) is not None:
                setattr(self, name, checks.boolean(name, getattr(self, name)))
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager"):
            setattr(self, name, checks.boolean(name, getattr(self, name)))
        self.seed = _int("seed", self.seed, 0, 2**64 - 1, "an integer in 0..2**64 - 1 (a 64-bit seed)")
        if self.block_order_seed is not None:
            self.block_order_seed = _int("block_order_seed", self.block_order_seed, 0, 2**64 - 1,
                                         "None or an integer in 0..2**64 - 1")
        for name in ("device", "dtype"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be None or a string, got {checks.shown(value)}")
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {checks.shown(self.extra)}")

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

    # ------------------------------------------------------------------ the command line
    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, title: str = "engine (kvlab.EngineArgs; vLLM's flag "
                                                                          "names)") -> None:
        """One flag per field, default None (a flag left out keeps the field's default); --model has
        its default, so that args.model always names the model."""
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in cls.cli_fields():
            shown = f.default if f.default is not dataclasses.MISSING else None
            help_ = f"{f.metadata['help']} (default: {shown})"
            kind = _base_type(hints[f.name])
            if kind is bool:
                group.add_argument(cls.flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=None, help=help_)
            elif kind is list:
                group.add_argument(cls.flag(f.name), dest=f.name, type=int, nargs="+", default=None, help=help_)
            else:
                group.add_argument(cls.flag(f.name), dest=f.name, type=kind if kind in (int, float) else str,
                                   default=shown if f.name == "model" else None, help=help_)

    @classmethod
    def cli_kwargs(cls, args: argparse.Namespace) -> dict:
        """The fields whose flags were given."""
        return {f.name: getattr(args, f.name) for f in cls.cli_fields() if getattr(args, f.name, None) is not None}

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides) -> "EngineArgs":
        return cls(**{**cls.cli_kwargs(args), **overrides})

    @classmethod
    def to_argv(cls, args: argparse.Namespace) -> list[str]:
        """The flags that were given, as a command line again (for a server in a child process)."""
        argv = []
        for name, value in cls.cli_kwargs(args).items():
            if isinstance(value, bool):
                argv.append(cls.flag(name) if value else "--no-" + cls.flag(name)[2:])
            elif isinstance(value, list):
                argv += [cls.flag(name), *map(str, value)]
            else:
                argv += [cls.flag(name), str(value)]
        return argv

    @classmethod
    def flag_message(cls, message: str) -> str:
        """An error message about a field, with the field named as its flag ("--max-num-seqs must be ...")."""
        for f in cls.cli_fields():
            if message.startswith(f.name + " ") or message.startswith(f.name + "="):
                return cls.flag(f.name) + message[len(f.name):]
        return message


MAX_BLOCK_SIZE = 2048          # tokens per block: a block larger than a whole context wastes the pool
MAX_NUM_SEQS = 65_536          # rows of the runner's persistent batch (vLLM's default is 256 to 1024)
MAX_BATCHED_TOKENS = 2**20     # tokens of one step's flattened batch
MAX_STREAM_INTERVAL = 2**20    # tokens per streamed output (more than any output: only the first and the end)


def _int(name: str, value, low: int, high: int, allowed: str | None = None) -> int:
    return checks.integer(name, value, minimum=low, maximum=high, allowed=allowed or f"an integer in {low}..{high:,}")


def _base_type(hint):
    """int for `int | None`, list for `list[int] | None`, ..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] \
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else [hint]
    base = args[0] if args else hint
    return typing.get_origin(base) or base

