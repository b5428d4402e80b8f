"""The model runner: the KV pool, one forward pass per step, CUDA graphs, asynchronous outputs.

    runner = ModelRunner(model, config, max_model_len)   # sizes and allocates the KV pool
    pending = runner.execute_model(scheduler_output)      # launches the step; returns at once on a GPU
    output = pending.get_output()                         # ModelRunnerOutput: sampled ids per sequence

A step in four stages, each a method below:

    _update_states    apply the SchedulerOutput to the persistent batch (kvlab.engine.input_batch):
                      rows for new sequences, rows freed, block-table entries that moved,
                      copy-on-write copies. The runner never reads the scheduler's Sequences.
    _prepare_inputs   the step's flat arrays on the host (token ids, positions, slot mapping,
                      the rows' lengths, which tokens sample and with what parameters), written
                      into one pinned buffer and copied to the GPU in one asynchronous transfer
    _run_model        a CUDA graph (decode-only steps), piecewise graphs (mixed steps) or eager
    _sample           the sampler on the rows that sample; the ids stay on the GPU, and a
                      non-blocking copy brings them to the host (`PendingOutput.get_output` waits)

Asynchronous scheduling (vLLM v1, PR 19970). Nothing in a step waits for the GPU until
`get_output`, so the engine can schedule and prepare step N + 1 while step N runs, then
collect step N's tokens. Step N + 1 then computes tokens whose ids the host does not know
yet (each running sequence's token sampled by step N): their input ids are copied on the
GPU from step N's sampled ids, never through the host. The host work of a step (scheduling,
inputs, detokenizing outputs) hides under the GPU work of the previous one.

Sizing the pool (vLLM's method, nano-vllm's formula). On a GPU the runner first runs a
dummy step of `max_num_batched_tokens` tokens and reads the peak memory it needed
(activations, logits, sampler buffers); the KV pool gets what is left of
`gpu_memory_utilization` of the card after the weights and that peak:

    kv_bytes = total * utilization - in_use_now - (peak - allocated_now)
    num_blocks = kv_bytes // (2 * layers * block_size * kv_heads * head_dim * dtype_bytes)

On the CPU the pool is `kv_cache_memory_bytes` (default: enough for every running
sequence at full length, at most 1 GiB). `num_kv_blocks` overrides both.

CUDA graphs. A small model's decode step is hundreds of tiny kernels (30 layers x ~12):
launching them costs more host time than the GPU needs to run them. So at start-up the
runner captures the whole forward of a decode-only step at a set of batch sizes into
CUDA graphs, reading their inputs from fixed regions of the step buffer (the Triton kernel
reads block tables gathered inside the graph); a decode step pads its rows up to the next
captured size, with slot -1 (nothing written) and length 0 (nothing read), and replays
the graph: one launch (nano-vllm's capture_cudagraph).

Piecewise CUDA graphs. A step with prefill chunks cannot replay that graph: its rows have
many queries each, and their number and lengths change every step. Under load almost
every step is such a mixed step, so eager launches would set the pace. Only attention cares
where the sequences start; everything else in a layer works on (N, hidden) rows of tokens.
So, as vLLM v1 does, the runner also captures the forward in pieces cut at the attention
calls (Transformer.fused_piece: L + 1 pieces for L layers) for a set of token counts N; a
mixed step pads its N tokens up to the next captured count, replays piece 0, runs
attention eagerly on the real tokens, replays piece 1, and so on:

    [embed, norm, qkv, rope]  attn 0  [o, add+norm, MLP, add+norm, qkv, rope]  attn 1  ...  [..., final norm]
     graph piece 0            eager    graph piece 1                           eager       graph piece L

Padding tokens compute on stale ids and are never read: attention writes only the real
tokens' K/V and outputs, and the LM head reads only the rows that sample.
"""

from __future__ import annotations

import functools
import math
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from kvlab.engine.attention import AttentionMetadata, EngineAttention, GatheredLayout
from kvlab.engine.config import EngineArgs
from kvlab.engine.input_batch import InputBatch
from kvlab.engine.sampler import SamplingBatch, logprobs_of, sample, sample_generator
from kvlab.engine.scheduler import SchedulerOutput
from kvlab.engine.sequence import SeqId
from kvlab.model.attention import causal_attention
from kvlab.paged.kv_cache import PagedKVCache

