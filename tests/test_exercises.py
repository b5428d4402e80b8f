"""kvlab.exercises (issue 18): the checks are trustworthy, and the exercise notebooks run.

For every exercise: its solution passes its check; the stub as committed (raising
NotImplementedError) gets "not implemented yet"; and plausible wrong answers fail with a hint that
names the mistake (each wrong answer below says which hint it must get). The exercise notebooks
run top to bottom with the solutions substituted for the stubs (every check cell then reports a
pass), and as committed every check cell reports "not implemented yet" (nbval re-runs them in
`make test`; here the committed outputs are read, and held to the same machine-independence rule
as the chapters' notebooks).
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvlab.exercises import EXERCISES, exercise, show_solution, solution_source
from kvlab.exercises.harness import FAILED, NOT_IMPLEMENTED, PASSED

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks" / "exercises"
CHAPTERS = ["01_forward_pass", "02_prefill_vs_decode", "03_kv_cache_memory", "04_fragmentation",
            "05_paged_allocator", "06_triton_kernel", "07_continuous_batching", "08_inference_service"]
BUILT = [c for c in CHAPTERS if (NOTEBOOKS / f"{c}.ipynb").exists()]


def check_of(ex):
    return getattr(importlib.import_module(ex.module), ex.check)


def solution_of(ex):
    module = importlib.import_module(ex.solution_module)
    return [getattr(module, name) for name in ex.names]


def implemented(ex) -> bool:
    try:
        check_of(ex), solution_of(ex)
    except (ImportError, AttributeError):
        return False
    return True


READY = [e for e in EXERCISES if implemented(e)]


@pytest.fixture(autouse=True)
def _one_thread():
    """The checks' tensors are tiny: one thread is as fast, and the shared CI machine stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- every solution passes; every stub is "not implemented yet" ----------------------------------

@pytest.mark.parametrize("ex", READY, ids=[e.id for e in READY])
def test_solution_passes(ex):
    verdict = check_of(ex)(*solution_of(ex))
    assert verdict.status == PASSED, verdict.message
    assert verdict.message.startswith(f"✓ {ex.id} ")


def _stub_function(*args, **kwargs):
    raise NotImplementedError("your code here")


class _StubClass:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("your code here")


STUBBED = [e for e in READY if e.id != "06.3"]     # the kernel's stub is the notebook's own cell (tested below)


@pytest.mark.parametrize("ex", STUBBED, ids=[e.id for e in STUBBED])
def test_stub_is_not_implemented_yet(ex):
    stubs = [(_StubClass if isinstance(obj, type) else _stub_function) for obj in solution_of(ex)]
    verdict = check_of(ex)(*stubs)
    assert verdict.status == NOT_IMPLEMENTED, verdict.message
    assert "not implemented yet" in verdict.message and "run this cell again" in verdict.message


def test_every_exercise_has_a_check_and_a_solution():
    assert [e.id for e in READY] == [e.id for e in EXERCISES]


def test_every_chapter_has_an_exercise_notebook():
    assert BUILT == CHAPTERS, f"missing: {sorted(set(CHAPTERS) - set(BUILT))}"


def test_show_solution_prints_the_solution(capsys):
    show_solution("attention_head")
    out = capsys.readouterr().out
    assert "def attention_head" in out and "solutions/ch01.py" in out
    assert "@triton.jit" in solution_source("06.3") and "def continuous_steps" in solution_source("static_steps")
    assert exercise("01.1") is exercise("attention_head")
    with pytest.raises(ValueError, match="no exercise"):
        exercise("99.9")


def test_stored_greedy_tokens_are_hugging_face_generate_with_no_near_ties():
    """02.2 compares with 16 tokens of Hugging Face's generate stored in kvlab.exercises.ch02 (so that the check
    costs one generation, not two): they must be HF's, and no step may be a near-tie that another CPU could
    break the other way."""
    from kvlab.exercises.ch02 import SMOLLM2_GREEDY_16
    from kvlab.exercises.models import PROMPT, smollm2

    lm, _ = smollm2()
    ids = torch.tensor([lm.encode(PROMPT)])
    out = lm.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False, pad_token_id=lm.tokenizer.eos_token_id, output_scores=True,
                               return_dict_in_generate=True)
    assert out.sequences[0, ids.shape[1]:].tolist() == SMOLLM2_GREEDY_16
    margins = [float(top[0, 0] - top[0, 1]) for top in (s.topk(2).values for s in out.scores)]
    assert min(margins) > 0.1, margins


