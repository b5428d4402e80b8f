"""Chapter 06 exercises (notebooks/exercises/06_triton_kernel.ipynb): paged attention, from torch to Triton.

    06.1  paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale) -> out
              decode attention in torch, reading K/V through each sequence's block table (GQA included)
    06.2  merge_splits(o, m, l) -> out
              split-K's merge: the partial softmaxes of token ranges combined into the exact softmax
    06.3  paged_attention_kernel (a @triton.jit kernel with blanks to fill)
              one program per (sequence, query head): block-table loads and the online softmax

The reference is `kvlab.kernels.paged_attention_reference` (the chapter's torch reference, which the
Triton kernels are tested against). The Triton exercise runs in Triton's interpreter on a CPU
(TRITON_INTERPRET=1, set by `import kvlab` where there is no GPU) and compiled on a CUDA GPU; it
computes in float32 (in the interpreter tl.dot on bfloat16 is wrong, and this kernel needs no dot).
"""

from __future__ import annotations

import inspect
import io
import math
import tokenize

import torch

from kvlab.exercises.harness import Case, Verdict, compare_tensors, matches, not_implemented, run_check, tol
from kvlab.kernels import paged_attention_reference

ATOL = 1e-5
RTOL = 1e-4          # float32 sums in another order: relative differences of a few 1e-6 where scores are large
KEYS = ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "scale")


# ---- random paged problems ------------------------------------------------------------------------

