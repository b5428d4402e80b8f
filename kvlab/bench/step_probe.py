"""Where a decode step's time goes: the engine's step period against its GPU time, and the host's share.

    python -m kvlab.bench.step_probe --batches 64 256 --context 500 --modes sync async eager
    cp kvlab/bench/step_probe.py /tmp && PYTHONPATH=/path/to/an/older/checkout python /tmp/step_probe.py \
        --modes sync eager                                # the same probe, another engine

`batch` sequences of `context` prompt tokens are prefilled, then decode together; the probe reads
the engine's own StepStats of the decode-only steps of a second, warm run:

    period     time from one step's start to the next's: what a step costs the batch (with
               asynchronous scheduling the host's work of a step overlaps the GPU's, so this is
               less than their sum)
    device     GPU time of a step (CUDA events), None on the CPU
    schedule, prepare, output     the host's work per step; launch, wait (newer engines)

A step's period over its device time says how much the host makes the GPU wait: 1.0 means the
GPU never idles. The probe uses only kvlab's public API (LLM, SamplingParams, load_model and the
StepStats fields every version has), so that run from a file against an older checkout it
measures that engine the same way, on the same card, in the same session: the "before".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

MODES = {"sync": dict(async_scheduling=False), "async": dict(async_scheduling=True),
         "eager": dict(enforce_eager=True, async_scheduling=False)}


def decode_steps(lm, batch: int, context: int, tokens: int = 24, **llm_kwargs) -> dict:
    """Median per-step times (ms) of the decode-only steps of a warm run (see the module docstring)."""
    import kvlab

    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, lm.spec.vocab_size, context).tolist() for _ in range(batch)]
    kwargs = dict(model=lm, max_num_seqs=batch, max_num_batched_tokens=max(batch * context, 2048),
                  max_model_len=1 << (context + tokens).bit_length(), enable_prefix_caching=False,
                  skip_tokenizer_init=True, **llm_kwargs)
    try:
        llm = kvlab.LLM(**kwargs)
    except TypeError as err:                             # an engine from before asynchronous scheduling
        if "async_scheduling" not in str(err) or kwargs.pop("async_scheduling"):
            raise
        llm = kvlab.LLM(**kwargs)
    params = kvlab.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)                       # warm-up: compiles, caches
    first = len(llm.engine.stats)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    steps = [s for s in list(llm.engine.stats)[first:] if s.num_decode_seqs == batch and not s.num_prefill_seqs]
    steps = steps[2:-2]                                  # the first decodes and the drain are not steady
    median_ms = lambda xs: None if not xs or None in xs else 1e3 * statistics.median(xs)
    out = dict(batch=batch, context=context, decode_steps=len(steps), run_s=wall,
               period_ms=median_ms([b.time - a.time for a, b in zip(steps, steps[1:]) if b.step == a.step + 1]),
               device_ms=median_ms([s.device_time for s in steps]))
    for name in ("schedule", "prepare", "launch", "wait", "forward", "output"):
        values = [getattr(s, name + "_time", None) for s in steps]
        out[name + "_ms"] = median_ms(values)
    out["host_ms"] = sum(out[k] or 0.0 for k in ("schedule_ms", "prepare_ms", "output_ms"))
    out["lanes"] = lanes(steps[len(steps) // 2:len(steps) // 2 + LANE_STEPS])
    if out["period_ms"] and out["device_ms"]:
        out["period_over_device"] = out["period_ms"] / out["device_ms"]
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


LANE_STEPS = 5


def lanes(steps) -> list[dict]:
    """The phases of a few consecutive steps, each (start, end) in ms from the first step's start: what
    kvlab.ui.steps draws as a host lane and a GPU lane. Empty for engines that keep no spans."""
    if not steps or not getattr(steps[0], "spans", None):
        return []
    t0 = steps[0].spans["schedule"][0]
    return [{"step": s.step, **{phase: [1e3 * (a - t0), 1e3 * (b - t0)] for phase, (a, b) in s.spans.items()}}
            for s in steps]


def probe(lm, batches=(64, 256), context: int = 500, modes=("sync", "async", "eager"), tokens: int = 24) -> dict:
    out = {}
    for batch in batches:
        for mode in modes:
            r = decode_steps(lm, batch, context, tokens, **MODES[mode])
            out[f"batch_{batch}_{mode}"] = r
            print(f"[step probe] batch {batch:4d} {mode:<5}: period {r['period_ms'] or 0:7.2f} ms, device "
                  f"{r['device_ms'] or 0:6.2f} ms, host {r['host_ms']:6.2f} ms (schedule {r['schedule_ms'] or 0:.2f}, "
                  f"prepare {r['prepare_ms'] or 0:.2f}, output {r['output_ms'] or 0:.2f})", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvlab bench step_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--context", type=int, default=500)
    p.add_argument("--tokens", type=int, default=24, help="tokens each sequence generates (default 24)")
    p.add_argument("--modes", nargs="+", default=["sync", "async", "eager"],
                   help="sync, async (asynchronous scheduling), eager (no CUDA graphs); an engine without async "
                        "scheduling takes sync and eager only")
    p.add_argument("--model", default=None, help="default: SmolLM2-135M's shape, random weights, bf16 (GPU); the "
                                                 "real SmolLM2-135M in fp32 (CPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from kvlab.model.loading import load_model

    cuda = torch.cuda.is_available()
    name = args.model or ("smollm2-135m-random" if cuda else "smollm2-135m")
    lm = load_model(name, device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32")
    lm.hf_model.config.eos_token_id = None
    import kvlab

    import datetime
    import os

    result = {"kvlab_file": kvlab.__file__, "commit": os.environ.get("KVLAB_COMMIT"), "model": name,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch_threads": torch.get_num_threads(),
              "steps": probe(lm, args.batches, args.context, args.modes, args.tokens)}
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
