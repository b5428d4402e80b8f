"""How much memory a forward pass needs on top of the weights and the KV cache: the activations.

A prefill of T tokens creates tensors as it goes (the residual stream, normed copies, q/k/v,
attention's output, the FFN's up-projected intermediates, the logits) and frees most of them
as soon as the next layer has used them. What an engine must leave free is the *peak* of the
bytes alive at once, not their sum.

An engine sizes this before it sizes the KV cache. vLLM does not assume a figure: at start-up
it runs one dummy forward pass at its largest step (`max_num_batched_tokens` tokens, plus a
dummy sampling pass at `max_num_seqs`), reads the peak that torch's CUDA allocator recorded
(`torch.cuda.memory_stats()["allocated_bytes.all.peak"]`), adds memory allocated outside
torch (NCCL, CUDA graphs), and gives the KV cache what is left of
`gpu_memory_utilization × total memory`. `kvlab.memory_plan` states a round reserve instead
(1 GiB), so that a plan can be computed without a GPU; this module measures the real peak.

Measuring on the CPU: torch keeps no peak statistic for CPU memory, but its profiler with
`profile_memory=True` records every allocation and free made through torch's allocator (the
tensors a kernel returns and its temporary buffers alike). Summing them in time order gives
the bytes alive at each moment; the largest sum is the peak. On a CUDA device the allocator's
own peak statistic is read, as vLLM does.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvlab.model.attention import causal_attention


@dataclass(frozen=True)
class PeakMemory:
    """Bytes allocated by torch during a call, beyond what was allocated before it."""
    peak_bytes: int                  # the most bytes alive at once
    live_at_peak: tuple[int, ...]    # sizes of the buffers alive at that moment, largest first (CPU only)
    allocations: int                 # how many buffers were allocated in all (CPU only)


@contextlib.contextmanager
def _quiet_stderr():
    """kineto, the profiler's C++ backend, writes a timestamped 'profiler_start' / 'profiler_stop' line
    to the process's stderr on every run: point file descriptor 2 at /dev/null while it runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _allocation_events(prof) -> list[tuple[int, int, int]]:
    """(time_ns, ptr, bytes) of every CPU allocation (bytes > 0) and free (bytes < 0), in time order.
    Read from the profiler's event tree, as torch's own memory profiler reads it."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
    return sorted(events)


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> PeakMemory:
    """Run `fn()` once and return the peak of the bytes it had allocated at any moment.

    Tensors that existed before the call (weights, caches) are not counted; freeing one of
    them during the call counts as negative bytes. On the CPU this reads torch's profiler
    (every allocation and free); on CUDA, the allocator's peak statistic.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return PeakMemory(peak_bytes=torch.cuda.max_memory_allocated(device) - before, live_at_peak=(), allocations=0)
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures 'cpu' or 'cuda' devices, got {device.type!r}")

    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live: dict[int, int] = {}                    # ptr -> bytes, for buffers allocated inside fn
    current = peak = 0
    snapshot: tuple[int, ...] = ()
    allocations = 0
    for _, ptr, nbytes in _allocation_events(prof):
        current += nbytes
        if nbytes > 0:
            live[ptr] = nbytes
            allocations += 1
        else:
            live.pop(ptr, None)                  # (absent: a tensor from before the call was freed)
        if current > peak:
            peak, snapshot = current, tuple(sorted(live.values(), reverse=True))
    return PeakMemory(peak_bytes=peak, live_at_peak=snapshot, allocations=allocations)


def prefill(model, input_ids: torch.Tensor, logits: str = "last") -> torch.Tensor:
    """The prefill forward pass without a cache: all layers over the prompt, then the LM head on
    the last token of each sequence (logits="last", what an engine samples from) or on every
    token (logits="all", what `model(input_ids)` returns). Returns the logits."""
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    with torch.inference_mode():
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = model.embed(input_ids, positions)                        # (B, T, H)
        for i in range(len(model.layers)):
            x = model.block(x, i, positions, causal_attention)       # (B, T, H)
        return model.logits(x if logits == "all" else x[:, -1:])    # (B, T or 1, vocab)


def prefill_activation_peak(model, seq_len: int, batch_size: int = 1, logits: str = "last",
                            seed: int = 0) -> PeakMemory:
    """Peak activation bytes of one prefill of `batch_size` random prompts of `seq_len` tokens
    through kvlab's `Transformer` (weights and any KV cache excluded: they exist before the pass).

    On the CPU it runs on one thread: some CPU kernels (attention among them) allocate scratch
    space per thread, and the peak should not depend on how many cores the machine has.
    """
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"need seq_len > 0 and batch_size > 0, got {seq_len} and {batch_size}")
    device = model.embed_tokens.device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.spec.vocab_size, (batch_size, seq_len), generator=g).to(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        prefill(model, ids[:, :1], logits)                           # warm-up: one-off buffers stay out of the peak
        return peak_memory(lambda: prefill(model, ids, logits), device=device)
    finally:
        torch.set_num_threads(threads)


def swiglu_prefill_peak_bytes(spec, tokens: int, dtype_bytes: int = 2) -> int:
    """What the peak of a Llama-family prefill should be, from the shapes alone, when the LM head
    runs on the last token only: inside the FFN three (tokens, I) tensors are alive at once
    (silu(gate), up and their product) beside three (tokens, H) ones (the block's input, its
    output so far and the normed copy). `prefill_activation_peak` measures it."""
    if spec.architecture not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"{spec.name}: this count is for SwiGLU FFNs (llama, mistral, qwen2), "
                         f"not {spec.architecture!r}")
    return tokens * (3 * spec.intermediate_size + 3 * spec.hidden_size) * dtype_bytes