def random_problem(seq_lens, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=0, score_scale=1.0,
                   device="cpu"):
    """q, k_cache, v_cache, block_tables, seq_lens, scale: sequences scattered over a shuffled pool, table entries
    past each sequence's blocks set to -1, and the cache slots past each length holding stale values (as a
    reused block does), so that reading them changes the answer."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(max(blocks), 1)
    num_blocks = sum(blocks) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for s, nb in enumerate(blocks):
        table[s, :nb] = torch.tensor(order[used:used + nb], dtype=torch.int32)
        used += nb
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=g) * score_scale
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g) * score_scale
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    for s, n in enumerate(seq_lens):                       # stale values past the length, in its last block
        if n % block_size:
            last = int(table[s, n // block_size])
            k[last, n % block_size:] = 30.0
            v[last, n % block_size:] = 100.0
    return dict(q=q.to(device), k_cache=k.to(device), v_cache=v.to(device), block_tables=table.to(device),
                seq_lens=lens.to(device), scale=1.0 / math.sqrt(head_dim))


def _describe(p: dict) -> str:
    S, Hq, D = p["q"].shape
    nb, bs, Hkv, _ = p["k_cache"].shape
    return (f"q float32 ({S}, {Hq}, {D}); k_cache, v_cache float32 ({nb}, {bs}, {Hkv}, {D}); block_tables "
            f"{p['block_tables'].tolist()}; seq_lens {p['seq_lens'].tolist()}; scale 1/sqrt({D})")


def _gathered(p, kv_head_of=None, mask_length=True, use_table=True):
    """The usual mistakes, as full computations (q, k, v per sequence in float64)."""
    q, kc, vc, bt, lens, scale = (p[k] for k in ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "scale"))
    S, Hq, D = q.shape
    _, bs, Hkv, _ = kc.shape
    out = torch.zeros_like(q)
    for s in range(S):
        n = int(lens[s])
        if n == 0:
            continue
        nb = -(-n // bs)
        blocks = bt[s, :nb].long() if use_table else torch.arange(nb)
        k = kc[blocks].flatten(0, 1).double()              # (nb * bs, Hkv, D)
        v = vc[blocks].flatten(0, 1).double()
        if mask_length:
            k, v = k[:n], v[:n]
        for h in range(Hq):
            kh = kv_head_of(h, Hq, Hkv) if kv_head_of else h // (Hq // Hkv)
            w = (k[:, kh] @ q[s, h].double() * scale).softmax(0)
            out[s, h] = (w @ v[:, kh]).to(q.dtype)
    return out


PAGED_MISTAKES = [
    (lambda p: _gathered(p, kv_head_of=lambda h, Hq, Hkv: h % Hkv),
     "Query head h reads KV head h // (num_heads // num_kv_heads) (consecutive query heads share one), not h % "
     "num_kv_heads."),
    (lambda p: _gathered(p, mask_length=False),
     "You attended to every slot of the last block: the slots past seq_lens[s] hold stale values from an earlier "
     "owner. Keep only the first seq_lens[s] tokens (or mask their scores with -inf)."),
    (lambda p: _gathered(p, use_table=False),
     "You read logical block i from physical block i: look up block_tables[s, i] to find where the block lives."),
]


def _paged_diagnose(case: Case, got) -> str | None:
    p = case.data["problem"]
    if isinstance(got, torch.Tensor) and (p["seq_lens"] == 0).any():
        empty = (p["seq_lens"] == 0).nonzero().flatten().tolist()
        if got.shape == p["q"].shape and not torch.isfinite(got[empty]).all():
            return ("A sequence with no tokens has nothing to attend to: its softmax is 0/0 = NaN. Return zeros for "
                    "it, as kvlab's kernel does.")
    for model, hint in PAGED_MISTAKES:
        if matches(model(p), got, lambda e, g: compare_tensors(e, g, atol=ATOL, rtol=RTOL)):
            return hint
    return None


def _paged_cases():
    problems = [
        ("one sequence of 5 tokens, blocks of 4, one KV head per query head", dict(seq_lens=[5], num_heads=2,
                                                                                  num_kv_heads=2)),
        ("3 sequences (1, 4 and 9 tokens), 4 query heads over 2 KV heads", dict(seq_lens=[1, 4, 9], seed=1)),
        ("4 sequences, 8 query heads over 2 KV heads (groups of 4)", dict(seq_lens=[3, 16, 17, 30], num_heads=8,
                                                                          seed=2)),
        ("MQA: 6 query heads over 1 KV head, blocks of 8", dict(seq_lens=[12, 8, 1], num_heads=6, num_kv_heads=1,
                                                                block_size=8, seed=3)),
        ("blocks of 1 token, head_dim 32", dict(seq_lens=[7, 2], head_dim=32, block_size=1, seed=4)),
        ("large scores (q and k x 8)", dict(seq_lens=[11, 6], score_scale=8.0, seed=5)),
        ("a batch with an empty sequence (seq_lens 0 gives zeros)", dict(seq_lens=[6, 0, 3], seed=6)),
    ]
    for i, (what, kw) in enumerate(problems, start=1):
        p = random_problem(**kw)
        yield Case(f"case {i}: {what}", tuple(p[k] for k in KEYS), inputs=_describe(p),
                   expected=(lambda p=p: paged_attention_reference(**p)), data={"problem": p})


def check_paged_attention(paged_attention) -> Verdict:
    """06.1: paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale) -> (num_seqs, num_heads,
    head_dim): each sequence's query attends to its seq_lens[s] tokens, read through block_tables; equal to
    kvlab.kernels.paged_attention_reference."""
    return run_check(
        "06.1 paged_attention", paged_attention, _paged_cases(),
        compare=lambda e, g: compare_tensors(e, g, atol=ATOL, rtol=RTOL),
        checked=lambda n: (f"{n} cases agree with kvlab.kernels.paged_attention_reference within {tol(ATOL)} "
                           f"(rtol {tol(RTOL)}): sequences scattered over a shuffled pool with stale values past their lengths, MHA, "
                           f"GQA and MQA, blocks of 1 to 8 tokens, large scores, and an empty sequence."),
        todo="Write the body of paged_attention(...), then run this cell again.",
        diagnose=_paged_diagnose,
        generic_hint="Per sequence s: blocks = block_tables[s, :ceil(n / block_size)]; K = k_cache[blocks] flattened "
                     "to (tokens, Hkv, D), cut to n; then per query head softmax(K[:, kv] @ q * scale) @ V[:, kv].")


# ---- 06.2 the split-K merge -----------------------------------------------------------------------

def _partials(q, k, v, scale, bounds):
    """Each range's normalized output o_i, max score m_i and sum l_i = sum exp(score - m_i) (float32)."""
    S, D = len(bounds) - 1, q.shape[-1]
    o, m, l = torch.zeros(S, D), torch.full((S,), float("-inf")), torch.zeros(S)
    for i in range(S):
        a, b = bounds[i], bounds[i + 1]
        if a == b:
            continue                                       # an empty range: o 0, m -inf, l 0 (as the kernel writes)
        s = (k[a:b].double() @ q.double()) * scale
        m[i] = s.max()
        e = torch.exp(s - s.max())
        l[i] = e.sum()
        o[i] = (e @ v[a:b].double() / e.sum()).float()
    return o, m, l


