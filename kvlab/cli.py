"""The `kvlab` command. One subcommand per concept; each is a function `cmd_<name>(args) -> int`.

    kvlab memory --model llama-3-8b --gpu H100-80GB --context 8192 --kv-dtype fp8 --tp 2
    kvlab memory --model llama-3-8b --json          # the plan as JSON, for scripts
    kvlab memory --list                              # model and GPU presets
    kvlab generate "The capital of France is" --max-tokens 32      # streamed to the terminal
    kvlab generate --file prompts.txt --temperature 0.8 --top-p 0.95
    kvlab serve --model smollm2-135m --port 8000     # OpenAI-compatible server
    kvlab bench engine --workload B                  # the race against Hugging Face

Bad arguments print a usage error and exit with status 2 (argparse's convention).
To add a subcommand: write `add_<name>_parser(subparsers)` and `cmd_<name>(args)`, and
list it in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys

from kvlab import checks, memory
from kvlab.model.presets import PRESETS, list_presets
from kvlab.model.spec import ModelSpec


# ---- kvlab memory ------------------------------------------------------------------------------

def add_memory_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "memory", help="KV-cache memory plan: how many requests fit on a GPU",
        description="Plan one GPU's memory for serving a model: weights, KV budget, max concurrent requests.")
    p.add_argument("--model", default="llama-3-8b", help="model preset (see --list); default llama-3-8b")
    p.add_argument("--gpu", default="H100-80GB",
                   help="GPU preset (see --list) or memory in bytes, or with a unit: 24GiB, 16GB; default H100-80GB")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per request (prompt + output); default 4096 or the model's maximum if smaller")
    p.add_argument("--kv-dtype", default="bfloat16", help=f"KV cache dtype: {', '.join(memory.KV_DTYPE_BITS)}")
    p.add_argument("--weight-dtype", default="bfloat16", help=f"weight dtype: {', '.join(memory.KV_DTYPE_BITS)}")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs; default 1")
    p.add_argument("--utilization", type=float, default=0.9,
                   help="fraction of GPU memory the engine may use (vLLM's gpu_memory_utilization); default 0.9")
    p.add_argument("--reserve-gib", type=float, default=memory.DEFAULT_RESERVE_BYTES / memory.GiB,
                   help="reserve per GPU for activations and workspace, GiB; default 1")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--list", action="store_true", help="list model and GPU presets and exit")
    # argparse reads a value that starts with "-" as an option unless it looks like a plain negative
    # number (-5, -0.5): "--gpu -5GiB" or "--reserve-gib -1e3" failed as "expected one argument".
    # This command has no option like -1, so any "-<number...>" is a value, and its check says what is wrong.
    p._negative_number_matcher = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)
    return p


def _parse_gpu(text: str, parser: argparse.ArgumentParser):
    if text in memory.GPUS:
        return text
    units = {"gib": memory.GiB, "gb": 10**9, "mib": memory.MiB, "b": 1}
    lowered = text.strip().lower()
    for suffix, scale in units.items():
        if lowered.endswith(suffix):
            number = lowered[: -len(suffix)]
            break
    else:
        number, scale = lowered, 1
    try:
        value = float(number) * scale
    except ValueError:
        parser.error(f"--gpu {text!r}: not a GPU preset ({', '.join(memory.GPUS)}) nor a size like 24GiB")
    if not (math.isfinite(value) and value >= 1):   # nan and inf parse as floats too
        parser.error(f"--gpu {text!r}: memory must be positive and finite (at least 1 byte)")
    with usage_errors(parser):
        return memory.gpu_bytes(int(value), arg="--gpu")[1]


def format_list() -> str:
    lines = ["Model presets (KV bytes per token at fp16):"]
    for name in list_presets():
        s = PRESETS[name]
        kind = s.attention.upper() + (f", window {s.sliding_window}" if s.sliding_window else "")
        lines.append(f"  {name:<18} {memory.kv_bytes_per_token(s, 'float16'):>9,} B  {kind:<18} "
                     f"{s.num_params / 1e9:>7.2f}B params  max context {s.max_position_embeddings:,}")
    lines.append("GPU presets:")
    for name, size in memory.list_gpus().items():
        lines.append(f"  {name:<18} {memory.human_bytes(size)}")
    return "\n".join(lines)


def format_plan(plan: memory.MemoryPlan, spec: ModelSpec) -> str:
    hb = memory.human_bytes
    tp = plan.tensor_parallel
    where = f"{tp} x {plan.gpu} (tensor parallel {tp}); numbers per GPU" if tp > 1 else plan.gpu
    heads = ("compressed latent, not split by head" if spec.attention == "mla"
             else f"{plan.kv_heads_per_gpu} of {spec.num_kv_heads} KV heads per GPU"
             + (", replicated" if plan.kv_heads_replicated else ""))
    rows = [
        ("GPU memory", hb(plan.gpu_bytes)),
        (f"usable (utilization {plan.gpu_memory_utilization:.2f})", hb(plan.usable_bytes)),
        (f"weights ({plan.weight_dtype}{f', 1/{tp} each' if tp > 1 else ''})", hb(plan.weight_bytes)),
        ("reserve (activations, workspace)", hb(plan.reserve_bytes)),
        ("KV budget", hb(plan.kv_budget_bytes)),
        (f"KV per token ({plan.kv_dtype})", f"{hb(plan.kv_bytes_per_token)}  [{plan.kv_bytes_per_token:,} B; {heads}]"),
        (f"KV per request ({plan.context_len:,} tokens)", hb(plan.kv_bytes_per_request)),
        ("max cached tokens", f"{plan.max_cached_tokens:,}"),
        ("max concurrent requests", f"{plan.max_concurrent_requests:,}"),
        ("fits", "yes" if plan.fits else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"kvlab memory plan: {spec.name} ({spec.attention.upper()}) on {where}"]
    out += [f"  {k:<{width}}  {v}" for k, v in rows]
    out += [f"  note: {n}" for n in plan.notes]
    return "\n".join(out)


def cmd_memory(args, parser: argparse.ArgumentParser) -> int:
    if args.list:
        print(format_list())
        return 0
    if args.model not in PRESETS:
        parser.error(f"--model {args.model!r} is not a preset; choose one of: {', '.join(list_presets())}")
    spec = ModelSpec.preset(args.model)
    gpu = _parse_gpu(args.gpu, parser)
    if args.context is None:
        args.context = min(4096, spec.max_position_embeddings or 4096)
    with usage_errors(parser):   # each flag checked under its own name, before the plan is computed
        memory.dtype_bits(args.kv_dtype, arg="--kv-dtype")
        memory.dtype_bits(args.weight_dtype, arg="--weight-dtype")
        memory.kv_heads_per_gpu(spec, args.tp, arg="--tp")
        memory.cached_tokens(spec, args.context, arg="--context")
        checks.in_range("--utilization", args.utilization, 0, 1, "a fraction in (0, 1]", low_open=True)
        reserve_gib = checks.in_range("--reserve-gib", args.reserve_gib, 0, checks.INT64_MAX / memory.GiB,
                                      "a finite number of GiB >= 0 (below 2**33)")
        plan = memory.memory_plan(spec, gpu=gpu, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype,
                                  context_len=args.context, gpu_memory_utilization=args.utilization,
                                  tensor_parallel=args.tp, reserve_bytes=int(reserve_gib * memory.GiB))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan, spec))
    return 0


# ---- kvlab generate ----------------------------------------------------------------------------

def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    from kvlab.serve.cli import add_engine_arguments

    p = subparsers.add_parser(
        "generate", help="generate text with kvlab's engine (offline, like vLLM's LLM.generate)",
        description="Generate from one prompt (streamed to the terminal as it is produced) or many "
                    "(batched together by the engine; each printed when it finishes).")
    p.add_argument("prompt", nargs="*", help="prompt text (several: one request each)")
    p.add_argument("--file", help="a file of prompts: one per line, or JSON lines with a 'prompt' field")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the model's chat template")
    g = p.add_argument_group("sampling (SamplingParams)")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = all (default 0)")
    g.add_argument("--sampling-seed", dest="sample_seed", type=int, default=None,
                   help="per-request random seed (SamplingParams.seed; --seed seeds the engine)")
    g.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--no-stream", action="store_true", help="print each result when it is complete")
    p.add_argument("--json", action="store_true", help="print the results as JSON lines")
    add_engine_arguments(p)
    return p


def _read_prompts(args, parser: argparse.ArgumentParser) -> list[str]:
    prompts = list(args.prompt)
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except OSError as err:
            parser.error(f"--file {args.file!r}: {err.strerror}")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    parser.error(f"--file {args.file!r}, line {i}: a JSON line needs a string 'prompt' field")
            else:
                prompts.append(line)
    if not prompts:
        parser.error("give a prompt (or --file with prompts)")
    if any(not isinstance(p, str) or not p for p in prompts):
        parser.error("prompts must be non-empty text")
    return prompts


def cmd_generate(args, parser: argparse.ArgumentParser) -> int:
    import time

    from kvlab.engine import LLM, EngineArgs, SamplingParams
    from kvlab.serve.cli import apply_torch_threads, check_engine_flags, engine_kwargs

    prompts = _read_prompts(args, parser)
    try:
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.sample_seed, max_tokens=args.max_tokens, stop=args.stop,
                                ignore_eos=args.ignore_eos)
    except (ValueError, TypeError) as err:            # name the flag, not the SamplingParams field
        _flag_error(parser, err, {"max_tokens": "--max-tokens", "top_p": "--top-p", "top_k": "--top-k",
                                  "seed": "--sampling-seed", "temperature": "--temperature", "stop": "--stop",
                                  "n": "--n"})
    check_engine_flags(args, parser)                  # every flag checked before the model loads
    apply_torch_threads(args)
    try:
        llm = LLM(**engine_kwargs(args))
    except (ValueError, TypeError) as err:            # what needs the model (memory, max_model_len)
        parser.error(EngineArgs.flag_message(str(err)))
    if args.chat:
        tok = llm.get_tokenizer()
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    start = time.perf_counter()
    generated = 0
    with usage_errors(parser):
        if len(prompts) == 1 and args.n == 1 and not args.no_stream and not args.json:
            for out in llm.stream(prompts, params):             # one prompt: text as it is produced
                print(out.outputs[0].text, end="", flush=True)
                generated += len(out.outputs[0].token_ids)
            print()
        else:
            for i, out in enumerate(llm.generate(prompts, params, use_tqdm=not args.json)):
                for o in out.outputs:
                    generated += len(o.token_ids)
                    if args.json:
                        print(json.dumps({"index": i, "sample": o.index, "prompt": out.prompt, "text": o.text,
                                          "finish_reason": o.finish_reason, "num_tokens": len(o.token_ids)}))
                    else:
                        tag = f"[{i}]" + (f"[{o.index}]" if args.n > 1 else "")
                        print(f"{tag} {out.prompt!r}\n{o.text}\n")
    seconds = time.perf_counter() - start
    print(f"{len(prompts)} prompt(s), {generated} tokens in {seconds:.2f} s ({generated / seconds:.1f} tok/s)",
          file=sys.stderr)
    return 0


# ---- kvlab serve and kvlab bench ---------------------------------------------------------------

def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from kvlab.serve.cli import add_serve_parser as add

    return add(subparsers)


def cmd_serve(args, parser: argparse.ArgumentParser) -> int:
    from kvlab.serve.cli import cmd_serve as run

    return run(args, parser)


BENCHMARKS = {
    "engine": "kvlab vs Hugging Face on the same requests (tokens/s, TTFT, TPOT)",
    "serve": "load test of an OpenAI-compatible server: latency against request rate",
    "kernels": "the Triton paged-attention kernel against its baselines (CUDA GPU)",
    "paged": "allocator ops/s; the engine's decode step against the contiguous cache",
    "fragmentation": "the allocation simulator on 100k requests per policy",
}


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks (each prints measured ratios against a baseline)",
                              description="Run one of kvlab's benchmarks; arguments after its name go to it "
                                          "(`kvlab bench engine --help`).")
    p.add_argument("benchmark", choices=sorted(BENCHMARKS), metavar="BENCHMARK",
                   help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    return p


def cmd_bench(args, parser: argparse.ArgumentParser) -> int:
    import importlib

    module = importlib.import_module(f"kvlab.bench.{args.benchmark}")
    return module.main(args.args) or 0


# ---- shared helpers ----------------------------------------------------------------------------

def _flag_error(parser: argparse.ArgumentParser, err: Exception, flags: dict[str, str]):
    """A usage error whose message names the command-line flag instead of the Python field
    ("max_tokens must be ..." -> "--max-tokens must be ...")."""
    message = str(err)
    for field, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
        if message.startswith(field + " "):
            message = flag + message[len(field):]
            break
    parser.error(message)


@contextlib.contextmanager
def usage_errors(parser: argparse.ArgumentParser):
    """Turn a ValueError or TypeError raised inside into a usage error (message, exit 2). The
    checks inside name the flag (kvlab's checks take the name to use, e.g. arg="--context")."""
    try:
        yield
    except (ValueError, TypeError) as err:
        parser.error(str(err))


# ---- the command -------------------------------------------------------------------------------

SUBCOMMANDS = {"memory": (add_memory_parser, cmd_memory), "generate": (add_generate_parser, cmd_generate),
               "serve": (add_serve_parser, cmd_serve), "bench": (add_bench_parser, cmd_bench)}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="kvlab", description="kvlab: how LLM inference engines work.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    return parser, {name: add(subparsers) for name, (add, _) in SUBCOMMANDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser, subparsers = build_parser()
    try:
        args = parser.parse_args(argv)
        _, run = SUBCOMMANDS[args.command]
        return run(args, subparsers[args.command])
    except SystemExit as exit_:   # argparse exits 2 on usage errors, 0 after --help
        return exit_.code if isinstance(exit_.code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