GiB = 1 << 30
CPU_DEFAULT_KV_BYTES = 1 * GiB


# ---------------------------------------------------------------------------- what a step returns
@dataclass
class StepTiming:
    """Where one step's time went (seconds, time.perf_counter), as the runner saw it."""
    prepare_start: float = 0.0           # the runner got the SchedulerOutput
    launch_start: float = 0.0            # inputs built and copied: the forward pass is being launched
    launch_end: float = 0.0              # forward + sampler launched (on the CPU: computed)
    wait_start: float = 0.0              # get_output() began waiting for the sampled ids
    wait_end: float = 0.0                # the ids are on the host
    device_start: float | None = None    # the GPU began / finished the step (CUDA events, on the host clock)
    device_end: float | None = None
    cuda_graph: bool = False             # the forward replayed one captured graph (a decode-only step)
    piecewise: bool = False              # a mixed step: graph pieces, attention eager in between

    @property
    def prepare_time(self) -> float:
        return self.launch_start - self.prepare_start

    @property
    def launch_time(self) -> float:
        return self.launch_end - self.launch_start

    @property
    def wait_time(self) -> float:
        return self.wait_end - self.wait_start

    @property
    def device_time(self) -> float | None:
        return None if self.device_start is None else self.device_end - self.device_start


@dataclass
class ModelRunnerOutput:
    """One step's result, plain data for Scheduler.update_from_output (vLLM v1's ModelRunnerOutput)."""
    seq_ids: list[SeqId]                                       # the sequences that sampled, in order
    sampled_token_ids: list[int]                               # one per sequence
    logprobs: list[tuple[float, dict[int, float]] | None] | None   # per sequence: (chosen, top-k) if it
                                                                   # asked; None if no sequence asked
    failed: dict[SeqId, str] = field(default_factory=dict)     # new sequences the runner could not take
    timing: StepTiming = field(default_factory=StepTiming)

    @property
    def sampled(self) -> dict[SeqId, int]:
        return dict(zip(self.seq_ids, self.sampled_token_ids))


class PendingOutput:
    """A launched step whose sampled ids are on their way to the host (vLLM's AsyncModelRunnerOutput).
    get_output() waits for them (only for them: the GPU may already run the next step)."""

    def __init__(self, runner: "ModelRunner", seq_ids, tokens, logprobs, asked, failed, timing, events):
        self._runner, self._seq_ids, self._tokens, self._logprobs = runner, seq_ids, tokens, logprobs
        self._asked, self._failed, self._timing, self._events = asked, failed, timing, events
        self._output: ModelRunnerOutput | None = None

    def get_output(self) -> ModelRunnerOutput:
        if self._output is not None:
            return self._output
        timing = self._timing
        timing.wait_start = time.perf_counter()
        if self._events is not None:
            self._events[2].synchronize()                  # the ids (and logprobs) are in host memory
        token_list = self._tokens.tolist()
        timing.wait_end = time.perf_counter()
        if self._events is not None:
            timing.device_start, timing.device_end = self._runner.host_times(*self._events[:2])
        self._runner.batch.record_sampled(self._seq_ids, token_list)
        logprobs = None
        if self._logprobs is not None:
            logprobs = [None] * len(self._seq_ids)
            chosen, top_ids, top_vals = (t.tolist() for t in self._logprobs)
            for i, k in enumerate(self._asked):
                if k >= 0:
                    logprobs[i] = (chosen[i], dict(zip(top_ids[i][:k], top_vals[i][:k])))
        self._output = ModelRunnerOutput(self._seq_ids, token_list, logprobs, self._failed, timing)
        return self._output