def _merge_cases():
    g = torch.Generator().manual_seed(9)
    setups = [("one range (nothing to merge)", 12, [0, 12], 1.0), ("two equal ranges", 16, [0, 8, 16], 1.0),
              ("four uneven ranges", 37, [0, 5, 6, 30, 37], 1.0), ("an empty range among three", 20, [0, 9, 9, 20], 1.0),
              ("eight ranges of one to nine tokens", 40, [0, 1, 4, 9, 18, 22, 30, 31, 40], 1.0),
              ("large scores, up to several hundred (exp overflows float32 past 88)", 24, [0, 7, 15, 24], 12.0)]
    for i, (what, n, bounds, sc) in enumerate(setups, start=1):
        D = 16
        q, k, v = torch.randn(D, generator=g) * sc, torch.randn(n, D, generator=g) * sc, torch.randn(n, D, generator=g)
        scale = 1.0 / math.sqrt(D)
        o, m, l = _partials(q, k, v, scale, bounds)
        whole = dict(q=q[None, None], k_cache=k[:, None, None], v_cache=v[:, None, None],
                     block_tables=torch.arange(n, dtype=torch.int32)[None], seq_lens=torch.tensor([n], dtype=torch.int32),
                     scale=scale)                           # the same tokens as one sequence, blocks of one token
        yield Case(f"case {i}: {what}", (o, m, l),
                   inputs=f"{len(bounds) - 1} ranges of {[b - a for a, b in zip(bounds, bounds[1:])]} tokens; o float32 "
                          f"({len(bounds) - 1}, {D}); m and l float32 ({len(bounds) - 1},); m {_fmt(m)}; l {_fmt(l)}",
                   expected=(lambda w=whole: paged_attention_reference(**w)[0, 0]), data={"oml": (o, m, l)})


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join("-inf" if math.isinf(x) else f"{x:.3g}" for x in t.tolist()) + "]"


MERGE_MISTAKES = [
    (lambda o, m, l: (l[:, None] * torch.exp(m)[:, None] * o).sum(0) / (l * torch.exp(m)).sum(),
     None),                                                # without the max shift: handled by the NaN hint
    (lambda o, m, l: (torch.exp(m - m.max())[:, None] * o).sum(0) / torch.exp(m - m.max()).sum(),
     "Weigh each range by its whole softmax mass, l_i x exp(m_i - M), not by exp(m_i - M) alone: l_i says how much "
     "probability its tokens carry under its own maximum."),
    (lambda o, m, l: (l[:, None] * o).sum(0) / l.sum(),
     "The l_i are sums under different maxima: rescale each to a common one first, w_i = l_i x exp(m_i - M) with "
     "M = max_i m_i."),
    (lambda o, m, l: o[l > 0].mean(0),
     "A plain average of the o_i weighs every range alike; weigh range i by its softmax mass l_i x exp(m_i - M)."),
]


def _merge_diagnose(case: Case, got) -> str | None:
    o, m, l = case.data["oml"]
    if isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
        if bool((m == float("-inf")).any()) and float(m[torch.isfinite(m)].max()) < 80:
            return ("An empty range has m = -inf and l = 0: its weight must come out 0 (exp(-inf - M) = 0), not NaN; "
                    "take M over the ranges that have tokens.")
        return ("Your merge overflowed: exp(m_i) is inf for a score above ~88 in float32. Shift by the largest "
                "maximum first: w_i = l_i x exp(m_i - M), M = max_i m_i (the log-sum-exp trick).")
    for model, hint in MERGE_MISTAKES:
        if hint and matches(model(o, m, l), got, lambda e, g: compare_tensors(e, g, atol=ATOL, rtol=RTOL)):
            return hint
    return None


def check_merge_splits(merge_splits) -> Verdict:
    """06.2: merge_splits(o, m, l) -> (D,): the attention output over all the ranges' tokens, from each range's
    normalized output o_i, its max score m_i and its sum l_i = sum exp(score - m_i); equal to kvlab's attention over
    the whole sequence."""
    return run_check(
        "06.2 merge_splits", merge_splits, _merge_cases(),
        compare=lambda e, g: compare_tensors(e, g, atol=ATOL, rtol=RTOL),
        checked=lambda n: (f"{n} cases: merging the ranges' partial softmaxes equals kvlab's attention over the whole "
                           f"sequence within {tol(ATOL)} (rtol {tol(RTOL)}): one to eight ranges, an empty range, and scores of several "
                           f"hundred (a merge without the max shift overflows)."),
        todo="Write the body of merge_splits(o, m, l), then run this cell again.",
        diagnose=_merge_diagnose,
        generic_hint="M = max_i m_i; w_i = l_i x exp(m_i - M); out = sum_i w_i o_i / sum_i w_i.")


