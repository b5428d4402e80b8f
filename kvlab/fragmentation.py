"""Where KV-cache memory goes under four allocation policies: a one-GPU simulator.

The vLLM paper (Kwon et al., SOSP 2023, §3 and Figure 2) observed that systems
which give each request one contiguous KV region keep only 20.4%-38.2% of that
memory busy holding tokens' keys and values, against 96.3% for vLLM's paged
cache. This module replays a request trace (`kvlab.workloads`) through one
GPU's KV memory of `capacity_tokens` slots (one slot holds one token's K and V
for every layer) and measures the same split.

The clock is the decode step. Within a step, in this order:
  1. every running request produces one token (its length grows by one); under
     `paged` one that crosses into a new block takes a free block, and if none is
     left the newest running request is preempted (vLLM's recompute preemption:
     its memory is freed, it goes back to the head of the queue keeping its
     generated tokens, and is prefilled again when re-admitted);
  2. if nobody was preempted, waiting requests are admitted first-come-first-served
     while the one at the head of the queue fits (head-of-line blocking). Admission
     is the prefill: the request holds its prompt plus its first output token.
     Under `paged`, as in vLLM, an admission must also leave `watermark` (1%) of
     the blocks free while anything runs, so that the newcomer is not preempted at once;
  3. memory is counted (below);
  4. requests that produced their last token finish and free all their memory.
A request of final length F = prompt_len + output_len runs output_len steps.

Policies (how much a request holds while it runs):
  max-reserve  one contiguous region of max_seq_len slots (Orca (Max); a static HF-style cache)
  pow2         contiguous, the next power of two >= F, at most max_seq_len (Orca (Pow2))
  oracle       contiguous, exactly F slots (Orca (Oracle): knows the output length in advance)
  paged        blocks of block_size slots taken as the sequence grows (vLLM)
Contiguous regions are placed in one address space, first-fit (or best-fit), so
holes open between them as requests of different sizes come and go.

Every slot, at every step, is exactly one of
  token_states            holds a computed token's K/V
  reservation             reserved, and its request will fill it later
  internal_fragmentation  reserved, and its request will never fill it
  external_fragmentation  free, but in a hole too small for the request waiting
                          at the head of the queue (paged: none, any block serves)
  free                    free, and nobody is waiting for it
The result's fractions are time averages over the memory in use or lost (the
first four, the paper's Figure 2 view) and over the whole capacity.

Two engines compute the same thing: `simulate_allocation_reference` steps token
by token and colours every slot (slow, obviously correct, draws the memory map);
`simulate_allocation` jumps from event to event (arrivals, admissions, block
boundaries, preemptions, completions) and sums each category between events in
closed form. Tests hold them equal, integer for integer, on random traces.
A request longer than max_seq_len, or whose allocation exceeds the capacity, is
rejected when it reaches the head of the queue, never retried. Settings under which no
request at all could run (no whole block, a max-reserve region larger than the capacity,
a workload whose every request is rejected, an empty workload) are errors: the fractions
of an empty run would be 0/0, not shares that sum to 1.

`serving_cost` prices a run with a stated cost model (every step reads all weights and the
running requests' cached K/V at the memory bandwidth; every prefilled token, recomputed ones
included, costs 2 x num_params FLOPs at the peak), so that policies are compared in modeled
seconds, not only per step.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np

from kvlab import checks
from kvlab.memory import GiB, kv_bytes_per_token, weight_bytes
from kvlab.model.flops import H100_SXM, GpuPeak
from kvlab.model.spec import ModelSpec
from kvlab.workloads import Workload

POLICIES = ("max-reserve", "pow2", "oracle", "paged")
FITS = ("first", "best")
# memory_map codes: CATEGORIES[code]
CATEGORIES = ("free", "token_states", "reservation", "internal_fragmentation", "external_fragmentation")
FREE, TOKEN, RESERVED, INTERNAL, EXTERNAL = range(5)
USED_OR_LOST = CATEGORIES[1:]
MAX_MAP_CELLS = 50_000_000  # the reference engine's slot-by-step map is for small traces
MAX_ARRIVAL_STEP = 2**53    # steps are counted in int64; float64 arrival times are whole numbers up to 2**53
MIN_REQUEST_LEN = 2         # the shortest request: one prompt token and one output token


def _as_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(allowed)} (a str), got {checks.shown(value)}")
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return str(value)


@dataclass(frozen=True)
class AllocationConfig:
    policy: str                  # one of POLICIES
    capacity_tokens: int         # KV slots on the GPU (KV bytes / bytes per token)
    max_seq_len: int = 2048      # longest request served; max-reserve's region size (the paper's setting)
    block_size: int = 16         # paged: slots per block (vLLM's default)
    fit: str = "first"           # contiguous placement: lowest-addressed hole that fits, or the smallest
    watermark: float = 0.01      # paged: share of blocks admission keeps free for growth (vLLM's default)

    def __post_init__(self):
        object.__setattr__(self, "policy", _as_choice("policy", self.policy, POLICIES))  # np.str_ -> str
        for name, minimum, allowed in (("capacity_tokens", 1, "a positive integer below 2**63"),
                                       ("max_seq_len", MIN_REQUEST_LEN, "an integer >= 2 (one prompt and one output "
                                                                        "token) below 2**63"),
                                       ("block_size", 1, "a positive integer below 2**63")):
            value = checks.integer(name, getattr(self, name), minimum, checks.INT64_MAX, allowed)
            object.__setattr__(self, name, value)                # numpy integers become int
        object.__setattr__(self, "fit", _as_choice("fit", self.fit, FITS))
        object.__setattr__(self, "watermark", checks.in_range("watermark", self.watermark, 0, 1,
                                                              "a fraction in [0, 1)", high_open=True))
        if self.longest_runnable < MIN_REQUEST_LEN:
            raise ValueError(f"nothing can ever run under {self.policy} with capacity_tokens={self.capacity_tokens}, "
                             f"max_seq_len={self.max_seq_len}, block_size={self.block_size}: {self._why_nothing_runs()}")

    def _why_nothing_runs(self) -> str:
        if self.paged:
            return (f"{self.num_blocks} whole block(s) of {self.block_size} slots fit in the capacity, and even the "
                    f"shortest request ({MIN_REQUEST_LEN} tokens) needs {-(-MIN_REQUEST_LEN // self.block_size)}; "
                    f"need capacity_tokens >= {-(-MIN_REQUEST_LEN // self.block_size) * self.block_size}")
        if self.policy == "max-reserve":
            return ("max-reserve gives every request a region of max_seq_len slots, more than the capacity; "
                    "need max_seq_len <= capacity_tokens")
        return f"even the shortest request ({MIN_REQUEST_LEN} tokens) needs more; need capacity_tokens >= 2"

    @property
    def longest_runnable(self) -> int:
        """The longest final length (prompt + output) a request may have and still run alone (0: none can)."""
        C, M = self.capacity_tokens, self.max_seq_len
        if self.paged:
            return min(M, self.num_blocks * self.block_size)
        if self.policy == "max-reserve":
            return M if M <= C else 0
        if self.policy == "pow2":        # region min(next power of two >= F, M) must fit in C
            return M if M <= C else 1 << (C.bit_length() - 1)
        return min(M, C)                 # oracle

    @property
    def paged(self) -> bool:
        return self.policy == "paged"

    @property
    def num_blocks(self) -> int:
        """Paged: whole blocks in the capacity (the remainder slots are never used)."""
        return self.capacity_tokens // self.block_size

    @property
    def watermark_blocks(self) -> int:
        """Paged: blocks an admission must leave free while anything runs (vLLM: int(0.01 * blocks))."""
        return int(self.watermark * self.num_blocks)

    def region_sizes(self, final_len) -> np.ndarray:
        """Contiguous policies: slots reserved at admission for requests of final length F: (n,) int64."""
        final_len = np.asarray(final_len, dtype=np.int64)
        if self.policy == "max-reserve":
            return np.full_like(final_len, self.max_seq_len)
        if self.policy == "pow2":
            pow2 = np.left_shift(1, np.ceil(np.log2(final_len)).astype(np.int64))  # log2 is exact on powers of 2
            return np.minimum(pow2, self.max_seq_len)
        return final_len  # oracle

    def never_fits(self, final_len) -> np.ndarray:
        """(n,) bool: True for a request that could not run even alone in an empty memory."""
        final_len = np.asarray(final_len, dtype=np.int64)
        if self.paged:
            too_big = -(-final_len // self.block_size) > self.num_blocks
        else:
            too_big = self.region_sizes(final_len) > self.capacity_tokens
        return (final_len > self.max_seq_len) | too_big


@dataclass(frozen=True, eq=False)
class AllocationResult:
    config: AllocationConfig
    slot_steps: dict             # category -> slots summed over steps (exact integers), all five categories
    num_steps: int               # steps 0 .. last completion
    busy_steps: int              # steps with at least one running request
    running_steps: int           # running requests summed over steps
    peak_batch_size: int         # most requests running in one step
    num_preemptions: int
    prefill_tokens: int          # tokens prefilled at admissions: prompts, plus prompt + generated on re-admission
    admit_step: np.ndarray = field(repr=False)        # (n,) first admission step per request, -1 if rejected
    finish_step: np.ndarray = field(repr=False)       # (n,) step of its last token, -1 if rejected
    arrival_time: np.ndarray = field(repr=False)      # (n,) from the workload
    output_len: np.ndarray = field(repr=False)        # (n,) from the workload
    batch_histogram: np.ndarray = field(repr=False)   # (peak + 1,) steps that ran 0, 1, ..., peak requests
    memory_map: np.ndarray | None = field(default=None, repr=False)  # (capacity, num_steps) uint8 codes
    batch_size: np.ndarray | None = field(default=None, repr=False)  # (num_steps,) running per step

    def _fraction(self, name: str) -> float:
        used = sum(self.slot_steps[c] for c in USED_OR_LOST)
        return self.slot_steps[name] / used if used else 0.0

    token_states = property(lambda self: self._fraction("token_states"))
    reservation = property(lambda self: self._fraction("reservation"))
    internal_fragmentation = property(lambda self: self._fraction("internal_fragmentation"))
    external_fragmentation = property(lambda self: self._fraction("external_fragmentation"))

    def fractions(self) -> dict:
        """The paper's Figure 2 view: shares of the memory in use or lost (they sum to 1)."""
        return {c: self._fraction(c) for c in USED_OR_LOST}

    def capacity_fractions(self) -> dict:
        """Shares of the whole capacity over all steps, free included (they sum to 1)."""
        total = self.config.capacity_tokens * self.num_steps
        return {c: (self.slot_steps[c] / total if total else 0.0) for c in CATEGORIES}

    @property
    def completed(self) -> np.ndarray:
        return self.finish_step >= 0

    @property
    def num_completed(self) -> int:
        return int(self.completed.sum())

    @property
    def num_rejected(self) -> int:
        return int((~self.completed).sum())

    @property
    def mean_batch_size(self) -> float:
        """Running requests per step, averaged over steps that run anything (the paper's batch size)."""
        return self.running_steps / self.busy_steps if self.busy_steps else 0.0

    @property
    def median_batch_size(self) -> float:
        """Running requests per step, the median over steps that run anything (np.median's convention)."""
        busy = self.batch_histogram[1:]
        total = int(busy.sum())
        if not total:
            return 0.0
        cum = np.cumsum(busy)
        lo, hi = np.searchsorted(cum, [(total - 1) // 2 + 1, total // 2 + 1])   # 0-based ranks -> batch - 1
        return (int(lo) + int(hi)) / 2 + 1

    @property
    def latency(self) -> np.ndarray:
        """(completed,) steps from each request's arrival to the end of the step of its last token."""
        done = self.completed
        return self.finish_step[done] + 1 - self.arrival_time[done]

    @property
    def normalized_latency(self) -> float:
        """Mean over completed requests of latency / output tokens (steps per token: about 1 when nobody waits
        and nobody is preempted); the y axis of the vLLM paper's Figure 12, in steps instead of seconds."""
        return float(np.mean(self.latency / self.output_len[self.completed]))

    @property
    def throughput(self) -> float:
        """Completed requests per step."""
        return self.num_completed / self.num_steps if self.num_steps else 0.0

    @property
    def queue_delay(self) -> np.ndarray:
        """(completed,) steps each request waited between arrival and its first admission."""
        return self.admit_step[self.completed] - self.arrival_time[self.completed]

    @property
    def mean_queue_delay(self) -> float:
        return float(self.queue_delay.mean()) if self.num_completed else 0.0

    def cost(self, spec: ModelSpec, gpu: GpuPeak = H100_SXM, dtype: str = "float16") -> "ServingCost":
        """This run priced by `serving_cost`: its busy steps, the K/V its running requests held
        (token slot-steps: every cached token is read once a step), its prefilled tokens."""
        return serving_cost(spec, steps=self.busy_steps, kv_tokens_read=self.slot_steps["token_states"],
                            prefill_tokens=self.prefill_tokens, requests=self.num_completed, gpu=gpu, dtype=dtype)

    def summary(self) -> str:
        f = self.fractions()
        return (f"{self.config.policy:>11}: tokens {f['token_states']:6.1%}  reserved {f['reservation']:6.1%}  "
                f"internal {f['internal_fragmentation']:6.1%}  external {f['external_fragmentation']:6.1%}  "
                f"| batch {self.mean_batch_size:6.2f} (peak {self.peak_batch_size})  "
                f"{self.throughput:.4f} req/step")


def _prepare(workload: Workload, cfg: AllocationConfig):
    """Plain lists, and the queue order: by arrival step (a request arriving at 3.2 is seen at step 4).
    Refuses what cannot be simulated: not a Workload, no requests, arrivals past int64 steps, no
    request that could ever run."""
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a kvlab.workloads.Workload (e.g. kvlab.workloads.sharegpt_like(...) "
                        f"or kvlab.workloads.from_lengths(prompt_len, output_len)), got {type(workload).__name__}")
    n = len(workload)
    if n == 0:
        raise ValueError("workload has no requests: nothing to simulate (its memory fractions would be 0/0)")
    last = float(workload.arrival_time.max())
    if last > MAX_ARRIVAL_STEP:
        raise ValueError(f"workload's arrival_time reaches {last:.3g} steps; the simulator counts steps in int64 "
                         f"and takes arrival times up to 2**53 = {MAX_ARRIVAL_STEP:.3g} steps (a tiny arrival "
                         f"rate gives such times: use a rate well above 1e-12 requests per step)")
    longest = cfg.longest_runnable
    if int(workload.total_len.min()) > longest:
        raise ValueError(f"none of the {n} requests can ever run: the shortest is {int(workload.total_len.min())} "
                         f"tokens (prompt + output), and under {cfg.policy} with capacity_tokens={cfg.capacity_tokens}, "
                         f"max_seq_len={cfg.max_seq_len}, block_size={cfg.block_size} a request may be at most "
                         f"{longest} tokens long")
    arrive = np.ceil(workload.arrival_time).astype(np.int64)
    order = np.argsort(arrive, kind="stable").tolist()
    return workload.prompt_len.tolist(), workload.output_len.tolist(), arrive.tolist(), order


def _result(cfg, wl, sums, num_steps, busy, running_steps, peak, preemptions, prefill, admit, finish, hist,
            **extra):
    sums = {c: int(v) for c, v in sums.items()}
    sums["free"] = cfg.capacity_tokens * int(num_steps) - sum(sums[c] for c in USED_OR_LOST)
    hist = np.asarray(hist, dtype=np.int64)[: int(peak) + 1]
    return AllocationResult(cfg, sums, int(num_steps), int(busy), int(running_steps), int(peak), int(preemptions),
                            int(prefill), np.asarray(admit, dtype=np.int64), np.asarray(finish, dtype=np.int64),
                            np.asarray(wl.arrival_time), np.asarray(wl.output_len), hist, **extra)


# ---------------------------------------------------------------------------------------------
# Reference: one step at a time, every slot coloured. Slow; small traces; draws the memory map.
# ---------------------------------------------------------------------------------------------

def simulate_allocation_reference(workload: Workload, policy: str, capacity_tokens: int, max_seq_len: int = 2048,
                                  block_size: int = 16, fit: str = "first", watermark: float = 0.01,
                                  keep_map: bool = True) -> AllocationResult:
    """Step-by-step simulation (the rules in the module docstring, written out literally).

    With keep_map the result carries the (capacity, steps) memory map; that is for small
    traces (at most MAX_MAP_CELLS cells), a ValueError says so as soon as it is exceeded.
    """
    cfg = AllocationConfig(policy, capacity_tokens, max_seq_len, block_size, fit, watermark)
    P, O, arrive, order = _prepare(workload, cfg)
    n, C, B = len(P), cfg.capacity_tokens, cfg.block_size
    F = [p + o for p, o in zip(P, O)]
    region = cfg.region_sizes(F).tolist()   # contiguous: each request's region size
    never = cfg.never_fits(F).tolist()      # requests that could not run even alone
    pending = deque(order)               # arrived or not, in queue order
    running: list[int] = []              # oldest admission first
    k = [0] * n                          # output tokens produced so far
    owner = np.full(C, -1)               # contiguous: request owning each slot
    start: dict[int, int] = {}           # contiguous: first slot of each running request's region
    free_blocks = list(range(cfg.num_blocks))  # paged: a min-heap of free block ids
    blocks: dict[int, list[int]] = {}    # paged: each running request's block table
    admit, finish = [-1] * n, [-1] * n
    sums = dict.fromkeys(USED_OR_LOST, 0)
    columns, batch, preemptions, prefill, s = [], [], 0, 0, 0

    def holes():  # maximal runs of free slots: [(start, length)]
        free = np.concatenate(([False], owner < 0, [False]))
        edges = np.flatnonzero(np.diff(free.astype(np.int8)))
        return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]

    def release(j):
        if cfg.paged:
            for b in blocks.pop(j):
                heapq.heappush(free_blocks, b)
        else:
            owner[owner == j] = -1
            del start[j]

    while pending or running:
        # 1. every running request produces a token; paged: a new block when it crosses a boundary
        preempted = False
        i = 0
        while i < len(running):
            j = running[i]
            if cfg.paged and P[j] + k[j] + 1 > len(blocks[j]) * B:
                while not free_blocks:              # out of blocks: preempt the newest running request
                    victim = running.pop()
                    release(victim)
                    pending.appendleft(victim)      # back to the head of the queue, keeps k[victim]
                    preempted, preemptions = True, preemptions + 1
                    if victim == j:
                        break
                if j not in running:
                    break
                blocks[j].append(heapq.heappop(free_blocks))
            k[j] += 1
            i += 1
        # 2. admit first-come-first-served while the head of the queue fits (not after a preemption)
        while not preempted and pending and arrive[pending[0]] <= s:
            j = pending[0]
            if never[j]:
                pending.popleft()                   # rejected, never retried
                continue
            if cfg.paged:
                need = -(-(P[j] + k[j] + 1) // B)
                if need > len(free_blocks) - (cfg.watermark_blocks if running else 0):
                    break
                blocks[j] = [heapq.heappop(free_blocks) for _ in range(need)]
            else:
                size = region[j]
                fitting = [h for h in holes() if h[1] >= size]
                if not fitting:
                    break
                at = fitting[0][0] if cfg.fit == "first" else min(fitting, key=lambda h: (h[1], h[0]))[0]
                owner[at:at + size] = j
                start[j] = at
            pending.popleft()
            running.append(j)
            prefill += P[j] + k[j]                  # the prompt, and what it had generated before a preemption
            k[j] += 1
            if admit[j] < 0:
                admit[j] = s
        # 3. colour every slot
        cat = np.full(C, FREE, dtype=np.uint8)
        for j in running:
            length = P[j] + k[j]                    # tokens whose K/V is held
            if cfg.paged:
                slots = np.concatenate([np.arange(b * B, (b + 1) * B) for b in blocks[j]])  # logical order
            else:
                slots = np.arange(start[j], start[j] + region[j])
            cat[slots[:length]] = TOKEN
            cat[slots[length:F[j]]] = RESERVED      # it will fill these before it finishes
            cat[slots[F[j]:]] = INTERNAL            # it never will
        waiting = pending and arrive[pending[0]] <= s
        if waiting and not cfg.paged:               # paged: any free block serves, no hole is too small
            need = region[pending[0]]
            for at, length in holes():
                if length < need:
                    cat[at:at + length] = EXTERNAL
        counts = np.bincount(cat, minlength=len(CATEGORIES))
        for c in USED_OR_LOST:
            sums[c] += int(counts[CATEGORIES.index(c)])
        if keep_map:
            if C * len(columns) >= MAX_MAP_CELLS:
                raise ValueError(f"the memory map would exceed {MAX_MAP_CELLS:,} cells (capacity {C:,} x steps); "
                                 f"it is for small traces: leave it out (simulate_allocation(..., record_map=False), "
                                 f"or simulate_allocation_reference(..., keep_map=False))")
            columns.append(cat)
        batch.append(len(running))
        # 4. requests that produced their last token finish and free their memory
        for j in [j for j in running if k[j] == O[j]]:
            running.remove(j)
            release(j)
            finish[j] = s
        s += 1

    num_steps = max(finish) + 1 if n and max(finish) >= 0 else 0
    batch = np.array(batch[:num_steps], dtype=np.int64)
    memory_map = None
    if keep_map:
        memory_map = np.stack(columns[:num_steps], axis=1) if num_steps else np.zeros((C, 0), np.uint8)  # (C, steps)
    return _result(cfg, workload, sums, num_steps, (batch > 0).sum(), batch.sum(), batch.max(initial=0),
                   preemptions, prefill, admit, finish, np.bincount(batch, minlength=1),
                   memory_map=memory_map, batch_size=batch)


# ---------------------------------------------------------------------------------------------
# Fast: event to event, categories summed in closed form per running segment.
# ---------------------------------------------------------------------------------------------

def _block_sum(length: np.ndarray, B: int) -> np.ndarray:
    """sum_{x=1..length} B * ceil(x / B): slots a paged request holds, summed over lengths 1..length."""
    q, r = length // B, length % B
    return B * B * q * (q + 1) // 2 + r * B * (q + 1)


def _segment_sums(cfg, seg_j, seg_t0, seg_l0, seg_t1, F_all, A_all):
    """Token, reservation and internal slot-steps of running segments (request j, steps t0..t1, length l0 at t0)."""
    j = np.asarray(seg_j, dtype=np.int64)
    t0, l0, t1 = (np.asarray(x, dtype=np.int64) for x in (seg_t0, seg_l0, seg_t1))
    F = np.asarray(F_all, dtype=np.int64)[j]
    steps = t1 - t0 + 1
    l1 = l0 + steps - 1
    tokens = (l0 + l1) * steps // 2                     # sum of lengths l0..l1
    if cfg.paged:
        B = cfg.block_size
        held = _block_sum(l1, B) - _block_sum(l0 - 1, B)  # slots in blocks, summed over the segment
        fb = F // B * B                                  # past fb, the last block overhangs F
        filled = (_block_sum(np.minimum(l1, fb), B) - _block_sum(np.minimum(l0 - 1, fb), B)
                  + F * np.maximum(0, l1 - np.maximum(l0 - 1, fb)))  # sum of min(held, F)
    else:
        held = np.asarray(A_all, dtype=np.int64)[j] * steps
        filled = F * steps                               # contiguous regions are never smaller than F
    return {"token_states": int(tokens.sum()), "reservation": int((filled - tokens).sum()),
            "internal_fragmentation": int((held - filled).sum())}


def simulate_allocation(workload: Workload, policy: str = "paged", capacity_tokens: int = 15_000,
                        max_seq_len: int = 2048, block_size: int = 16, fit: str = "first",
                        watermark: float = 0.01, record_map: bool = False) -> AllocationResult:
    """Serve `workload` from `capacity_tokens` KV slots under `policy`; see the module docstring.

    Event-driven (100k requests in about a second). With record_map=True the step-by-step
    reference runs instead and the result carries the (capacity, steps) memory map.
    """
    if record_map:
        return simulate_allocation_reference(workload, policy, capacity_tokens, max_seq_len, block_size, fit,
                                             watermark)
    cfg = AllocationConfig(policy, capacity_tokens, max_seq_len, block_size, fit, watermark)
    P, O, arrive, order = _prepare(workload, cfg)
    F = [p + o for p, o in zip(P, O)]
    rejected = cfg.never_fits(workload.total_len).tolist()
    queue = [j for j in order if not rejected[j]]  # rejected ones would leave the head at once
    if cfg.paged:
        return _fast_paged(cfg, workload, P, O, F, arrive, queue)
    return _fast_contiguous(cfg, workload, P, O, F, arrive, queue)


def _fast_contiguous(cfg, wl, P, O, F, arrive, queue):
    """Contiguous regions never change size, so memory changes only at admissions and completions.
    Between two events the holes and the queue head are fixed: external fragmentation is the free
    slots times the steps while the head waits; the rest is summed per request afterwards."""
    n, C = len(P), cfg.capacity_tokens
    A = cfg.region_sizes(F).tolist()
    best = cfg.fit == "best"
    hs, hl = [0], [C]            # holes: starts (sorted) and lengths
    free = C
    done: list = []              # heap of (last step, request, region start)
    admit, finish = [-1] * n, [-1] * n
    ext = busy = peak = 0
    h, nq, s, t_end = 0, len(queue), 0, -1
    if nq:
        s = arrive[queue[0]]
    hist = {0: s}                # batch size -> steps (the steps before the first arrival run nothing)
    while True:
        # admissions at step s
        while h < nq and arrive[queue[h]] <= s:
            j = queue[h]
            size = A[j]
            i = -1
            if best:
                fit_len = C + 1
                for x, length in enumerate(hl):
                    if size <= length < fit_len:
                        i, fit_len = x, length
            else:
                for x, length in enumerate(hl):
                    if length >= size:
                        i = x
                        break
            if i < 0:
                break
            at = hs[i]
            if hl[i] == size:
                del hs[i], hl[i]
            else:
                hs[i] += size
                hl[i] -= size
            free -= size
            admit[j] = s
            heapq.heappush(done, (s + O[j] - 1, j, at))
            h += 1
        running = len(done)
        if running > peak:
            peak = running
        waiting = h < nq and arrive[queue[h]] <= s
        if not done and h >= nq:
            break
        nxt = done[0][0] + 1 if done else arrive[queue[h]]
        if not waiting and h < nq and arrive[queue[h]] < nxt:
            nxt = arrive[queue[h]]
        if waiting:
            ext += free * (nxt - s)          # the head fits no hole: every free slot is stranded
        if running:
            busy += nxt - s
        hist[running] = hist.get(running, 0) + nxt - s
        s = nxt
        # completions at the end of step s - 1: free the region, merge it with neighbouring holes
        while done and done[0][0] < s:
            t, j, at = heapq.heappop(done)
            finish[j] = t
            t_end = t
            size = A[j]
            free += size
            i = bisect_left(hs, at)
            merge_left = i > 0 and hs[i - 1] + hl[i - 1] == at
            merge_right = i < len(hs) and at + size == hs[i]
            if merge_left and merge_right:
                hl[i - 1] += size + hl[i]
                del hs[i], hl[i]
            elif merge_left:
                hl[i - 1] += size
            elif merge_right:
                hs[i] = at
                hl[i] += size
            else:
                hs.insert(i, at)
                hl.insert(i, size)
    adm = [admit[j] for j in queue]
    sums = _segment_sums(cfg, queue, adm, [P[j] + 1 for j in queue], [finish[j] for j in queue], F, A)
    sums["external_fragmentation"] = ext
    running_steps = sum(O[j] for j in queue)
    prefill = sum(P[j] for j in queue)       # contiguous policies never preempt: one prefill per request
    return _result(cfg, wl, sums, t_end + 1, busy, running_steps, peak, 0, prefill, admit, finish,
                   _histogram(hist, peak))


def _fast_paged(cfg, wl, P, O, F, arrive, queue):
    """A running request takes a new block every B steps, at steps s with s % B fixed (its residue),
    so a histogram of residues tells how many blocks any future step asks for: R per B steps. The
    first step short of blocks is found by whole cycles plus a prefix search in the last one.
    Events: admissions, completions, arrivals, the step after a preemption, running out of blocks.
    Each stretch a request runs unpreempted is a segment, summed in closed form afterwards."""
    n, B, N, wm = len(P), cfg.block_size, cfg.num_blocks, cfg.watermark_blocks
    # work in queue positions: request queue[i] is "i" below
    P, O, F, arr = ([x[j] for j in queue] for x in (P, O, F, arrive))
    nq = len(queue)
    free = N                     # free blocks after the current step
    cnt = [0] * (2 * B)          # running requests by the step residue at which they take a block, twice over
    resid = [0] * nq             # request i takes a new block at steps s with s % B == resid[i]
    t0, l0, k0 = [0] * nq, [0] * nq, [0] * nq  # current segment: admitted at t0 with length l0 after k0 tokens
    last = [-1] * nq             # step of its last token in the current segment; -1 while not running
    stack: list[int] = []        # running, oldest first (the newest is preempted first); lazily cleaned
    done: list = []              # heap of (last step, request); lazily cleaned
    front: list[int] = []        # preempted, waiting at the head of the queue; the top is the oldest
    segs: list = []              # (request, t0, l0, t1): one stretch of running without preemption
    admit, finish = [-1] * nq, [-1] * nq
    push, pop = heapq.heappush, heapq.heappop
    R = busy = peak = preemptions = 0
    h, s, t_end = 0, 0, -1
    preempted = not nq           # no admission before the first arrival
    if nq:
        s = arr[0]
    hist = {0: s}                # batch size -> steps (the steps before the first arrival run nothing)
    while True:
        # admissions at step s (its growth is done); an empty GPU ignores the watermark
        if not preempted:
            while True:
                if front:
                    i = front[-1]
                elif h < nq and arr[h] <= s:
                    i = h
                else:
                    break
                length = P[i] + k0[i] + 1
                need = -(-length // B)
                if need > (free - wm if R else free):
                    break
                if front:
                    front.pop()
                else:
                    h += 1
                free -= need
                t0[i] = s
                l0[i] = length
                last[i] = e = s + O[i] - k0[i] - 1
                r = (s - length + 1) % B
                resid[i] = r
                cnt[r] += 1
                cnt[r + B] += 1
                R += 1
                stack.append(i)
                push(done, (e, i))
                if admit[i] < 0:
                    admit[i] = s
            if R > peak:
                peak = R
        while done and last[done[0][1]] != done[0][0]:
            pop(done)
        if not done and not front and h >= nq:
            break
        # the next event: a completion, an arrival, the step after a preemption, or running out of blocks
        nxt = done[0][0] + 1 if done else math.inf
        if not front and h < nq and s < arr[h] < nxt:
            nxt = arr[h]
        if preempted and s + 1 < nxt:
            nxt = s + 1
        if R and nxt - 1 > s and (-(-(nxt - 1 - s) // B)) * R > free:
            q, rem = divmod(free, R)        # q whole cycles of B steps fit; then find the first step short of blocks
            off = (s + 1) % B
            oom = s + q * B + bisect_right(list(accumulate(cnt[off:off + B])), rem) + 1
            if oom < nxt:
                nxt = oom
        if R:
            busy += nxt - s
        hist[R] = hist.get(R, 0) + nxt - s
        # plain growth on steps s+1 .. nxt-1 (nothing else happens there)
        m = nxt - 1 - s
        if m > 0:
            off = (s + 1) % B
            free -= (m // B) * R + sum(cnt[off:off + m % B])
        s = nxt
        # completions at the end of step s - 1
        while done and done[0][0] < s:
            t, i = pop(done)
            if last[i] == t:
                segs.append((i, t0[i], l0[i], t))
                last[i] = -1
                r = resid[i]
                cnt[r] -= 1
                cnt[r + B] -= 1
                R -= 1
                finish[i] = t_end = t
                free += -(-F[i] // B)
        # growth at step s: preempt the newest running requests while the blocks asked for exceed the free ones
        r = s % B
        demand = cnt[r]
        preempted = demand > free
        while demand > free:
            v = stack.pop()
            if last[v] < 0:
                continue                    # finished already
            free += -(-(l0[v] + s - 1 - t0[v]) // B)
            rv = resid[v]
            if rv == r:
                demand -= 1
            segs.append((v, t0[v], l0[v], s - 1))
            last[v] = -1
            cnt[rv] -= 1
            cnt[rv + B] -= 1
            R -= 1
            k0[v] += s - t0[v]
            front.append(v)
            preemptions += 1
        free -= demand

    seg = np.array(segs, dtype=np.int64).reshape(-1, 4)  # (segments, 4)
    sums = _segment_sums(cfg, seg[:, 0], seg[:, 1], seg[:, 2], seg[:, 3], F, None)
    sums["external_fragmentation"] = 0
    running_steps = int((seg[:, 3] - seg[:, 1] + 1).sum())
    prefill = int((seg[:, 2] - 1).sum())    # each segment began with a prefill of prompt + generated tokens
    admit_all, finish_all = np.full(n, -1), np.full(n, -1)
    admit_all[queue], finish_all[queue] = admit, finish
    return _result(cfg, wl, sums, t_end + 1, busy, running_steps, peak, preemptions, prefill, admit_all, finish_all,
                   _histogram(hist, peak))


def _histogram(steps_by_batch: dict, peak: int) -> np.ndarray:
    """(peak + 1,) steps per batch size, from a {batch size: steps} dict."""
    hist = np.zeros(peak + 1, dtype=np.int64)
    for b, steps in steps_by_batch.items():
        hist[b] += steps
    return hist


# ---------------------------------------------------------------------------------------------
# The paper's experiment: its setting, every policy on one trace, the block-size trade-off.
# ---------------------------------------------------------------------------------------------

PAPER_NAMES = {"max-reserve": "Orca (Max)", "pow2": "Orca (Pow2)", "oracle": "Orca (Oracle)", "paged": "vLLM"}
# vLLM paper (Kwon et al., SOSP 2023), Figure 2: where the KV memory went in the §6.2 experiment
# (OPT-13B, A100-40GB, ShareGPT), as the bars read; the last share is "external fragmentation & others".
# The text (§1) gives the Orca range 20.4%-38.2% of token states, and vLLM's 96.3%.
PAPER_FIGURE2 = {
    "max-reserve": dict(token_states=0.204, reservation=0.133, internal_fragmentation=0.573, external_and_others=0.089),
    "pow2": dict(token_states=0.268, reservation=0.179, internal_fragmentation=0.136, external_and_others=0.416),
    "oracle": dict(token_states=0.382, reservation=0.252, internal_fragmentation=0.0, external_and_others=0.366),
    "paged": dict(token_states=0.963, reservation=0.0, internal_fragmentation=0.037, external_and_others=0.0),
}
PAPER_TOKEN_STATES = {policy: shares["token_states"] for policy, shares in PAPER_FIGURE2.items()}


def opt13b_capacity_tokens(kv_gib: float = 12.0) -> int:
    """KV slots in `kv_gib` GiB for OPT-13B in fp16 (the paper's setting: ~12 GB of KV on an A100-40GB)."""
    per_token = kv_bytes_per_token(ModelSpec.preset("opt-13b"))
    allowed = f"a finite number of GiB that holds at least one OPT-13B token ({per_token / GiB:.6f} GiB)"
    kv_gib = checks.in_range("kv_gib", kv_gib, per_token / GiB, math.inf, allowed, high_open=True)
    return int(kv_gib * GiB // per_token)


def run_policies(workload, capacity_tokens: int, max_seq_len: int = 2048, block_size: int = 16,
                 policies=POLICIES) -> dict[str, AllocationResult]:
    """policy -> result, the same workload through each."""
    if isinstance(policies, str):
        raise TypeError(f"policies must be a sequence of policy names (e.g. {POLICIES!r}), got the str {policies!r}")
    return {p: simulate_allocation(workload, p, capacity_tokens, max_seq_len, block_size) for p in policies}


def block_size_sweep(workload, capacity_tokens: int, max_seq_len: int = 2048,
                     block_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> dict[str, np.ndarray]:
    """Paged only, per block size: unfilled share of held slots, block-table entries per request, batch size."""
    slack, entries, batch = [], [], []
    if isinstance(block_sizes, (str, int, np.integer)):
        raise TypeError(f"block_sizes must be a sequence of integers (e.g. (1, 16, 256)), got {block_sizes!r}")
    for b in block_sizes:
        r = simulate_allocation(workload, "paged", capacity_tokens, max_seq_len, b)
        s = r.slot_steps
        held = s["token_states"] + s["reservation"] + s["internal_fragmentation"]
        slack.append((held - s["token_states"]) / held if held else 0.0)  # the unfilled tail of last blocks
        entries.append(held / b / r.running_steps if r.running_steps else 0.0)  # blocks = table entries
        batch.append(r.mean_batch_size)
    return {"block_size": np.array(block_sizes), "unfilled_share": np.array(slack),
            "table_entries": np.array(entries), "mean_batch_size": np.array(batch)}


def rate_sweep(workload, rates, capacity_tokens: int, max_seq_len: int = 2048, block_size: int = 16,
               policies=POLICIES, seed: int = 0, progress: bool = False) -> dict:
    """Latency against request rate (the shape of the vLLM paper's Figure 12): the workload's lengths
    re-timed as Poisson arrivals at each rate, through each policy. Returns {"rate": (r,),
    policy: {"normalized_latency": (r,), "throughput": (r,)}}: mean steps per output token, and
    completed requests per step. Past a policy's service rate the queue grows without bound, and
    the latency then depends on the length of the trace: only the knee is a property of the policy."""
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a kvlab.workloads.Workload, got {type(workload).__name__}")
    if isinstance(policies, str):
        raise TypeError(f"policies must be a sequence of policy names (e.g. {POLICIES!r}), got the str {policies!r}")
    rates = np.asarray(rates, dtype=np.float64)
    if rates.ndim != 1 or not len(rates) or not np.all(np.isfinite(rates) & (rates > 0)):
        raise ValueError(f"rates must be a 1-D sequence of positive finite requests per step, got {rates!r}")
    out: dict = {"rate": rates}
    runs = [(p, i) for p in policies for i in range(len(rates))]
    if progress:
        from tqdm.auto import tqdm
        runs = tqdm(runs, desc="policies x rates")
    for policy, i in runs:
        if i == 0:
            out[policy] = {"normalized_latency": np.zeros(len(rates)), "throughput": np.zeros(len(rates))}
        r = simulate_allocation(workload.with_arrivals(float(rates[i]), seed), policy, capacity_tokens,
                                max_seq_len, block_size)
        out[policy]["normalized_latency"][i] = r.normalized_latency
        out[policy]["throughput"][i] = r.throughput
    return out


# ---------------------------------------------------------------------------------------------
# What a run costs: a stated model, so that policies are compared in seconds, not only per step.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServingCost:
    """Modeled GPU time of a run, by part (seconds); see `serving_cost`."""
    weight_seconds: float       # every step reads all weights once
    kv_seconds: float           # every step reads its running requests' cached K/V
    prefill_seconds: float      # every prefilled token (recomputed ones included) at the compute peak
    requests: int               # completed requests

    @property
    def seconds(self) -> float:
        return self.weight_seconds + self.kv_seconds + self.prefill_seconds

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def serving_cost(spec: ModelSpec, *, steps: int, kv_tokens_read: int, prefill_tokens: int, requests: int = 0,
                 gpu: GpuPeak = H100_SXM, dtype: str = "float16") -> ServingCost:
    """A roofline cost model of serving, in three terms:

        steps x weight bytes / bandwidth           a decode step reads every weight once (memory-bound)
      + kv_tokens_read x KV bytes/token / bandwidth  and the cached K/V of every running request
      + prefill_tokens x 2 x num_params / FLOP/s    a prefilled token costs 2 FLOPs per parameter (compute-bound)

    Decode FLOPs are left out (below the ridge, ~295 requests a step on an H100, reading the bytes
    takes longer), and so are prefill's attention FLOPs and launch overheads: the model charges what
    grows with the batch and with recomputation, which is what per-step comparisons ignore.
    steps: decode steps that ran anything; kv_tokens_read: cached tokens summed over those steps;
    prefill_tokens: tokens prefilled, recomputation after preemption included.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a kvlab.ModelSpec (e.g. kvlab.ModelSpec.preset('opt-13b')), "
                        f"got {type(spec).__name__}")
    if not isinstance(gpu, GpuPeak):
        raise TypeError(f"gpu must be a kvlab.model.flops.GpuPeak (e.g. H100_SXM), got {type(gpu).__name__}")
    steps, kv_tokens_read, prefill_tokens, requests = (
        checks.integer(name, v, minimum=0) for name, v in (("steps", steps), ("kv_tokens_read", kv_tokens_read),
                                                           ("prefill_tokens", prefill_tokens), ("requests", requests)))
    bandwidth, flops = gpu.memory_tb_per_s * 1e12, gpu.bf16_tflops * 1e12
    return ServingCost(weight_seconds=steps * weight_bytes(spec, dtype) / bandwidth,
                       kv_seconds=kv_tokens_read * kv_bytes_per_token(spec, dtype) / bandwidth,
                       prefill_seconds=prefill_tokens * 2 * spec.num_params / flops,
                       requests=requests)