def test_a_check_refuses_what_is_not_a_function():
    from kvlab.exercises import ch03
    verdict = ch03.check_kv_bytes_per_token(46080)
    assert verdict.status == FAILED and "Pass the function itself" in verdict.message


# ---- wrong answers fail, and the hint names the mistake ------------------------------------------
# (exercise id, what the wrong answer does, the answer, words the verdict's hint must contain)

def _sol(chapter: str):
    return importlib.import_module(f"kvlab.exercises.solutions.ch{chapter}")


def _head_no_mask(q, k, v):
    return (q @ k.T / math.sqrt(q.shape[-1])).softmax(-1) @ v


def _head_future(q, k, v):
    T = q.shape[0]
    s = (q @ k.T / math.sqrt(q.shape[-1])).masked_fill(~torch.ones(T, T, dtype=torch.bool).triu(), float("-inf"))
    return s.softmax(-1) @ v


def _head_no_shift(q, k, v):
    T = q.shape[0]
    s = (q @ k.T / math.sqrt(q.shape[-1])).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    e = s.exp()
    return e / e.sum(-1, keepdim=True) @ v


def _heads_modulo(q, k, v):
    return torch.stack([_sol("01").attention_head(q[:, h], k[:, h % k.shape[1]], v[:, h % k.shape[1]])
                        for h in range(q.shape[1])], 1)


def _heads_no_gqa(q, k, v):
    return torch.stack([_sol("01").attention_head(q[:, h], k[:, h], v[:, h]) for h in range(q.shape[1])], 1)


def _ffn_norm_over_tokens(x, layer):
    h = x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + layer.ffn_norm.eps) * layer.ffn_norm.weight
    return layer.down(F.silu(layer.gate(h)) * layer.up(h))


def _ffn_silu_on_up(x, layer):
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.ffn_norm.eps) * layer.ffn_norm.weight
    return layer.down(layer.gate(h) * F.silu(layer.up(h)))


def _ffn_no_norm(x, layer):
    return layer.down(F.silu(layer.gate(x)) * layer.up(x))


class _CacheTopLeft:
    """Appends, but masks with is_causal=True: right for a prefill, wrong after a context."""

    def __init__(self, num_layers):
        self.k, self.v = [None] * num_layers, [None] * num_layers

    def __call__(self, i, q, k, v, positions):
        from kvlab.model.attention import sdpa
        self.k[i] = k if self.k[i] is None else torch.cat([self.k[i], k], 1)
        self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v], 1)
        return sdpa(q, self.k[i], self.v[i], is_causal=True)


class _CacheOverwrite(_CacheTopLeft):
    def __call__(self, i, q, k, v, positions):
        from kvlab.model.attention import sdpa
        self.k[i], self.v[i] = k, v
        return sdpa(q, k, v, is_causal=True)


class _CacheNoMask(_CacheTopLeft):
    def __call__(self, i, q, k, v, positions):
        from kvlab.model.attention import sdpa
        self.k[i] = k if self.k[i] is None else torch.cat([self.k[i], k], 1)
        self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v], 1)
        return sdpa(q, self.k[i], self.v[i])


def _greedy_without_positions(model, prompt, n):
    cache = _sol("02").KVCache(model.spec.num_layers)
    logits, out = model(torch.tensor([prompt]), attn=cache), []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), attn=cache)
    return out


def _greedy_without_cache(model, prompt, n):
    logits, out = model(torch.tensor([prompt])), []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]))                  # the last token alone: the context is lost
    return out


def _greedy_with_prompt(model, prompt, n):
    return list(prompt) + _sol("02").greedy_decode(model, prompt, n)


BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "fp8": 8, "int8": 8, "int4": 4}


def _bytes_query_heads(spec, dtype):
    return spec.num_layers * 2 * spec.num_heads * spec.head_dim * BITS[dtype] // 8


def _bytes_no_mla(spec, dtype):
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * BITS[dtype] // 8


def _bytes_floor(spec, dtype):
    width = spec.kv_lora_rank + spec.qk_rope_head_dim if spec.attention == "mla" else 2 * spec.num_kv_heads * spec.head_dim
    return spec.num_layers * width * BITS[dtype] // 8