# ---------------------------------------------------------------------------- one step's inputs
class StepBuffer:
    """One step's inputs as regions of one int32 buffer: written on the host (pinned memory on a
    GPU machine), copied to the device in one asynchronous transfer. The regions sit at fixed
    offsets, so CUDA graphs captured on the device regions read each step's inputs in place.
    `host[name]` / `device[name]` are the views; float regions are int32 bits viewed as float32."""

    def __init__(self, max_tokens: int, max_rows: int, device: torch.device):
        t, r = max_tokens, max_rows
        sizes = {"ids": t, "positions": t, "slots": t,        # per token
                 "rows": r, "seq_lens": r, "context_lens": r, "query_start": r + 1,   # per scheduled row
                 "logits_indices": r, "temperature": r, "top_p": r, "top_k": r,   # per sampling sequence
                 "placeholder_dst": r, "placeholder_src": r}  # decode tokens whose ids are on the GPU
        on_cpu = device.type == "cpu"
        host = torch.zeros(sum(sizes.values()), dtype=torch.int32, pin_memory=not on_cpu)
        self._host_t = host
        self._device_t = host if on_cpu else torch.zeros_like(host, device=device)
        self.on_cpu = on_cpu
        self.host, self.device, start = {}, {}, 0
        for name, size in sizes.items():
            self.host[name] = host.numpy()[start:start + size]
            self.device[name] = self._device_t[start:start + size]
            start += size
        for name in ("temperature", "top_p"):
            self.host[name] = self.host[name].view(np.float32)
            self.device[name] = self.device[name].view(torch.float32)

    def copy_to_device(self) -> None:
        if not self.on_cpu:
            self._device_t.copy_(self._host_t, non_blocking=True)


@dataclass
class StepInputs:
    """The host-side facts of one step that the stages after _prepare_inputs need."""
    seq_ids: list[SeqId]                 # scheduled sequences, one-token rows first
    rows: np.ndarray                     # their batch rows
    num_new: np.ndarray                  # tokens each computes
    context: np.ndarray                  # tokens each had cached before the step
    num_tokens: int
    num_decode: int                      # the first rows: one token each
    sampling: list[SeqId]                # sequences that sample (forked samples after their parent)
    sample_rows: np.ndarray              # their batch rows
    num_placeholders: int                # tokens whose ids come from the last step's sampled ids, on the device
    graph_size: int = 0                  # the captured batch size a decode-only step replays (0: none)


