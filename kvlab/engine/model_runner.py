"""The model runner: the KV pool, one forward pass per step, CUDA graphs.

    runner = ModelRunner(model, config, max_model_len)   # sizes and allocates the KV pool
    sampled = runner.execute(scheduler_output)            # {sequence: token id}

Sizing the pool (vLLM's method, nano-vllm's formula). On a GPU the runner first runs a
dummy step of `max_num_batched_tokens` tokens and reads the peak memory it needed
(activations, logits, sampler buffers); the KV pool gets what is left of
`gpu_memory_utilization` of the card after the weights and that peak:

    kv_bytes = total * utilization - in_use_now - (peak - allocated_now)
    num_blocks = kv_bytes // (2 * layers * block_size * kv_heads * head_dim * dtype_bytes)

On the CPU the pool is `kv_cache_memory_bytes` (default: enough for every running
sequence at full length, at most 1 GiB). `num_kv_blocks` overrides both.

A step's inputs are a few flat arrays built with numpy on the host, then copied to the
device: token ids, positions, slot mapping, the rows' block tables, the indices of the
tokens that sample. Block tables are not rebuilt each step: each running sequence owns a
row of a persistent (max_num_seqs, max_blocks) buffer, and only entries that changed
since the last step are written (a new block, a copy-on-write move), so host work per
step grows with the batch, not with the context (vLLM v1's BlockTable does the same).

CUDA graphs. A small model's decode step is hundreds of tiny kernels (30 layers x ~12):
launching them costs more host time than the GPU needs to run them. So at start-up the
runner captures the whole forward of a decode-only step at a set of batch sizes into
CUDA graphs (static input buffers, the Triton kernel reading block tables from them); a
decode step copies its inputs into the buffers of the next captured size up, padding rows
with slot -1 (nothing written) and length 0 (nothing read), and replays the graph: one
launch (nano-vllm's capture_cudagraph).

Piecewise CUDA graphs. A step with prefill chunks cannot replay that graph: its rows have
many queries each, and their number and lengths change every step. Under load almost
every step is such a mixed step (a request finishes, a waiting one is admitted and
prefilled beside the decodes), so eager launches would set the pace: about 10 ms of host
time per step, several times the GPU's work. Only attention cares where the sequences
start; everything else in a layer works on (N, hidden) rows of tokens. So, as vLLM v1
does, the runner also captures the forward in pieces cut at the attention calls
(Transformer.fused_piece: L + 1 pieces for L layers) for a set of token counts N, reading
and writing static buffers; a mixed step pads its N tokens up to the next captured count,
replays piece 0, runs attention eagerly on the real tokens, replays piece 1, and so on:

    [embed, norm, qkv, rope]  attn 0  [o, add+norm, MLP, add+norm, qkv, rope]  attn 1  ...  [..., final norm]
     graph piece 0            eager    graph piece 1                           eager       graph piece L

Padding tokens compute on stale ids and are never read: attention writes only the real
tokens' K/V and outputs, and the LM head reads only the rows that sample.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from kvlab.engine.attention import AttentionMetadata, EngineAttention, GatheredLayout
from kvlab.engine.config import EngineConfig
from kvlab.engine.sampler import SamplingBatch, logprobs_of, sample
from kvlab.engine.scheduler import SchedulerOutput
from kvlab.model.attention import causal_attention
from kvlab.paged.kv_cache import PagedKVCache

GiB = 1 << 30
CPU_DEFAULT_KV_BYTES = 1 * GiB


@dataclass
class StepResult:
    sampled: dict                        # Sequence -> token id
    logprobs: dict                       # Sequence -> (chosen logprob, {token: logprob}) if asked
    prepare_time: float                  # seconds building inputs on the host
    forward_time: float                  # seconds from launch until the tokens are on the host
    device_time: float | None            # GPU seconds (CUDA events), None on the CPU
    cuda_graph: bool                     # the whole forward replayed one graph (a decode-only step)
    piecewise: bool = False              # a mixed step: graph pieces, attention eager in between


class ModelRunner:
    def __init__(self, model, config: EngineConfig, max_model_len: int):
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
        self.fused_kernels = model._fused is not None
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.profile_peak_bytes = 0
        self.num_blocks = config.num_kv_blocks or self._size_kv_pool()
        self.cache = PagedKVCache.from_spec(self.spec, self.num_blocks, self.block_size, dtype=self.dtype,
                                            device=self.device)
        self.attn = EngineAttention(self.cache, self.backend)
        self.tables = np.zeros((config.max_num_seqs, self.max_blocks), dtype=np.int32)  # row per running seq
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        t0 = time.perf_counter()
        self.cache.copy_blocks(out.copies)                 # copy-on-write, before any new write
        items = out.scheduled
        n_rows = len(items)
        num_new = np.fromiter((it.num_new_tokens for it in items), dtype=np.int64, count=n_rows)
        context = np.fromiter((it.seq.num_computed_tokens for it in items), dtype=np.int64, count=n_rows)
        rows = np.fromiter((it.seq.row for it in items), dtype=np.int64, count=n_rows)
        self._sync_block_tables(items)
        ends = np.cumsum(num_new)
        starts = ends - num_new
        n_tokens = int(ends[-1])
        ids = np.empty(n_tokens, dtype=np.int64)
        for it, a, c, n in zip(items, starts.tolist(), context.tolist(), num_new.tolist()):
            ids[a:a + n] = it.seq.token_ids[c:c + n] if n > 1 else it.seq.token_ids[c]
        positions = np.arange(n_tokens) - np.repeat(starts - context, num_new)
        token_rows = np.repeat(rows, num_new)
        slots = self.tables[token_rows, positions // self.block_size].astype(np.int64) * self.block_size \
            + positions % self.block_size
        # the rows that sample, and which logits row each sampling sequence reads (n > 1: shared)
        sampling, logit_rows = [], []
        for i, it in enumerate(items):
            if it.samples:
                for seq in (it.seq, *it.children):
                    sampling.append(seq)
                    logit_rows.append(i)
        num_decode = int(np.searchsorted(num_new, 2))      # one-token rows come first
        seq_lens = context + num_new

        graph_bs = self._graph_size(n_rows, num_decode)
        if self.is_cuda:                                   # GPU timeline from the first copy to the tokens
            start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_ev.record()
        if graph_bs:
            self._fill_graph_inputs(graph_bs, ids, positions, slots, rows, seq_lens)
            t1 = time.perf_counter()
            graph, logits = self.graphs[graph_bs]
            graph.replay()
            logits = logits[:n_rows]
        else:
            dev = lambda a, dtype=torch.long: torch.from_numpy(a).to(self.device, dtype=dtype, non_blocking=True)
            md = AttentionMetadata(dev(slots), num_decode)
            width = int((seq_lens.max() + self.block_size - 1) // self.block_size)
            if num_decode:
                tables = self.tables[rows[:num_decode], :width]
                if self.backend == "triton":
                    md.decode_block_tables = dev(np.ascontiguousarray(tables), torch.int32)
                    md.decode_seq_lens = dev(seq_lens[:num_decode], torch.int32)
                else:
                    md.decode_layout = GatheredLayout.build(starts[:num_decode], num_new[:num_decode],
                                                            context[:num_decode], tables, self.block_size,
                                                            self.device)
            if num_decode < n_rows and self.backend == "triton":
                chunks = num_new[num_decode:]
                md.prefill_block_tables = dev(np.ascontiguousarray(self.tables[rows[num_decode:], :width]), torch.int32)
                md.prefill_query_start = dev(np.concatenate([[0], np.cumsum(chunks)]), torch.int32)
                md.prefill_context_lens = dev(context[num_decode:], torch.int32)
                md.prefill_max_query_len = int(chunks.max())
            elif num_decode < n_rows:
                md.prefill_layout = GatheredLayout.build(starts[num_decode:] - starts[num_decode],
                                                         num_new[num_decode:], context[num_decode:],
                                                         self.tables[rows[num_decode:], :width], self.block_size,
                                                         self.device)
            self.attn.metadata = md
            sample_rows = dev((ends - 1)[np.array(logit_rows, dtype=np.int64)])   # none: no LM head at all
            piece_size = self._piece_size(n_tokens)
            if piece_size:
                self._fill_piece_inputs(ids, positions)
                t1 = time.perf_counter()
                logits = self._run_pieces(piece_size, n_tokens, sample_rows)
            else:
                ids_t, pos_t = dev(ids), dev(positions)
                t1 = time.perf_counter()
                logits = self.model.forward(ids_t, pos_t, self.attn, logits_indices=sample_rows)
            logit_rows = list(range(len(sampling)))
        tokens, logprobs = self._sample(logits, logit_rows, sampling)
        if self.is_cuda:
            end_ev.record()
        token_list = tokens.tolist()                        # the one device-to-host sync of the step
        device_time = start_ev.elapsed_time(end_ev) / 1e3 if self.is_cuda else None
        t2 = time.perf_counter()
        return StepResult(dict(zip(sampling, token_list)), logprobs, t1 - t0, t2 - t1, device_time, bool(graph_bs),
                          piecewise=not graph_bs and bool(piece_size))

    def _sync_block_tables(self, items) -> None:
        """Copy into the persistent buffer only the table entries that changed since last step."""
        for it in items:
            seq = it.seq
            table, synced = seq.block_table, seq.table_synced
            if synced < len(table):
                self.tables[seq.row, synced:len(table)] = table[synced:]
                seq.table_synced = len(table)
            for child in it.children:                      # forked after this step: same table
                self.tables[child.row, :len(table)] = self.tables[seq.row, :len(table)]
                child.table_synced = len(table)

    def _sample(self, logits: torch.Tensor, logit_rows: list[int], sampling: list) -> tuple[torch.Tensor, dict]:
        if not sampling:
            return torch.empty(0, dtype=torch.long), {}
        if logit_rows != list(range(len(logit_rows))):
            logits = logits[torch.tensor(logit_rows, device=logits.device)]
        params = [s.params for s in sampling]
        all_greedy = all(p.temperature == 0 for p in params)
        batch = SamplingBatch(
            temperature=torch.tensor([p.temperature for p in params], device=self.device),
            top_k=torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], device=self.device),
            top_p=torch.tensor([p.top_p for p in params], device=self.device),
            generators=[(i, s.generator) for i, s in enumerate(sampling) if s.generator is not None],
            all_greedy=all_greedy,
            needs_filter=any(p.top_k > 0 or p.top_p < 1 for p in params if p.temperature > 0),
            num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
        ) if not all_greedy else SamplingBatch(None, None, None, [], True, False,
                                               max((p.logprobs for p in params if p.logprobs is not None),
                                                   default=-1))
        tokens = sample(logits, batch, self.generator)
        logprobs = {}
        if batch.num_logprobs >= 0:
            chosen, top_ids, top_vals = logprobs_of(logits, tokens, batch.num_logprobs)
            chosen, top_ids, top_vals = chosen.tolist(), top_ids.tolist(), top_vals.tolist()
            for i, s in enumerate(sampling):
                k = s.params.logprobs
                if k is not None:
                    tops = dict(zip(top_ids[i][:k], top_vals[i][:k]))
                    logprobs[s] = (chosen[i], tops)
        return tokens, logprobs

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
        t0 = time.perf_counter()
        self.graph_sizes = self.config.graph_batch_sizes()
        largest = self.graph_sizes[-1]
        dev = self.device
        # The graphs' inputs: one int32 buffer on the GPU, [ids | positions | slots | lengths | tables],
        # each region `largest` rows long, filled each step by ONE copy from a pinned host mirror.
        w = self.max_blocks
        self.g_buf = torch.zeros(largest * (4 + w), dtype=torch.int32, device=dev)
        self.g_host = torch.zeros(largest * (4 + w), dtype=torch.int32, pin_memory=True)
        self.g_host_np = self.g_host.numpy()
        region = lambda t, i: t[i * largest:(i + 1) * largest]
        self.g_ids, self.g_pos, self.g_slots, self.g_lens = (region(self.g_buf, i) for i in range(4))
        self.g_tables = self.g_buf[4 * largest:].view(largest, w)
        self.g_largest = largest
        pool = None
        for bs in reversed(self.graph_sizes):                # largest first: the others reuse its memory
            md = AttentionMetadata(self.g_slots[:bs], bs, self.g_tables[:bs], self.g_lens[:bs])
            self.attn.metadata = md
            self.model.forward(self.g_ids[:bs], self.g_pos[:bs], self.attn)      # warm up (Triton compiles)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.forward(self.g_ids[:bs], self.g_pos[:bs], self.attn)   # (bs, vocab)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize()
        self.graph_capture_time = time.perf_counter() - t0

    def _fill_graph_inputs(self, bs: int, ids, positions, slots, rows, seq_lens) -> None:
        """Write the step's inputs into the pinned mirror (padding rows: slot -1, length 0: nothing
        written, nothing read), then copy it to the graphs' buffer in one asynchronous transfer."""
        n, big, h = len(ids), self.g_largest, self.g_host_np
        h[:n] = ids
        h[big:big + n] = positions
        h[2 * big:2 * big + n] = slots
        h[2 * big + n:2 * big + bs] = -1
        h[3 * big:3 * big + n] = seq_lens
        h[3 * big + n:3 * big + bs] = 0
        h[4 * big:].reshape(big, self.max_blocks)[:n] = self.tables[rows]
        self.g_buf.copy_(self.g_host, non_blocking=True)

    # ------------------------------------------------------------------ piecewise CUDA graphs
    def _piece_size(self, n_tokens: int) -> int:
        """The captured token count a mixed step of n_tokens pads up to, or 0 to run eagerly."""
        for size in self.pieces:                           # ascending
            if size >= n_tokens:
                return size
        return 0

    @torch.inference_mode()
    def _build_pieces(self, capture: bool) -> None:
        """Static buffers for steps of up to T tokens, and for each token count N the forward's
        L + 1 pieces on the first N rows of those buffers, captured as CUDA graphs (all sharing
        one memory pool: a piece keeps nothing in it, everything it hands on is copied out to
        the static buffers). capture=False keeps the pieces as plain calls: the same path, eager
        (how the CPU tests check it)."""
        t0 = time.perf_counter()
        m, dev, dt = self.model, self.device, self.dtype
        sizes = self.config.piece_token_sizes()
        big = sizes[-1]
        self.p_buf = torch.zeros(2 * big, dtype=torch.int32, device=dev)          # [ids | positions]
        self.p_host = torch.zeros(2 * big, dtype=torch.int32, pin_memory=self.is_cuda)
        self.p_host_np = self.p_host.numpy()
        self.p_ids, self.p_pos = self.p_buf[:big], self.p_buf[big:]
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
        m = self.model
        ids, pos, attn_out, residual = self.p_ids[:n], self.p_pos[:n], self.p_attn[:n], self.p_residual[:n]
        out = self.p_hidden[:n] if j == len(m.layers) else self.p_qkv[:n]

        def call():
            if j == 0:
                x, res = m.fused_piece(0, ids, None, pos)
                residual.copy_(res)
            else:
                x, _ = m.fused_piece(j, attn_out, residual, pos)   # residual: updated in place
            out.copy_(x)
        return call

    def _fill_piece_inputs(self, ids, positions) -> None:
        n, big, h = len(ids), len(self.p_ids), self.p_host_np
        h[:n] = ids
        h[big:big + n] = positions
        self.p_buf.copy_(self.p_host, non_blocking=True)

    def _run_pieces(self, size: int, n: int, sample_rows: torch.Tensor) -> torch.Tensor:
        """One mixed step: the pieces for `size` tokens, attention on the n real ones in between."""
        pieces, qkv, attn_out, pos = self.pieces[size], self.p_qkv[:n], self.p_attn[:n], self.p_pos[:n]
        pieces[0]()
        for i in range(len(pieces) - 1):
            q, k, v = self.model.split_qkv(qkv)
            self.attn(i, q, k, v, pos, out=attn_out)
            pieces[i + 1]()
        return self.model.lm_head(self.p_hidden[:n][sample_rows])

    # ------------------------------------------------------------------ sizing the pool
    def _size_kv_pool(self) -> int:
        cfg = self.config
        if cfg.kv_cache_memory_bytes is not None:
            return max(1, cfg.kv_cache_memory_bytes // self.block_bytes)
        if not self.is_cuda:
            full = cfg.max_num_seqs * self.max_blocks           # every row at full length
            return max(1, min(full, CPU_DEFAULT_KV_BYTES // self.block_bytes))
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
        batch = SamplingBatch(torch.ones(r, device=self.device), torch.full((r,), 50, device=self.device),
                              torch.full((r,), 0.9, device=self.device), [], False, True, -1)
        sample(logits, batch, self.generator)
        torch.cuda.synchronize()