def _requests(spec, gpu_bytes, context_len, weight_dtype, kv_dtype, gpu_memory_utilization, reserve_bytes, *,
              weights=True, window=True, floor=True):
    usable = int(gpu_bytes * gpu_memory_utilization)
    budget = usable - (-(-spec.num_params * BITS[weight_dtype] // 8) if weights else 0) - reserve_bytes
    budget = max(0, budget) if floor else budget
    cached = min(context_len, spec.sliding_window) if (window and spec.sliding_window) else context_len
    return budget // (_sol("03").kv_bytes_per_token(spec, kv_dtype) * cached)


def _tp_no_replication(spec, dtype, tp):
    s = _sol("03")
    return s.kv_bytes_per_token(spec, dtype) if spec.attention == "mla" else \
        spec.num_layers * 2 * (spec.num_kv_heads // tp) * spec.head_dim * BITS[dtype] // 8


def _tp_split_mla(spec, dtype, tp):
    return _sol("03").kv_bytes_per_token(spec, dtype) // tp if spec.attention == "mla" else \
        _sol("03").kv_bytes_per_token_tp(spec, dtype, tp)


def _slots_extra_block(policy, n, F, M, b):
    return (n // b + 1) * b if policy == "paged" else _sol("04").slots_held(policy, n, F, M, b)


def _slots_uncapped(policy, n, F, M, b):
    return 1 << (F - 1).bit_length() if policy == "pow2" else _sol("04").slots_held(policy, n, F, M, b)


def _slots_pow2_of_tokens(policy, n, F, M, b):
    return min(1 << (n - 1).bit_length(), M) if policy == "pow2" else _sol("04").slots_held(policy, n, F, M, b)


def _breakdown_without_first_token(policy, P, O, step, M, b):
    tokens, final = P + step, P + O
    held = _sol("04").slots_held(policy, tokens, final, M, b)
    return {"token_states": tokens, "reservation": min(held, final) - tokens,
            "internal_fragmentation": held - min(held, final)}


def _breakdown_swapped(policy, P, O, step, M, b):
    d = _sol("04").breakdown(policy, P, O, step, M, b)
    return {"token_states": d["token_states"], "reservation": d["internal_fragmentation"],
            "internal_fragmentation": d["reservation"]}


def _breakdown_paged_tail_reserved(policy, P, O, step, M, b):
    d = _sol("04").breakdown(policy, P, O, step, M, b)
    if policy == "paged":
        d = {"token_states": d["token_states"], "reservation": d["reservation"] + d["internal_fragmentation"],
             "internal_fragmentation": 0}
    return d


def _shares_mean_of_fractions(policy, P, O, M, b):
    out = dict.fromkeys(("token_states", "reservation", "internal_fragmentation"), 0.0)
    for step in range(O):
        d = _sol("04").breakdown(policy, P, O, step, M, b)
        for key, value in d.items():
            out[key] += value / sum(d.values()) / O
    return out


def _shares_without_first_token(policy, P, O, M, b):
    totals = dict.fromkeys(("token_states", "reservation", "internal_fragmentation"), 0)
    for step in range(O):
        for key, value in _breakdown_without_first_token(policy, P, O, step, M, b).items():
            totals[key] += value
    return {key: value / sum(totals.values()) for key, value in totals.items()}


def _slots_contiguous(table, positions, bs):
    return [table[0] * bs + p for p in positions]


def _slots_no_multiply(table, positions, bs):
    return [table[p // bs] + p % bs for p in positions]


def _hashes_unchained(tokens, bs):
    from kvlab.paged import block_hash
    return [block_hash(-1, tokens[i * bs:(i + 1) * bs]) for i in range(len(tokens) // bs)]


def _hashes_with_partial_block(tokens, bs):
    from kvlab.paged import block_hash
    out, prev = [], -1
    for i in range(-(-len(tokens) // bs)):
        prev = block_hash(prev, tokens[i * bs:(i + 1) * bs])
        out.append(prev)
    return out


def _cached_with_last_block(computed, prompt, bs):
    names = {h for p in computed for h in _sol("05").prefix_block_hashes(p, bs)}
    hits = 0
    for h in _sol("05").prefix_block_hashes(prompt, bs):          # len // bs: the last token's block included
        if h not in names:
            break
        hits += 1
    return hits * bs


def _cached_longest_common_prefix(computed, prompt, bs):
    best = 0
    for p in computed:
        n = 0
        while n < min(len(p), len(prompt)) and p[n] == prompt[n]:
            n += 1
        best = max(best, n)
    return best


def _cached_unchained(computed, prompt, bs):
    names = {h for p in computed for h in _hashes_unchained(p, bs)}
    hits = 0
    for h in _hashes_unchained(prompt, bs)[: (len(prompt) - 1) // bs]:
        if h not in names:
            break
        hits += 1
    return hits * bs


def _allocator(**changes):
    """The solution's Allocator with one method replaced: a learner's single mistake."""
    return type("WrongAllocator", (_sol("05").Allocator,), changes)


def _append_late(self, sid):
    table, n = self.tables[sid], self.lengths[sid]
    if (n + 1) % self.block_size == 0:                           # checks the length after the append
        table.append(self._take())
    elif self.refs[table[-1]] > 1:
        new = self._take()
        self.refs[table[-1]] -= 1
        self.copies.append((table[-1], new))
        table[-1] = new
    self.lengths[sid] = n + 1
    return table[-1] * self.block_size + n % self.block_size


def _append_no_cow(self, sid):
    table, n = self.tables[sid], self.lengths[sid]
    if n % self.block_size == 0:
        if not self.free_queue:
            raise MemoryError
        table.append(self._take())
    self.lengths[sid] = n + 1
    return table[-1] * self.block_size + n % self.block_size


def _free_first_block_first(self, sid):
    for block in self.tables.pop(sid):
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free_queue.append(block)
    del self.lengths[sid]


def _fork_without_refs(self, parent, child):
    self.tables[child], self.lengths[child] = list(self.tables[parent]), self.lengths[parent]
    return list(self.tables[child])


def _allocate_partially(self, sid, n):
    self.tables[sid], self.lengths[sid] = [], n
    for _ in range(-(-n // self.block_size)):
        if not self.free_queue:
            raise MemoryError("out of blocks, half-way")
        self.tables[sid].append(self._take())
    return list(self.tables[sid])


def _paged_kv_head_modulo(q, k_cache, v_cache, block_tables, seq_lens, scale):
    out = torch.zeros_like(q)
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    for s in range(q.shape[0]):
        n = int(seq_lens[s])
        if n:
            blocks = block_tables[s, : -(-n // bs)].long()
            k, v = k_cache[blocks].flatten(0, 1)[:n], v_cache[blocks].flatten(0, 1)[:n]
            for h in range(q.shape[1]):
                out[s, h] = (k[:, h % hkv] @ q[s, h] * scale).softmax(0) @ v[:, h % hkv]
    return out


def _paged_whole_last_block(q, k_cache, v_cache, block_tables, seq_lens, scale):
    out = torch.zeros_like(q)
    bs, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    for s in range(q.shape[0]):
        n = int(seq_lens[s])
        if n:
            blocks = block_tables[s, : -(-n // bs)].long()
            k, v = k_cache[blocks].flatten(0, 1), v_cache[blocks].flatten(0, 1)     # the stale tail included
            for h in range(q.shape[1]):
                out[s, h] = (k[:, h // group] @ q[s, h] * scale).softmax(0) @ v[:, h // group]
    return out


def _paged_ignores_the_table(q, k_cache, v_cache, block_tables, seq_lens, scale):
    out = torch.zeros_like(q)
    bs, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    for s in range(q.shape[0]):
        n = int(seq_lens[s])
        if n:
            blocks = torch.arange(-(-n // bs))                                     # logical = physical
            k, v = k_cache[blocks].flatten(0, 1)[:n], v_cache[blocks].flatten(0, 1)[:n]
            for h in range(q.shape[1]):
                out[s, h] = (k[:, h // group] @ q[s, h] * scale).softmax(0) @ v[:, h // group]
    return out


def _merge_without_shift(o, m, l):
    w = l * torch.exp(m)
    return (w[:, None] * o).sum(0) / w.sum()


def _merge_without_l(o, m, l):
    w = torch.exp(m - m.max())
    return (w[:, None] * o).sum(0) / w.sum()


def _merge_without_m(o, m, l):
    return (l[:, None] * o).sum(0) / l.sum()


def _kernel_variant(tmp_path_factory, old: str, new: str):
    """The solution's kernel with one line changed, imported from a file (Triton reads a kernel's source)."""
    src = Path(importlib.import_module("kvlab.exercises.solutions.ch06").__file__).read_text()
    assert src.count(old) == 1, old
    folder = tmp_path_factory.mktemp("kernel")
    name = f"wrong_kernel_{abs(hash((old, new)))}"
    (folder / f"{name}.py").write_text(src.replace(old, new))
    import sys
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name).paged_attention_kernel
    finally:
        sys.path.remove(str(folder))


KERNEL_MISTAKES = [
    ("acc not rescaled by alpha", "acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)",
     "acc = acc + tl.sum(p[:, None] * v, axis=0)", "accumulator is not rescaled"),
    ("l_i not rescaled by alpha", "l_i = l_i * alpha + tl.sum(p, axis=0)", "l_i = l_i + tl.sum(p, axis=0)",
     "l_i is not rescaled"),
    ("the logical block used as the physical one",
     "block = tl.load(block_tables_ptr + seq * max_blocks + tok // BLOCK_SIZE, mask=mask, other=0)",
     "block = tok // BLOCK_SIZE", "block_tables[s, i]"),
    ("no -inf for the tokens past seq_len", 's = tl.where(mask, s, float("-inf"))', "s = s", "not -inf"),
    ("GQA by modulo", "kv_head = head // (num_heads // num_kv_heads)", "kv_head = head % num_kv_heads",
     "h // (num_heads // num_kv_heads)"),
]


@pytest.mark.parametrize("what, old, new, hint", KERNEL_MISTAKES, ids=[k[0] for k in KERNEL_MISTAKES])
def test_wrong_kernel_fails_with_a_hint(tmp_path_factory, what, old, new, hint):
    from kvlab.exercises import ch06
    verdict = ch06.check_paged_attention_kernel(_kernel_variant(tmp_path_factory, old, new))
    assert verdict.status == FAILED, f"{what}: {verdict.message}"
    assert hint in (verdict.hint or ""), f"{what}: {verdict.hint!r}"


def test_the_notebook_kernel_stub_is_not_implemented_yet(tmp_path):
    """The stub cell as committed (blanks marked TODO) compiles to a kernel the check calls unfinished."""
    from kvlab.exercises import ch06
    cell = next(c for c in _cells("06_triton_kernel") if c["metadata"].get("kvlab_exercise") == "06.3")
    (tmp_path / "stub_kernel.py").write_text("import kvlab\nimport triton\nimport triton.language as tl\n\n"
                                             + "".join(cell["source"]))
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        kernel = importlib.import_module("stub_kernel").paged_attention_kernel
    finally:
        sys.path.remove(str(tmp_path))
    verdict = ch06.check_paged_attention_kernel(kernel)
    assert verdict.status == NOT_IMPLEMENTED and "7 blanks (TODO) left" in verdict.message


def _text_line_by_chunk(chunks):
    """Splits each chunk into lines by itself: an event cut between two chunks is lost or broken."""
    out = []
    for chunk in chunks:
        for line in chunk.split(b"\n"):
            if line.startswith(b"data: "):
                if line[6:] == b"[DONE]":
                    return "".join(out)
                message = json.loads(line[6:])
                if message["choices"]:
                    out.append(message["choices"][0].get("text") or "")
    return "".join(out)


def _text_without_usage_skip(chunks):
    out = []
    for line in b"".join(chunks).split(b"\n"):
        if line.startswith(b"data: "):
            if line[6:] == b"[DONE]":
                break
            out.append(json.loads(line[6:])["choices"][0]["text"])       # the usage chunk has no choices
    return "".join(out)


def _text_done_anywhere(chunks):
    data = b"".join(chunks)
    data = data[: data.index(b"[DONE]")]                                  # the text itself may hold [DONE]
    out = []
    for event in data.split(b"\n\n"):
        if event.startswith(b"data: {"):
            choices = json.loads(event[6:])["choices"]
            if choices:
                out.append(choices[0].get("text") or "")
    return "".join(out)


def _latencies(start, lines, *, per_token=True, skip_usage=True):
    ttft, itls, last = None, [], None
    for t, line in lines:
        if not line.startswith(b"data: {"):
            continue
        choices = json.loads(line[6:])["choices"]
        if not choices and skip_usage:
            continue
        k = len(choices[0].get("token_ids") or ()) if choices else 1
        if ttft is None:
            ttft = t - start
        else:
            itls += [(t - last) / k] * k if per_token else [t - last]
        last = t
    return ttft, itls


def _static_perfect_packing(lens, b):
    return -(-sum(lens) // b)


def _static_longest_overall(lens, b):
    return max(lens) * -(-len(lens) // b)


def _continuous_perfect_packing(lens, b):
    return -(-sum(lens) // b)


def _continuous_step_lost_per_request(lens, b):
    rows = [0] * min(b, len(lens))
    for n in lens:
        rows[rows.index(min(rows))] += n + 1                         # the row waits a step before its next request
    return max(rows) - 1


def _scheduler(*, admissions_first=False, oldest_victim=False, admit_after_preemption=False, no_watermark=False,
               floor_blocks=False, whole_prompt=False):
    """A scheduler step with one mistake switched on (each flag is one plausible slip)."""
    from kvlab.exercises.ch07 import StepPlan

    def step(running, waiting, free, limits):
        bs, budget, plan = limits.block_size, limits.token_budget, StepPlan()
        blocks = (lambda n: n // bs) if floor_blocks else (lambda n: -(-n // bs))
        running, waiting = list(running), list(waiting)
        earlier = list(running)

        def admit():
            nonlocal free, budget
            while (admit_after_preemption or not plan.preempted) and waiting and budget > 0:
                head = waiting[0]
                watermark = 0 if no_watermark or not running else limits.watermark_blocks
                if len(running) + 1 > limits.max_running or blocks(head.num_tokens) > free - watermark:
                    break
                waiting.pop(0)
                free -= blocks(head.num_tokens)
                running.append(head)
                plan.scheduled[head.request_id] = head.num_tokens if whole_prompt else min(head.num_tokens, budget)
                budget -= plan.scheduled[head.request_id]

        if admissions_first:
            admit()
        for seq in earlier:                                            # decodes
            if seq not in running or seq.num_slots > seq.num_computed:
                continue
            if budget <= 0:
                break
            needs = seq.num_slots % bs == 0
            while needs and free == 0:
                victim = running.pop(0 if oldest_victim else -1)
                free += -(-victim.num_slots // bs)
                plan.preempted.append(victim.request_id)
                if victim is seq:
                    break
            if seq not in running:
                continue
            free -= needs
            plan.scheduled[seq.request_id] = 1
            budget -= 1
        for seq in earlier:                                            # chunks
            left = seq.num_slots - seq.num_computed
            if seq in running and left > 0 and budget > 0 and seq.request_id not in plan.scheduled:
                plan.scheduled[seq.request_id] = min(left, budget)
                budget -= plan.scheduled[seq.request_id]
        if not admissions_first:
            admit()
        return plan
    return step


WRONG = [
    ("01.1", "no causal mask", _head_no_mask, "no causal mask"),
    ("01.1", "the upper triangle masked in", _head_future, "wrong triangle"),
    ("01.1", "softmax by hand, no max shift", _head_no_shift, "Subtract each row's maximum"),
    ("01.2", "KV head h % Hkv (k.repeat)", _heads_modulo, "h // (Hq // Hkv)"),
    ("01.2", "no GQA: KV head h", _heads_no_gqa, "fewer heads than q"),
    ("01.3", "RMSNorm over the tokens", _ffn_norm_over_tokens, "averages over the tokens"),
    ("01.3", "SiLU on up", _ffn_silu_on_up, "SiLU goes on the gate"),
    ("01.3", "no RMSNorm", _ffn_no_norm, "skips the RMSNorm"),
    ("02.1", "is_causal=True after a context", _CacheTopLeft, "top-left corner"),
    ("02.1", "overwrites instead of appending", _CacheOverwrite, "overwrites instead of appending"),
    ("02.1", "no mask at all", _CacheNoMask, "without a causal mask"),
    ("02.2", "decode steps without positions", _greedy_without_positions, "without its position"),
    ("02.2", "the last token without the cache", _greedy_without_cache, "without the cache"),
    ("02.2", "returns the prompt too", _greedy_with_prompt, "only the new tokens"),
    ("03.1", "num_heads instead of num_kv_heads (no GQA division)", _bytes_query_heads, "only the KV heads"),
    ("03.1", "MLA counted as K and V heads", _bytes_no_mla, "MLA caches no per-head K and V"),
    ("03.1", "int4 rounded down", _bytes_floor, "Round up"),
    ("03.2", "weights not subtracted", lambda *a, **k: _requests(*a, **k, weights=False), "subtract the weights"),
    ("03.2", "sliding window ignored", lambda *a, **k: _requests(*a, **k, window=False), "sliding_window"),
    ("03.2", "negative budget not floored", lambda *a, **k: _requests(*a, **k, floor=False), "never negative"),
    ("03.3", "KV heads divided past one per GPU", _tp_no_replication, "replicated"),
    ("03.3", "MLA's latent split over GPUs", _tp_split_mla, "latent is shared"),
    ("04.1", "one block too many at a block boundary", _slots_extra_block, "Off by one block"),
    ("04.1", "pow2 not capped at max_seq_len", _slots_uncapped, "Cap the region"),
    ("04.1", "pow2 of the tokens so far", _slots_pow2_of_tokens, "reserved once, at admission"),
    ("04.2", "admission without the first output token", _breakdown_without_first_token, "first output token"),
    ("04.2", "reservation and internal swapped", _breakdown_swapped, "swapped"),
    ("04.2", "a paged tail past the final length counted as reservation", _breakdown_paged_tail_reserved,
     "never filled"),
    ("04.3", "mean of per-step fractions", _shares_mean_of_fractions, "averaged each step's fractions"),
    ("04.3", "tokens without the first output token", _shares_without_first_token, "first output token"),
    ("05.1", "contiguous from the first block", _slots_contiguous, "contiguous"),
    ("05.1", "block id not multiplied by block_size", _slots_no_multiply, "multiply by block_size"),
    ("05.2", "each block hashed alone (not chained)", _hashes_unchained, "Chain the hashes"),
    ("05.2", "the partial last block hashed too", _hashes_with_partial_block, "Only full blocks"),
    ("05.3", "the last token's block counted as a hit", _cached_with_last_block, "never a hit"),
    ("05.3", "matching tokens instead of whole blocks", _cached_longest_common_prefix, "whole blocks"),
    ("05.3", "equal blocks matched without the chain", _cached_unchained, "follow the chain"),
    ("05.4", "a new block one append early (off by one)", _allocator(append=_append_late), "Off by one"),
    ("05.4", "no copy-on-write", _allocator(append=_append_no_cow), "Copy-on-write"),
    ("05.4", "freed blocks returned first block first", _allocator(free=_free_first_block_first),
     "last block first"),
    ("05.4", "fork without reference counts", _allocator(fork=_fork_without_refs), "reference count"),
    ("05.4", "an allocation that does not fit takes blocks anyway", _allocator(allocate=_allocate_partially),
     "changed its state anyway"),
    ("06.1", "KV head h % Hkv", _paged_kv_head_modulo, "h // (num_heads // num_kv_heads)"),
    ("06.1", "the stale tail of the last block attended", _paged_whole_last_block, "stale values"),
    ("06.1", "logical block read as physical", _paged_ignores_the_table, "block_tables[s, i]"),
    ("06.2", "a merge without the max shift", _merge_without_shift, "overflowed"),
    ("06.2", "weights without l_i", _merge_without_l, "whole softmax mass"),
    ("06.2", "weights without the max m_i", _merge_without_m, "different maxima"),
    ("07.2", "admits before the decodes", _scheduler(admissions_first=True), "Admissions come last"),
    ("07.2", "preempts the oldest", _scheduler(oldest_victim=True), "NEWEST"),
    ("07.2", "admits in a step that preempted", _scheduler(admit_after_preemption=True), "No admissions"),
    ("07.2", "no watermark", _scheduler(no_watermark=True), "watermark"),
    ("07.2", "blocks rounded down at admission (off by one)", _scheduler(floor_blocks=True), "partly filled last block"),
    ("07.2", "a whole prompt in one step past the budget", _scheduler(whole_prompt=True), "token budget"),
    ("08.1", "lines split per chunk (no buffer)", _text_line_by_chunk, "buffer the bytes"),
    ("08.1", "the usage chunk not skipped", _text_without_usage_skip, "skip chunks without choices"),
    ("08.1", "stops at [DONE] anywhere in the bytes", _text_done_anywhere, "do not search the bytes"),
    ("08.2", "one latency per event, not per token", lambda s, l: _latencies(s, l, per_token=False),
     "several tokens"),
    ("08.2", "the usage chunk counted as a token event", lambda s, l: _latencies(s, l, skip_usage=False),
     "usage chunk"),
]


WRONG_PAIRS = [  # 07.1 takes two functions: (static, continuous)
    ("07.1", "static: perfect packing", (_static_perfect_packing, _sol("07").continuous_steps), "LONGEST"),
    ("07.1", "static: the longest of all for every batch", (_static_longest_overall, _sol("07").continuous_steps),
     "max per batch"),
    ("07.1", "continuous: perfect packing", (_sol("07").static_steps, _continuous_perfect_packing), "simulate the rows"),
    ("07.1", "continuous: a step lost between two requests on a row",
     (_sol("07").static_steps, _continuous_step_lost_per_request), "very next step"),
]


@pytest.mark.parametrize("ex_id, what, answer, hint", WRONG + WRONG_PAIRS,
                         ids=[f"{w[0]} {w[1]}" for w in WRONG + WRONG_PAIRS])
def test_wrong_answer_fails_with_a_hint_at_the_mistake(ex_id, what, answer, hint):
    ex = exercise(ex_id)
    verdict = check_of(ex)(*answer) if isinstance(answer, tuple) else check_of(ex)(answer)
    assert verdict.status == FAILED, f"{what}: {verdict.message}"
    assert verdict.message.startswith(f"✗ {ex.id} ") and "expected" in verdict.message, verdict.message
    assert verdict.hint and hint in verdict.hint, f"{what}: hint {verdict.hint!r} lacks {hint!r}"


def test_every_exercise_has_at_least_two_wrong_answers():
    counts = {e.id: sum(1 for w in WRONG + WRONG_PAIRS if w[0] == e.id) for e in READY}
    counts["06.3"] = len(KERNEL_MISTAKES)
    assert all(n >= 2 for n in counts.values()), counts


# ---- the notebooks -------------------------------------------------------------------------------

def _cells(name: str) -> list[dict]:
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"]


def _text(output: dict) -> str:
    if output["output_type"] == "stream":
        return "".join(output["text"])
    return "".join(output.get("data", {}).get("text/plain", ""))


@pytest.mark.parametrize("name", BUILT)
def test_notebook_shape(name):
    """2-4 exercises, each a stub cell tagged with its id, then a check cell; hints in <details>; a chapter
    pointer; an interview prompt with a collapsed model answer; "What to remember" last."""
    cells = _cells(name)
    stubs = [c for c in cells if "exercise-stub" in c["metadata"].get("tags", [])]
    ids = [c["metadata"]["kvlab_exercise"] for c in stubs]
    assert ids == [e.id for e in EXERCISES if e.chapter == name[:2]] and 2 <= len(ids) <= 4
    for stub in stubs:
        i = cells.index(stub)
        assert "exercise-check" in cells[i + 1]["metadata"].get("tags", []), f"{name}: no check after {stub}"
        assert "<details><summary>Hint 1</summary>" in "".join(cells[i + 2]["source"])
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert f"(../{name}.ipynb)" in text and text.count("*Practises chapter") == len(ids)
    assert "## Explain it in two minutes" in text and "<details><summary>A model answer</summary>" in text
    assert cells[-1]["cell_type"] == "markdown" and "".join(cells[-1]["source"]).startswith("## What to remember")


@pytest.mark.parametrize("name", BUILT)
def test_committed_stub_cells_say_not_implemented(name):
    """As committed, every check cell reports "not implemented yet" (nbval re-runs them in `make test`), and
    the checked cells print only machine-independent numbers (the rule tests/test_notebooks.py holds the
    chapters to)."""
    from test_notebooks import notebook_hazards

    checks = [c for c in _cells(name) if "exercise-check" in c["metadata"].get("tags", [])]
    for cell in checks:
        text = "".join(_text(o) for o in cell["outputs"])
        assert "not implemented yet" in text, f"{name}: {''.join(cell['source'])} printed {text!r}"
    assert not notebook_hazards(NOTEBOOKS / f"{name}.ipynb")
    assert all(not any(o["output_type"] == "error" for o in c.get("outputs", [])) for c in _cells(name))


@pytest.fixture(scope="module")
def kernel():
    """One Python kernel for the eight notebook runs (each starts with %reset -f, so none sees another's names;
    a kernel start and the torch import cost more than most of these notebooks)."""
    pytest.importorskip("nbclient")
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(NOTEBOOKS))
    yield km
    km.shutdown_kernel(now=True)


@pytest.mark.parametrize("name", BUILT)
def test_notebook_runs_with_the_solutions(name, kernel):
    """Execute the notebook top to bottom (nbclient, a real kernel) with each stub cell replaced by an import
    of its solution: every check cell must then report a pass, and no cell may fail."""
    import nbclient
    import nbformat

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if "exercise-stub" in cell.metadata.get("tags", []):
            ex = exercise(cell.metadata["kvlab_exercise"])
            cell.source = f"from {ex.solution_module} import {', '.join(ex.names)}"
    nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))
    nbclient.NotebookClient(nb, km=kernel, timeout=300).execute()
    checks = [c for c in nb.cells if "exercise-check" in c.metadata.get("tags", [])]
    assert checks
    for cell in checks:
        text = "".join(_text(o) for o in cell.outputs)
        assert text.startswith("✓ ") and " passed. " in text, f"{name}: {cell.source} printed {text!r}"