class ModelRunner:
    def __init__(self, model, config: EngineArgs, max_model_len: int):
        self.model = model
        self.config = config
        self.spec = model.spec
        self.device = model.embed_tokens.device
        self.dtype = model.embed_tokens.dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_blocks = math.ceil(max_model_len / self.block_size)
        self.is_cuda = self.device.type == "cuda"
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.is_cuda else "torch"
        self.backend = backend
        fused = config.fused_kernels
        if fused or (fused is None and self.is_cuda and model.can_fuse()):
            model.use_fused_kernels()                     # ~12 kernels per layer instead of ~40
        self.fused_kernels = model.fused
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.profile_peak_bytes = 0
        self.num_blocks = config.num_kv_blocks or self._size_kv_pool()
        self._check_memory()                              # before anything large is allocated
        self.cache = PagedKVCache.from_spec(self.spec, self.num_blocks, self.block_size, dtype=self.dtype,
                                            device=self.device)
        self.attn = EngineAttention(self.cache, self.backend)
        self.batch = InputBatch(config.max_num_seqs, max_model_len, self.max_blocks, self.spec.vocab_size,
                                self.device, functools.partial(sample_generator, device=self.device))
        self.buf = StepBuffer(config.max_num_batched_tokens, config.max_num_seqs, self.device)
        self._inputs_copied: torch.cuda.Event | None = None   # the last step's host-to-device copy
        self._last_sampled: torch.Tensor | None = None     # the last step's sampled ids, on the device
        self._sampled_rows = np.zeros(0, dtype=np.int64)   # the rows that sampled them
        # Sampled ids come back to the host through two pinned buffers, used in turn: a step's copy
        # writes one while the host may still read the other (the step before's).
        self._out_bufs = [torch.empty(config.max_num_seqs, dtype=torch.long, pin_memory=True)
                          for _ in range(2)] if self.is_cuda else []
        self._out_readers: list[weakref.ref | None] = [None, None]   # the step that reads each buffer (a weak
                                                         # reference: a strong one would keep a dropped engine's
                                                         # GPU memory alive until the garbage collector runs)
        self._out_next = 0
        if self.is_cuda:                                 # GPU times on the host clock: one reference point
            torch.cuda.synchronize()
            self._ref_event, self._ref_time = torch.cuda.Event(enable_timing=True), time.perf_counter()
            self._ref_event.record()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_sizes: list[int] = []
        self.pieces: dict[int, list] = {}                # token count -> L + 1 callables (graph replays)
        self.graph_capture_time = 0.0
        if self.is_cuda and not config.enforce_eager and self.backend == "triton":
            self._capture_cuda_graphs()
        if self.is_cuda and not config.enforce_eager and self.fused_kernels:
            self._build_pieces(capture=True)

    @property
    def block_bytes(self) -> int:
        s = self.spec
        return 2 * s.num_layers * self.block_size * s.num_kv_heads * s.head_dim * self.dtype.itemsize

    def host_times(self, start: torch.cuda.Event, end: torch.cuda.Event) -> tuple[float, float]:
        """When two CUDA events happened, on the host's perf_counter clock."""
        return (self._ref_time + self._ref_event.elapsed_time(start) / 1e3,
                self._ref_time + self._ref_event.elapsed_time(end) / 1e3)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> PendingOutput:
        """Launch the step `out` describes; returns before the GPU has finished it."""
        timing = StepTiming(prepare_start=time.perf_counter())
        if self._inputs_copied is not None:                # the pinned buffers may be written again
            self._inputs_copied.synchronize()
        older = self._out_readers[self._out_next]          # the step two back: collected by now (the
        older = older() if older is not None else None     # engine does), else collected here, before
        if older is not None:                              # its buffer is written and its ids are stale
            older.get_output()
        failed = self._update_states(out)
        step = self._prepare_inputs(out)
        timing.launch_start = time.perf_counter()
        if step is None:                                   # every sequence of the step failed to join
            empty = torch.empty(0, dtype=torch.long)
            timing.launch_end = time.perf_counter()
            return PendingOutput(self, [], empty, None, [], failed, timing, None)
        events = None
        if self.is_cuda:                                   # the step on the GPU: from the inputs to the ids
            events = tuple(torch.cuda.Event(enable_timing=i < 2) for i in range(3))
            events[0].record()
        self.buf.copy_to_device()
        self.batch.tables.sync(self.batch.num_rows)
        if self.is_cuda:
            self._inputs_copied = torch.cuda.Event()
            self._inputs_copied.record()
        logits = self._run_model(step, timing)
        tokens, logprobs, asked = self._sample(logits, step)
        self._last_sampled = tokens
        slot = self._out_next
        if self.is_cuda:
            events[1].record()
            tokens = self._out_bufs[slot][:len(tokens)].copy_(tokens, non_blocking=True)   # nobody waits here
            if logprobs is not None:
                logprobs = tuple(t.to("cpu", non_blocking=True) for t in logprobs)
            events[2].record()
        timing.launch_end = time.perf_counter()
        pending = PendingOutput(self, step.sampling, tokens, logprobs, asked, failed, timing, events)
        self._out_readers[slot], self._out_next = weakref.ref(pending), slot ^ 1
        return pending

    def _update_states(self, out: SchedulerOutput) -> dict[SeqId, str]:
        """Apply the scheduler's changes to the persistent batch. Returns the new sequences that could
        not join (their request fails; the others run)."""
        batch = self.batch
        for seq_id in out.finished_seq_ids:
            batch.remove(seq_id)
        for seq_id in out.preempted_seq_ids:
            batch.remove(seq_id, preempted=True)
        failed = {}
        for new in out.new_seqs:
            try:
                batch.add(new)
            except Exception as err:                       # noqa: BLE001 -- this request fails, the step goes on
                failed[new.seq_id] = f"{type(err).__name__}: {err}"
        for seq_id, (start, block_ids) in out.block_updates.items():
            row = batch.row_of.get(seq_id)
            if row is not None:
                batch.tables.apply(row, start, block_ids)
        self.cache.copy_blocks(out.copies)                 # copy-on-write, before any new write
        return failed

    def _prepare_inputs(self, out: SchedulerOutput) -> StepInputs | None:
        """The step's flat arrays, written into the pinned step buffer (one copy to the device)."""
        batch, bs, h = self.batch, self.block_size, self.buf.host
        seq_ids = [s for s in out.num_scheduled_tokens if s in batch.row_of]
        if not seq_ids:
            return None
        n_rows = len(seq_ids)
        row_of = batch.row_of
        rows = np.fromiter((row_of[s] for s in seq_ids), dtype=np.int64, count=n_rows)
        num_new = np.fromiter(map(out.num_scheduled_tokens.__getitem__, seq_ids), dtype=np.int64, count=n_rows)
        context = np.fromiter(map(out.num_computed_tokens.__getitem__, seq_ids), dtype=np.int64, count=n_rows)
        ends = np.cumsum(num_new)
        starts = ends - num_new
        n_tokens = int(ends[-1])
        num_decode = int(np.searchsorted(num_new, 2))      # one-token rows come first
        positions = np.arange(n_tokens) - np.repeat(starts - context, num_new)       # (N,)
        token_rows = np.repeat(rows, num_new)                                       # (N,)
        h["ids"][:n_tokens] = batch.token_ids[token_rows, positions]
        h["positions"][:n_tokens] = positions
        h["slots"][:n_tokens] = batch.tables.host[token_rows, positions // bs] * bs + positions % bs
        # tokens whose ids are not on the host: each running sequence's token sampled by the last
        # step, not collected yet (asynchronous scheduling); the device copies them from its ids
        unknown = np.flatnonzero(positions >= batch.num_known[token_rows])
        if len(unknown):
            h["placeholder_dst"][:len(unknown)] = unknown
            h["placeholder_src"][:len(unknown)] = batch.sample_index[token_rows[unknown]]
        seq_lens = context + num_new
        h["rows"][:n_rows], h["seq_lens"][:n_rows], h["context_lens"][:n_rows] = rows, seq_lens, context
        h["query_start"][:n_rows - num_decode + 1] = np.concatenate([[0], np.cumsum(num_new[num_decode:])])
        # the sequences that sample: this step computes their last token (forked samples: the same row)
        samples = np.flatnonzero(seq_lens == batch.num_tokens[rows])
        children = [n for n in out.new_seqs if n.sample_from is not None and n.seq_id in batch.row_of]
        if not children:
            sampling, logit_rows, sample_rows = [seq_ids[i] for i in samples.tolist()], ends[samples] - 1, rows[samples]
        else:                                              # n > 1: each fork samples from its parent's row
            forked: dict[SeqId, list[SeqId]] = {}
            for new in children:
                forked.setdefault(new.sample_from, []).append(new.seq_id)
            sampling, logit_rows = [], []
            for i in samples.tolist():
                for s in (seq_ids[i], *forked.get(seq_ids[i], ())):
                    sampling.append(s)
                    logit_rows.append(ends[i] - 1)
            sample_rows = np.fromiter((batch.row_of[s] for s in sampling), dtype=np.int64, count=len(sampling))
        batch.num_tokens[sample_rows] += 1                 # the token being sampled: pending until get_output
        k = len(sampling)
        batch.sample_index[self._sampled_rows] = -1        # where this step's ids will be: next step's
        batch.sample_index[sample_rows] = np.arange(k)     # placeholders read them on the device
        self._sampled_rows = sample_rows
        h["logits_indices"][:k] = logit_rows
        h["temperature"][:k] = batch.temperature[sample_rows]
        h["top_p"][:k] = batch.top_p[sample_rows]
        h["top_k"][:k] = batch.top_k[sample_rows]
        step = StepInputs(seq_ids, rows, num_new, context, n_tokens, num_decode, sampling, sample_rows,
                          len(unknown))
        step.graph_size = self._graph_size(n_rows, num_decode)
        if step.graph_size:                                # pad to the captured size: nothing written or read
            pad = slice(n_rows, step.graph_size)
            h["ids"][pad], h["positions"][pad], h["slots"][pad] = 0, 0, -1
            h["rows"][pad], h["seq_lens"][pad] = 0, 0
        return step

    def _run_model(self, step: StepInputs, timing: StepTiming) -> torch.Tensor:
        """Logits (len(step.sampling), vocab) of the tokens that sample."""
        d, n = self.buf.device, step.num_tokens
        if step.num_placeholders:                          # last step's sampled ids, copied on the device
            k = step.num_placeholders
            d["ids"].index_copy_(0, d["placeholder_dst"][:k].long(),
                                 self._last_sampled.index_select(0, d["placeholder_src"][:k].long()).to(torch.int32))
        logits_indices = d["logits_indices"][:len(step.sampling)]
        if step.graph_size:
            timing.cuda_graph = True
            graph, logits = self.graphs[step.graph_size]
            graph.replay()
            return logits.index_select(0, logits_indices)
        self.attn.metadata = self._attention_metadata(step)
        piece_size = self._piece_size(n)
        if piece_size:
            timing.piecewise = True
            return self._run_pieces(piece_size, n, logits_indices)
        return self.model.forward(d["ids"][:n], d["positions"][:n], self.attn, logits_indices=logits_indices)

    def _attention_metadata(self, step: StepInputs) -> AttentionMetadata:
        """Where this step's tokens go and what each row attends to (kvlab.engine.attention)."""
        d, nd, nr = self.buf.device, step.num_decode, len(step.seq_ids)
        slots = d["slots"][:step.num_tokens]
        md = AttentionMetadata(slots if self.is_cuda else slots.long(), nd)   # the CPU scatter takes int64
        width = int((step.context + step.num_new).max() + self.block_size - 1) // self.block_size
        if self.backend == "triton":                       # the kernels read the tables on the device
            tables = self.batch.tables.device
            if nd:
                md.decode_block_tables = tables.index_select(0, d["rows"][:nd])[:, :width]
                md.decode_seq_lens = d["seq_lens"][:nd]
            if nd < nr:
                md.prefill_block_tables = tables.index_select(0, d["rows"][nd:nr])[:, :width]
                md.prefill_query_start = d["query_start"][:nr - nd + 1]
                md.prefill_context_lens = d["context_lens"][nd:nr]
                md.prefill_max_query_len = int(step.num_new[nd:].max())
            return md
        starts = np.cumsum(step.num_new) - step.num_new  # gather + SDPA: a padded layout from the host tables
        host_tables = self.batch.tables.host[step.rows, :width]
        if nd:
            md.decode_layout = GatheredLayout.build(starts[:nd], step.num_new[:nd], step.context[:nd],
                                                    host_tables[:nd], self.block_size, self.device)
        if nd < nr:
            md.prefill_layout = GatheredLayout.build(starts[nd:] - starts[nd], step.num_new[nd:], step.context[nd:],
                                                     host_tables[nd:], self.block_size, self.device)
        return md

    def _sample(self, logits: torch.Tensor, step: StepInputs):
        """Token ids (on the device) for step.sampling; logprob tensors if any sequence asked."""
        k, d, batch = len(step.sampling), self.buf.device, self.batch
        if k == 0:
            return torch.empty(0, dtype=torch.long, device=self.device), None, []
        rows = step.sample_rows
        temperature = batch.temperature[rows]
        asked = batch.num_logprobs[rows].tolist()
        seeded = [] if not batch.num_seeded else \
            [(i, batch.generators[r]) for i, r in enumerate(rows.tolist()) if batch.generators[r] is not None]
        sampling = SamplingBatch(
            temperature=d["temperature"][:k], top_k=d["top_k"][:k], top_p=d["top_p"][:k], generators=seeded,
            all_greedy=bool((temperature == 0).all()),
            needs_filter=bool(((temperature > 0) & ((batch.top_k[rows] < self.spec.vocab_size)
                                                    | (batch.top_p[rows] < 1))).any()),
            num_logprobs=max(asked))
        tokens = sample(logits, sampling, self.generator)
        logprobs = logprobs_of(logits, tokens, sampling.num_logprobs) if sampling.num_logprobs >= 0 else None
        return tokens, logprobs, asked

    # ------------------------------------------------------------------ CUDA graphs
    def _graph_size(self, n_rows: int, num_decode: int) -> int:
        """The captured batch size this step replays, or 0 to run eagerly."""
        if not self.graphs or num_decode != n_rows:
            return 0
        for bs in self.graph_sizes:
            if bs >= n_rows:
                return bs
        return 0

    def _capture_cuda_graphs(self) -> None:
        """A graph per decode batch size: gather the rows' block tables, then the whole forward,
        reading the step buffer's regions (ids, positions, slots, lengths, rows) in place."""
        t0 = time.perf_counter()
        self.graph_sizes = self.config.graph_batch_sizes()
        d = self.buf.device
        self.graph_tables = torch.zeros(self.graph_sizes[-1], self.max_blocks, dtype=torch.int32, device=self.device)
        pool = None
        for bs in reversed(self.graph_sizes):              # largest first: the others reuse its memory
            tables = self.graph_tables[:bs]
            self.attn.metadata = AttentionMetadata(d["slots"][:bs], bs, tables, d["seq_lens"][:bs])

            def decode_step():
                torch.index_select(self.batch.tables.device, 0, d["rows"][:bs], out=tables)
                return self.model.forward(d["ids"][:bs], d["positions"][:bs], self.attn)   # (bs, vocab)

            decode_step()                                  # warm up (Triton compiles)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = decode_step()
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize()
        self.graph_capture_time = time.perf_counter() - t0

    # ------------------------------------------------------------------ piecewise CUDA graphs
    def _piece_size(self, n_tokens: int) -> int:
        """The captured token count a mixed step of n_tokens pads up to, or 0 to run eagerly."""
        for size in self.pieces:                           # ascending
            if size >= n_tokens:
                return size
        return 0

    @torch.inference_mode()
    def _build_pieces(self, capture: bool) -> None:
        """For each token count N, the forward's L + 1 pieces on the first N rows of static buffers
        (the step buffer's ids and positions; attention's output, q k v and the residual stream
        here), captured as CUDA graphs (all sharing one memory pool: a piece keeps nothing in it,
        everything it hands on is copied out to the static buffers). capture=False keeps the
        pieces as plain calls: the same path, eager (how the CPU tests check it)."""
        t0 = time.perf_counter()
        m, dev, dt = self.model, self.device, self.dtype
        sizes = self.config.piece_token_sizes()
        big = sizes[-1]
        self.p_attn = torch.zeros(big, m.num_heads, m.head_dim, dtype=dt, device=dev)     # attention's output
        self.p_qkv = torch.zeros(big, (m.num_heads + 2 * m.num_kv_heads) * m.head_dim, dtype=dt, device=dev)
        self.p_residual = torch.zeros(big, m.embed_tokens.shape[1], dtype=dt, device=dev)
        self.p_hidden = torch.zeros_like(self.p_residual)                         # the last piece's output
        pool = None
        for n in reversed(sizes):                          # largest first
            calls = [self._piece_call(j, n) for j in range(len(m.layers) + 1)]
            if capture:
                for call in calls:                         # warm up: Triton compiles, cuBLAS picks kernels
                    call()
                torch.cuda.synchronize()
                graphs = []
                for call in calls:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        call()
                    pool = graph.pool() if pool is None else pool
                    graphs.append(graph)
                calls = [g.replay for g in graphs]
            self.pieces[n] = calls
        self.pieces = dict(sorted(self.pieces.items()))
        if capture:
            torch.cuda.synchronize()
        self.graph_capture_time += time.perf_counter() - t0

    def _piece_call(self, j: int, n: int):
        """Piece j on the first n rows of the static buffers (Transformer.fused_piece)."""
        m, d = self.model, self.buf.device
        ids, pos, attn_out, residual = d["ids"][:n], d["positions"][:n], self.p_attn[:n], self.p_residual[:n]
        out = self.p_hidden[:n] if j == len(m.layers) else self.p_qkv[:n]

        def call():
            if j == 0:
                x, res = m.fused_piece(0, ids, None, pos)
                residual.copy_(res)
            else:
                x, _ = m.fused_piece(j, attn_out, residual, pos)   # residual: updated in place
            out.copy_(x)
        return call

    def _run_pieces(self, size: int, n: int, logits_indices: torch.Tensor) -> torch.Tensor:
        """One mixed step: the pieces for `size` tokens, attention on the n real ones in between."""
        pieces, qkv, attn_out = self.pieces[size], self.p_qkv[:n], self.p_attn[:n]
        pos = self.buf.device["positions"][:n]
        pieces[0]()
        for i in range(len(pieces) - 1):
            q, k, v = self.model.split_qkv(qkv)
            self.attn(i, q, k, v, pos, out=attn_out)
            pieces[i + 1]()
        return self.model.lm_head(self.p_hidden[:n][logits_indices])

    # ------------------------------------------------------------------ sizing the pool
    def _size_kv_pool(self) -> int:
        cfg = self.config
        if cfg.kv_cache_memory_bytes is not None:
            if cfg.kv_cache_memory_bytes < self.block_bytes:
                raise ValueError(f"kv_cache_memory_bytes={cfg.kv_cache_memory_bytes:,} is less than one KV block "
                                 f"({self.block_bytes:,} bytes: 2 x {self.spec.num_layers} layers x block_size "
                                 f"{self.block_size} x {self.spec.num_kv_heads} KV heads x head_dim "
                                 f"{self.spec.head_dim} x {self.dtype.itemsize} bytes)")
            return cfg.kv_cache_memory_bytes // self.block_bytes
        if not self.is_cuda:
            if self.block_bytes > CPU_DEFAULT_KV_BYTES:
                raise ValueError(f"block_size={self.block_size} makes one KV block {_gib(self.block_bytes)}, more "
                                 f"than the CPU's default KV pool of {_gib(CPU_DEFAULT_KV_BYTES)}: lower block_size, "
                                 f"or set kv_cache_memory_bytes")
            full = cfg.max_num_seqs * self.max_blocks           # every row at full length
            return min(full, CPU_DEFAULT_KV_BYTES // self.block_bytes)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        allocated = torch.cuda.memory_allocated()
        self._profile_step()
        peak = torch.cuda.max_memory_allocated()
        self.profile_peak_bytes = peak - allocated
        budget = total * cfg.gpu_memory_utilization - (total - free) - self.profile_peak_bytes
        if budget < self.block_bytes:
            raise RuntimeError(f"no memory left for the KV cache: {cfg.gpu_memory_utilization:.0%} of "
                               f"{total / GiB:.1f} GiB minus {(total - free) / GiB:.1f} GiB in use and a "
                               f"{self.profile_peak_bytes / GiB:.2f} GiB activation peak; raise "
                               f"gpu_memory_utilization or lower max_num_batched_tokens")
        return int(budget // self.block_bytes)

    def _check_memory(self) -> None:
        """Refuse what this machine cannot hold, before allocating it, naming the setting: the KV pool
        (on the GPU: its free memory; on the CPU: the available RAM) and the persistent batch's host
        arrays (max_num_seqs rows of max_model_len token ids)."""
        import psutil

        cfg = self.config
        kv = self.num_blocks * self.block_bytes
        rows = cfg.max_num_seqs * (self.max_model_len + self.max_blocks) * 4        # token ids, block tables
        ram = psutil.virtual_memory().available
        if cfg.num_kv_blocks is not None:
            setting = f"num_kv_blocks={cfg.num_kv_blocks:,}"
        elif cfg.kv_cache_memory_bytes is not None:
            setting = f"kv_cache_memory_bytes={cfg.kv_cache_memory_bytes:,}"
        else:
            setting = f"block_size={cfg.block_size}"
        where, free = ("GPU", torch.cuda.mem_get_info(self.device)[0]) if self.is_cuda else ("RAM", ram - rows)
        if kv > free:
            raise ValueError(f"{setting} asks for a KV pool of {self.num_blocks:,} blocks x {self.block_bytes:,} bytes "
                             f"= {_gib(kv)}, and {_gib(max(free, 0))} of {where} is free: ask for less")
        if rows > ram:
            raise ValueError(f"max_num_seqs={cfg.max_num_seqs:,} rows of max_model_len={self.max_model_len:,} tokens "
                             f"need {_gib(rows)} of host memory for the runner's batch, and {_gib(ram)} is "
                             f"available: lower max_num_seqs or max_model_len")

    def _profile_step(self) -> None:
        """The largest step's activations: max_num_batched_tokens tokens of one sequence, logits for
        max_num_seqs rows, and the sampler's vocab-wide buffers (top-p sorts)."""
        cfg = self.config
        n = min(cfg.max_num_batched_tokens, self.max_model_len)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)              # one flattened sequence
        positions = torch.arange(n, device=self.device)
        rows = torch.arange(n - min(n, cfg.max_num_seqs), n, device=self.device)
        attend = lambda i, q, k, v, pos: causal_attention(i, q[None], k[None], v[None], pos[None])[0]
        logits = self.model.forward(ids, positions, attend, logits_indices=rows)
        r = logits.shape[0]
        batch = SamplingBatch(temperature=torch.ones(r, device=self.device),
                              top_k=torch.full((r,), 50, device=self.device),
                              top_p=torch.full((r,), 0.9, device=self.device), generators=[], all_greedy=False,
                              needs_filter=True, num_logprobs=-1)
        sample(logits, batch, self.generator)
        torch.cuda.synchronize()


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"