# ---- 06.3 the Triton kernel -----------------------------------------------------------------------

def _source(kernel) -> str:
    src = getattr(kernel, "src", None)                     # a compiled JITFunction keeps its source
    if src is None:
        src = inspect.getsource(getattr(kernel, "fn", kernel))  # the interpreter's InterpretedFunction wraps .fn
    return src


def blanks_left(kernel) -> int:
    """How many TODO placeholders remain in the kernel's code (comments do not count)."""
    try:
        tokens = tokenize.generate_tokens(io.StringIO(_source(kernel)).readline)
        return sum(1 for t in tokens if t.type == tokenize.NAME and t.string == "TODO")
    except (OSError, TypeError, tokenize.TokenError):
        return 0


def launch(kernel, q, k_cache, v_cache, block_tables, seq_lens, scale, block_n: int = 16) -> torch.Tensor:
    """Run the learner's kernel: one program per (sequence, query head)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.zeros_like(q)
    kernel[(num_seqs, num_heads)](q, k_cache, v_cache, block_tables, seq_lens, out, scale, num_heads, num_kv_heads,
                                  block_tables.shape[1], BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_N=block_n)
    return out


def _device() -> str:
    from kvlab.kernels import INTERPRET
    return "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def _where() -> str:
    return "a CUDA GPU" if _device() == "cuda" else "the CPU, in Triton's interpreter"


def _kernel_cases():
    device = _device()
    setups = [
        ("one sequence of 3 tokens (shorter than a tile)", dict(seq_lens=[3], num_heads=2, num_kv_heads=2), 16),
        ("3 sequences of 1, 7 and 16 tokens, 4 query heads over 2 KV heads, tiles of 8 tokens",
         dict(seq_lens=[1, 7, 16], seed=1), 8),
        ("a tile of 16 tokens spans 4 blocks of 4; lengths past one tile", dict(seq_lens=[17, 33], seed=2), 16),
        ("a block of 16 spans 2 tiles of 8; MQA (4 query heads, 1 KV head)",
         dict(seq_lens=[20, 9], num_kv_heads=1, block_size=16, seed=3), 8),
        ("large scores (q and k x 8): each tile raises the running max", dict(seq_lens=[40], score_scale=8.0, seed=4),
         8),
    ]
    for i, (what, kw, block_n) in enumerate(setups, start=1):
        p = random_problem(**kw, device=device)
        yield Case(f"case {i}: {what}", kwargs=dict(p), inputs=_describe(p) + f"; BLOCK_N {block_n}",
                   expected=(lambda p=p: paged_attention_reference(**p)), data={"problem": p, "block_n": block_n},
                   call=lambda kernel, case: launch(kernel, **case.kwargs, block_n=case.data["block_n"]))


def _padded_tiles(p, block_n):
    """What a kernel computes when it forgets to set masked scores to -inf: the masked loads give k = 0 and v = 0,
    so each padding token of the last tile adds exp(0 - max) to the sum."""
    q, kc, vc, bt, lens, scale = (p[k] for k in KEYS)
    S, Hq, D = q.shape
    _, bs, Hkv, _ = kc.shape
    out = torch.zeros_like(q)
    for s in range(S):
        n = int(lens[s])
        pad = -(-n // block_n) * block_n - n
        blocks = bt[s, : -(-n // bs)].long()
        k, v = kc[blocks].flatten(0, 1)[:n].double(), vc[blocks].flatten(0, 1)[:n].double()
        for h in range(Hq):
            sc = torch.cat([k[:, h // (Hq // Hkv)] @ q[s, h].double() * scale, torch.zeros(pad, dtype=torch.float64)])
            w = sc.softmax(0)[:n]
            out[s, h] = (w @ v[:, h // (Hq // Hkv)]).to(q.dtype)
    return out


def _online(p, block_n, rescale_acc=True, rescale_l=True):
    """The kernel's online softmax, tile by tile in torch, with a forgotten rescale switched on (a mistake model)."""
    q, kc, vc, bt, lens, scale = (p[k] for k in KEYS)
    S, Hq, D = q.shape
    _, bs, Hkv, _ = kc.shape
    out = torch.zeros_like(q)
    for s in range(S):
        n = int(lens[s])
        blocks = bt[s, : -(-n // bs)].long()
        k, v = kc[blocks].flatten(0, 1)[:n].double(), vc[blocks].flatten(0, 1)[:n].double()
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            m, l, acc = float("-inf"), 0.0, torch.zeros(D, dtype=torch.float64)
            for t0 in range(0, n, block_n):
                sc = k[t0:t0 + block_n, kh] @ q[s, h].double() * scale
                m_new = max(m, float(sc.max()))
                alpha = torch.exp(torch.tensor(m - m_new, dtype=torch.float64))
                e = torch.exp(sc - m_new)
                l = (l * alpha if rescale_l else l) + float(e.sum())
                acc = (acc * alpha if rescale_acc else acc) + e @ v[t0:t0 + block_n, kh]
                m = m_new
            out[s, h] = (acc / l).to(q.dtype)
    return out


def _kernel_diagnose(case: Case, got) -> str | None:
    p = case.data["problem"]
    close = lambda e, g: compare_tensors(e, g, atol=ATOL, rtol=RTOL)
    if matches(_online(p, case.data["block_n"], rescale_acc=False), got, close):
        return ("Your accumulator is not rescaled: when a tile raises the running max, what acc summed so far was "
                "weighted by exp(score - old max) and must be multiplied by alpha = exp(m_i - m_new) before this "
                "tile's p @ v is added (the same for l_i).")
    if matches(_online(p, case.data["block_n"], rescale_l=False), got, close):
        return ("Your running sum l_i is not rescaled: multiply it by alpha = exp(m_i - m_new) before adding this "
                "tile's sum(p), as acc is.")
    if matches(_padded_tiles(p, case.data["block_n"]), got, lambda e, g: compare_tensors(e, g, atol=ATOL, rtol=RTOL)):
        return ("Tokens at or past seq_len must not count: their masked loads read k = 0, so their score is 0, not "
                "-inf, and exp(0 - m) still adds to l_i. Set s = tl.where(mask, s, float(\"-inf\")) before the max.")
    if isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
        return ("NaN or inf in the output: the running max must start at -inf and every exp must be of a difference "
                "(s - m_new, m_i - m_new), never of a raw score; masked tokens need s = -inf before the max.")
    hint = _paged_diagnose(case, got)
    if hint:
        return hint.replace("Keep only the first seq_lens[s] tokens (or mask their scores with -inf).",
                            "Mask tokens at or past seq_len: their scores must be -inf.")
    return ("Check the two blanks: block = the block table entry of tok // BLOCK_SIZE for this sequence, slot = "
            "tok % BLOCK_SIZE; and the update: m_new = max(m_i, max(s)), alpha = exp(m_i - m_new), p = exp(s - "
            "m_new), l_i = l_i x alpha + sum(p), acc = acc x alpha + sum(p[:, None] x v). Forgetting alpha on acc "
            "or l_i is the usual slip.")


def check_paged_attention_kernel(paged_attention_kernel) -> Verdict:
    """06.3: the learner's @triton.jit kernel, launched with one program per (sequence, query head), equals
    kvlab.kernels.paged_attention_reference (Triton's interpreter on a CPU, compiled on a CUDA GPU)."""
    exercise = "06.3 paged_attention_kernel"
    left = blanks_left(paged_attention_kernel)
    if left:
        return not_implemented(exercise, f"{left} blank{'s' * (left > 1)} (TODO) left in the kernel: fill them in, "
                                         f"then run this cell again.")
    return run_check(
        exercise, paged_attention_kernel, _kernel_cases(),
        compare=lambda e, g: compare_tensors(e, g, atol=ATOL, rtol=RTOL),
        checked=lambda n: (f"{n} launches agree with kvlab.kernels.paged_attention_reference within {tol(ATOL)} (rtol {tol(RTOL)}, on "
                           f"{_where()}): tiles "
                           f"shorter and longer than a block, GQA and MQA, stale values past every length, and "
                           f"large scores that raise the running max from tile to tile."),
        todo="Fill in the kernel's blanks, then run this cell again.",
        diagnose=_kernel_diagnose, what="a @triton.jit kernel")
