"""Chapter 05 exercises (notebooks/exercises/05_paged_allocator.ipynb): paging, checked against kvlab.paged.

    05.1  slot_mapping(block_table, positions, block_size) -> slots     where each token's K/V live
    05.2  prefix_block_hashes(token_ids, block_size) -> hashes          the chained hash of each full block
    05.3  cached_prompt_tokens(computed_prompts, prompt, block_size)    prompt tokens the prefix cache supplies
    05.4  Allocator(num_blocks, block_size)                             a block allocator: allocate, append,
                                                                        fork (copy-on-write), free, ref counts

The reference is `kvlab.BlockAllocator`, driven through the same operations: its slots, its registered
block hashes, its prefix-cache hits, and, operation by operation, its block tables, free count,
reference counts and copy-on-write copies.
"""

from __future__ import annotations

import random

from kvlab.exercises.harness import Case, Mismatch, Verdict, compare_equal, run_check, show
from kvlab.paged.block_allocator import BlockAllocator, OutOfBlocksError, block_hash

NO_PARENT = -1        # the "previous hash" of a sequence's first block (kvlab's convention)


# ---- 05.1 slot mapping ----------------------------------------------------------------------------

def _slot_cases():
    rng = random.Random(7)
    setups = [(4, 10, 1), (4, 10, 2), (16, 8, 3), (1, 12, 4), (8, 30, 5), (16, 64, 6)]
    for i, (bs, num_blocks, seed) in enumerate(setups, start=1):
        order = list(range(num_blocks))
        random.Random(seed).shuffle(order)                               # scatter the sequence over the pool
        alloc = BlockAllocator(num_blocks, bs, free_order=order)
        n = rng.randint(1, num_blocks * bs // 2) if i > 1 else 5
        alloc.allocate_sequence("s", [0] * n)
        table = alloc.block_table("s")
        positions = sorted({0, n - 1, *(p for p in range(bs - 1, n, bs)), *(p for p in range(bs, n, bs)),
                            *rng.sample(range(n), min(n, 4))})
        yield Case(f"case {i}: a {n}-token sequence in blocks of {bs}", (table, positions, bs),
                   inputs=f"block_table {table}, positions {positions}, block_size {bs}",
                   expected=(lambda a=alloc, p=positions: [a.slot("s", q) for q in p]),
                   data={"table": table, "positions": positions, "bs": bs})


def _slot_diagnose(case: Case, got) -> str | None:
    t, ps, bs = case.data["table"], case.data["positions"], case.data["bs"]
    models = [([t[0] * bs + p for p in ps], "You treated the sequence as contiguous from its first block: its blocks "
                                           "are scattered, so look up block_table[position // block_size] for each "
                                           "token."),
              ([t[p // bs] + p % bs for p in ps], "block_table holds block ids; a slot is block_id x block_size + "
                                                   "offset (multiply by block_size)."),
              ([p for p in ps], "Those are logical positions: go through the block table to the physical block."),
              ([t[p // bs] * bs + p // bs for p in ps], "The offset within the block is position % block_size.")]
    return next((h for v, h in models if compare_equal(v, got) is None), None)


def check_slot_mapping(slot_mapping) -> Verdict:
    """05.1: slot_mapping(block_table, positions, block_size) -> [slot of each position]: block_table[p //
    block_size] * block_size + p % block_size, as kvlab.BlockAllocator.slot gives it."""
    return run_check(
        "05.1 slot_mapping", slot_mapping, _slot_cases(),
        compare=lambda e, g: compare_equal(e, g, name="slots"),
        checked=lambda n: (f"{n} cases equal kvlab.BlockAllocator.slot on sequences scattered over the pool (a "
                           f"shuffled free queue): blocks of 1 to 16 slots, the first and last token and both sides "
                           f"of every block boundary."),
        todo="Write the body of slot_mapping(block_table, positions, block_size), then run this cell again.",
        diagnose=_slot_diagnose)


# ---- 05.2 chained prefix hashes -------------------------------------------------------------------

def _registered_hashes(token_ids: list[int], bs: int) -> list[int]:
    """kvlab's own: allocate with prefix caching, mark every token computed, read each full block's hash."""
    alloc = BlockAllocator(len(token_ids) // bs + 2, bs, enable_prefix_caching=True)
    table = alloc.allocate_sequence("s", token_ids)
    alloc.mark_computed("s", len(token_ids))
    return [alloc.block_hash(b) for b in table[: len(token_ids) // bs]]


def _hash_cases():
    rng = random.Random(8)
    specs = [(3, 4, "shorter than one block: no full block"), (4, 4, "exactly one full block"),
             (10, 4, "two full blocks and a partial one"), (12, 4, "three full blocks, nothing partial"),
             (33, 16, "blocks of 16"), (20, 1, "blocks of one token")]
    for i, (n, bs, what) in enumerate(specs, start=1):
        tokens = [rng.randrange(50_000) for _ in range(n)]
        yield Case(f"case {i}: {n} tokens in blocks of {bs} ({what})", (tokens, bs),
                   inputs=f"token_ids {show(tokens, 120)}, block_size {bs}",
                   expected=(lambda t=tokens, b=bs: _registered_hashes(t, b)), data={"tokens": tokens, "bs": bs})
    tokens = [5, 6, 7, 8] * 3                                            # the same 4 tokens three times
    yield Case(f"case {len(specs) + 1}: three blocks with the same tokens (only the chain tells them apart)",
               (tokens, 4), inputs=f"token_ids {tokens}, block_size 4",
               expected=lambda: _registered_hashes([5, 6, 7, 8] * 3, 4), data={"tokens": tokens, "bs": 4})


def _hash_diagnose(case: Case, got) -> str | None:
    t, bs = case.data["tokens"], case.data["bs"]
    full = len(t) // bs
    blocks = [tuple(t[i * bs:(i + 1) * bs]) for i in range(full)]
    unchained = [block_hash(NO_PARENT, b) for b in blocks]
    partial, prev = [], NO_PARENT
    for i in range(-(-len(t) // bs)):
        prev = block_hash(prev, t[i * bs:(i + 1) * bs])
        partial.append(prev)
    models = [(unchained, "Chain the hashes: block i's hash takes block i - 1's hash as prev_hash (the first block "
                          "takes -1), so equal hashes mean equal whole prefixes, not just equal blocks."),
              (partial, "Only full blocks get a hash: a partly filled last block can still change (it grows).")]
    for value, hint in models:
        if compare_equal(value, got) is None:
            return hint
    if isinstance(got, list) and len(got) == full and full and got[0] != unchained[0]:
        return "The first block's prev_hash is -1 (kvlab's NO_PARENT), not 0 or None."
    return None


def check_prefix_block_hashes(prefix_block_hashes) -> Verdict:
    """05.2: prefix_block_hashes(token_ids, block_size) -> the chained hash of each full block: h_i =
    block_hash(h_{i-1}, block i's tokens), h_{-1} = -1; equal to the hashes kvlab's allocator registers."""
    return run_check(
        "05.2 prefix_block_hashes", prefix_block_hashes, _hash_cases(),
        compare=lambda e, g: compare_equal(e, g, name="hashes"),
        checked=lambda n: (f"{n} cases equal the hashes kvlab.BlockAllocator registers for a computed prompt (its "
                           f"prefix cache): no full block, exact multiples of the block size, a partial last block, "
                           f"and three blocks of equal tokens told apart by the chain."),
        todo="Write the body of prefix_block_hashes(token_ids, block_size), then run this cell again.",
        diagnose=_hash_diagnose)


# ---- 05.3 what the prefix cache supplies ----------------------------------------------------------

def _cached_reference(computed: list[list[int]], prompt: list[int], bs: int) -> int:
    total = sum(len(p) // bs + 1 for p in computed) + len(prompt) // bs + 2
    alloc = BlockAllocator(total, bs, enable_prefix_caching=True)
    for i, p in enumerate(computed):                 # computed earlier, then finished: blocks stay cached
        alloc.allocate_sequence(i, p)
        alloc.mark_computed(i, len(p))
        alloc.free_sequence(i)
    alloc.allocate_sequence("new", prompt)
    return alloc.num_cached_tokens("new")


def _cached_cases():
    sys_prompt = list(range(100, 120))                                   # 20 tokens shared by every request
    cases = [
        ("nothing computed before", [], sys_prompt + [1, 2, 3], 4),
        ("an earlier prompt shorter than one block", [[1, 2, 3]], [1, 2, 3, 4, 5], 4),
        ("the same system prompt (20 tokens) before another question", [sys_prompt + [7, 8, 9]],
         sys_prompt + [1, 2, 3], 4),
        ("the same prompt again, 16 tokens in blocks of 4 (the last block is never a hit)", [list(range(16))],
         list(range(16)), 4),
        ("the same prompt again, 18 tokens", [list(range(18))], list(range(18)), 4),
        ("a prompt that differs in its first token", [[9] + list(range(1, 16))], list(range(16)), 4),
        ("block 2 equal but block 1 different (the chain breaks at block 1)",
         [[0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11]], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4),
        ("two earlier prompts, the longer match wins", [sys_prompt[:8] + [0] * 8, sys_prompt + [5]],
         sys_prompt + [6, 6], 4),
        ("blocks of 16, a 40-token shared prefix", [list(range(40)) + [1]], list(range(40)) + [2, 3], 16),
        ("block 1 from one earlier prompt, block 2 from another (no whole prefix was computed)",
         [[0, 1, 2, 3, 4, 5, 6, 7], [9, 9, 9, 9, 10, 11, 12, 13, 1]], [0, 1, 2, 3, 10, 11, 12, 13, 99], 4),
    ]
    for i, (what, computed, prompt, bs) in enumerate(cases, start=1):
        yield Case(f"case {i}: {what}", ([list(p) for p in computed], list(prompt), bs),
                   inputs=f"computed_prompts {show(computed, 160)}, prompt {show(prompt, 120)}, block_size {bs}",
                   expected=(lambda c=computed, p=prompt, b=bs: _cached_reference(c, p, b)),
                   data={"computed": computed, "prompt": prompt, "bs": bs})


def _cached_diagnose(case: Case, got) -> str | None:
    computed, prompt, bs = case.data["computed"], case.data["prompt"], case.data["bs"]

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    best = max((common(c, prompt) for c in computed), default=0)
    blocks = lambda p: [tuple(p[i * bs:(i + 1) * bs]) for i in range(len(p) // bs)]
    seen = {(i, b) for c in computed for i, b in enumerate(blocks(c))}
    unchained = 0
    for i, b in enumerate(blocks(prompt)[: (len(prompt) - 1) // bs]):
        if (i, b) not in seen:
            break
        unchained += 1
    models = [
        (min(best // bs, len(prompt) // bs) * bs,
         "The block holding the prompt's last token is never a hit, so at most (len(prompt) - 1) // block_size "
         "blocks: the prefill must compute at least one token, whose logits sample the next."),
        (best, "Hits come in whole blocks: a block is reused only if all its tokens (and every block before it) "
               "match; round the matching prefix down to whole blocks."),
        (unchained * bs, "Hits follow the chain: a block is a hit only if the whole prefix up to it was computed "
                         "before (its chained hash), not merely an equal block at the same place in another prompt."),
    ]
    for value, hint in models:
        if compare_equal(value, got) is None:
            return hint
    return None


def check_cached_prompt_tokens(cached_prompt_tokens) -> Verdict:
    """05.3: cached_prompt_tokens(computed_prompts, prompt, block_size) -> how many of the prompt's tokens kvlab's
    prefix cache supplies after the computed prompts ran (and finished): num_cached_tokens."""
    return run_check(
        "05.3 cached_prompt_tokens", cached_prompt_tokens, _cached_cases(),
        compare=lambda e, g: compare_equal(e, g, name="number of cached tokens"),
        checked=lambda n: (f"{n} cases equal kvlab.BlockAllocator.num_cached_tokens after the earlier prompts ran: "
                           f"a shared system prompt, a repeated prompt of an exact multiple of the block size (its "
                           f"last block is never a hit), a chain broken before an equal block, several candidates."),
        todo="Write the body of cached_prompt_tokens(computed_prompts, prompt, block_size), then run this cell again.",
        diagnose=_cached_diagnose,
        generic_hint="Hash the prompt's full blocks (your prefix_block_hashes), and the computed prompts' too; count "
                     "the leading blocks of the prompt whose hash is among them, at most (len(prompt) - 1) // "
                     "block_size of them; times block_size.")


# ---- 05.4 the allocator ---------------------------------------------------------------------------

class _Model:
    """The rules of 05.4 with one mistake switched on (for the diagnosis), over plain lists."""

    def __init__(self, num_blocks, bs, mistake=None):
        self.bs, self.mistake = bs, mistake
        self.free = list(range(num_blocks))
        self.refs = [0] * num_blocks
        self.tables, self.lens, self.copies = {}, {}, []

    def _take(self):
        if not self.free:
            raise OutOfBlocksError("out of blocks")
        b = self.free.pop(-1 if self.mistake == "lifo" else 0)
        self.refs[b] = 1
        return b

    def allocate(self, sid, n):
        need = n // self.bs if self.mistake == "floor" else -(-n // self.bs)
        if need > len(self.free):
            raise OutOfBlocksError("out of blocks")
        self.tables[sid], self.lens[sid] = [self._take() for _ in range(need)], n
        return list(self.tables[sid])

    def append(self, sid):
        table, n = self.tables[sid], self.lens[sid]
        new_block = (n + 1) % self.bs == 0 if self.mistake == "late" else n % self.bs == 0
        if self.mistake == "always":
            new_block = True
        if new_block:
            table.append(self._take())
        elif self.refs[table[-1]] > 1 and self.mistake != "no_cow":
            new = self._take()
            self.refs[table[-1]] -= 1
            self.copies.append((table[-1], new))
            table[-1] = new
        self.lens[sid] = n + 1
        return table[-1] * self.bs + n % self.bs

    def fork(self, parent, child):
        if self.mistake != "fork_no_ref":
            for b in self.tables[parent]:
                self.refs[b] += 1
        self.tables[child], self.lens[child] = list(self.tables[parent]), self.lens[parent]
        return list(self.tables[child])

    def free_seq(self, sid):
        table = self.tables.pop(sid)
        del self.lens[sid]
        for b in (table if self.mistake == "forward" else reversed(table)):
            self.refs[b] -= 1
            if self.refs[b] <= 0:
                self.refs[b] = 0
                if b not in self.free:
                    self.free.append(b)


MODEL_HINTS = {
    "always": "Your allocator takes a new block on every append; take one only when the last block is full "
              "(the sequence's length is a multiple of block_size before the append).",
    "late": "Off by one: a new block is needed when the sequence's length BEFORE the append is a multiple of "
            "block_size (its last block is full), not when the length after it is.",
    "floor": "A sequence of n tokens needs ceil(n / block_size) blocks: a partly filled last block counts.",
    "no_cow": "Copy-on-write: appending into a partly filled block that another sequence shares (ref_count > 1) "
              "must move the writer to a fresh block (ref count of the old one - 1) and record (old, new) for "
              "pop_copies(); writing into it would change the other sequence's tokens.",
    "fork_no_ref": "fork must add 1 to the reference count of every block the child shares; otherwise freeing "
                   "either sequence frees blocks the other still uses.",
    "forward": "Freed blocks join the back of the free queue last block first (the sequence's tail, least likely "
               "to be shared, is reused first); yours returned them first block first.",
    "lifo": "The free queue is first in, first out: take blocks from its front, return them to its back. Yours "
            "reuses the most recently freed block first.",
}

OPS_BY_HAND = [("allocate", "A", 6), ("allocate", "B", 9), ("fork", "A", "A2"), ("fork", "A", "A3"),
               ("append", "A2"), ("append", "A3"), ("append", "A3"), ("append", "A"), ("free", "B"),
               ("append", "A2"), ("append", "A2"), ("append", "A2"), ("free", "A"), ("pop_copies",),
               ("allocate", "C", 13), ("append", "C"), ("free", "A2"), ("free", "A3"), ("free", "C")]


def _random_ops(seed: int, num_blocks: int, bs: int, n: int = 45) -> list[tuple]:
    """A valid random operation list (out-of-blocks refusals included), built by running kvlab's allocator."""
    rng = random.Random(seed)
    alloc = BlockAllocator(num_blocks, bs)
    ops, next_id = [], 0
    for _ in range(n):
        live = alloc.seq_ids()
        kind = rng.choices(["allocate", "append", "fork", "free", "pop_copies"],
                           weights=[3 if len(live) < 5 else 1, 6 if live else 0, 2 if live else 0,
                                    2 if live else 0, 1])[0]
        if kind == "allocate":
            op = ("allocate", f"s{next_id}", rng.randint(1, 3 * bs))
            next_id += 1
        elif kind == "fork":
            op = ("fork", rng.choice(live), f"s{next_id}")
            next_id += 1
        elif kind in ("append", "free"):
            op = (kind, rng.choice(live))
        else:
            op = ("pop_copies",)
        ops.append(op)
        _apply(alloc, op, kvlab_side=True)
    return ops


def _apply(alloc, op, kvlab_side=False):
    """Run one operation; returns its result (or the exception it raised)."""
    kind = op[0]
    try:
        if kind == "allocate":
            return alloc.allocate_sequence(op[1], [0] * op[2]) if kvlab_side else alloc.allocate(op[1], op[2])
        if kind == "append":
            return alloc.append_token(op[1], 0) if kvlab_side else alloc.append(op[1])
        if kind == "fork":
            return alloc.fork(op[1], op[2])
        if kind == "free":
            return alloc.free_sequence(op[1]) if kvlab_side else alloc.free(op[1])
        return alloc.pop_copies()
    except OutOfBlocksError as err:
        return err


def _op_text(op) -> str:
    if op[0] == "allocate":
        return f"allocate({op[1]!r}, {op[2]})"
    if op[0] == "fork":
        return f"fork({op[1]!r}, {op[2]!r})"
    if op[0] == "pop_copies":
        return "pop_copies()"
    return f"{op[0]}({op[1]!r})"


def _state(alloc, seqs, num_blocks):
    return alloc.num_free_blocks, {s: list(alloc.block_table(s)) for s in seqs}, \
        [alloc.ref_count(b) for b in range(num_blocks)]


def _model_trace(mistake, ops, upto, num_blocks, bs, lives):
    """What a mistaken allocator returns and holds after each of ops[:upto + 1] (None once it breaks)."""
    m, trace = _Model(num_blocks, bs, mistake), []
    for op, live in zip(ops[: upto + 1], lives):
        try:
            if op[0] == "allocate":
                result = m.allocate(op[1], op[2])
            elif op[0] == "append":
                result = m.append(op[1])
            elif op[0] == "fork":
                result = m.fork(op[1], op[2])
            elif op[0] == "free":
                result = m.free_seq(op[1])
            else:
                result, m.copies = m.copies, []
            state = (len(m.free), {s: list(m.tables[s]) for s in live}, list(m.refs))
        except (OutOfBlocksError, KeyError, IndexError) as err:
            result, state = err, None
        trace.append((result, state))
    return trace


def _same(a, b) -> bool:
    if isinstance(a, Exception) or isinstance(b, Exception):
        return isinstance(a, Exception) and isinstance(b, Exception)
    return compare_equal(a, b) is None


def _run_ops(Allocator, case: Case):
    num_blocks, bs, ops = case.data["num_blocks"], case.data["bs"], case.data["ops"]
    ref, mine = BlockAllocator(num_blocks, bs), Allocator(num_blocks, bs)
    history, seen, lives = [], [], []                       # the learner's results and states, op by op

    def fail(where, expected, got, hint=None, result=None, state=None):
        if hint is None:
            hint = _diagnose_ops(case, len(seen), seen, lives, result, state)
        raise Mismatch(where, expected, got, hint)

    for i, op in enumerate(ops):
        want = _apply(ref, op, kvlab_side=True)
        live = ref.seq_ids()
        lives.append(live)
        where = f"operation {i + 1} of {len(ops)}, {_op_text(op)}"
        recent = "; ".join(history[-6:]) or "(none)"
        try:
            got = _apply(mine, op)
        except NotImplementedError:
            raise
        except Exception as err:                             # noqa: BLE001 -- the learner's error is the answer
            if not isinstance(want, OutOfBlocksError):
                fail(f"{where}: your allocator raised {type(err).__name__}: {err}", show(want), None,
                     "Only an operation that needs more blocks than are free may fail.")
            got = err
        history.append(_op_text(op))
        if isinstance(want, OutOfBlocksError):
            if not isinstance(got, Exception):
                fail(f"{where}: it needs more blocks than are free ({ref.num_free_blocks}), so it must raise and "
                     f"change nothing; yours returned {show(got, 80)}", "an exception", show(got, 80),
                     "Check that enough blocks are free before taking any, then raise (e.g. MemoryError).")
        elif op[0] != "free":
            expected = [list(c) for c in want] if op[0] == "pop_copies" else want
            if compare_equal(expected, got) is not None:
                fail(f"{where}: wrong return value (operations before it: {recent})", show(expected), show(got),
                     result=got)
        exp_state = _state(ref, live, num_blocks)
        try:
            got_state = _state(mine, live, num_blocks)
        except Exception as err:                             # noqa: BLE001
            fail(f"{where}: reading your allocator's state raised {type(err).__name__}: {err}", None, None,
                 "The check reads num_free_blocks (a property), block_table(seq_id) and ref_count(block_id).")
        for name, e, g in zip(("num_free_blocks", "block tables", "reference counts"), exp_state, got_state):
            if compare_equal(e, g) is not None:
                fail(f"{where}: wrong {name} after it (operations before it: {recent})", show(e), show(g),
                     "It did not fit, and your allocator changed its state anyway: check that enough blocks are free "
                     "before taking any, then raise, so that nothing changes." if isinstance(want, Exception)
                     else None, result=got, state=got_state)
        seen.append((got, got_state))
    return "ok"


def _diagnose_ops(case: Case, i: int, seen, lives, result, state) -> str | None:
    """The mistake whose allocator agrees with the learner's on every earlier operation and on this one."""
    num_blocks, bs, ops = case.data["num_blocks"], case.data["bs"], case.data["ops"]
    for mistake, hint in MODEL_HINTS.items():
        trace = _model_trace(mistake, ops, i, num_blocks, bs, lives)
        earlier = all(_same(r, mr) and ms is not None and _same(list(st), list(ms))
                      for (r, st), (mr, ms) in zip(seen, trace[:i]))
        r_i, s_i = trace[i]
        now_result = ops[i][0] == "free" or _same(result, r_i)
        now_state = state is None or (s_i is not None and _same(list(state), list(s_i)))
        if earlier and now_result and now_state:
            return hint
    return None


def _allocator_cases():
    yield Case("case 1: the widget's operations of chapter 05 (forks, copy-on-write, frees), 10 blocks of 4",
               inputs="Allocator(10, 4), then the operations listed in the failure",
               expected="ok", call=_run_ops, data={"num_blocks": 10, "bs": 4, "ops": OPS_BY_HAND})
    for i, (seed, nb, bs) in enumerate([(1, 8, 4), (2, 12, 2), (3, 6, 8), (4, 16, 1), (5, 10, 3)], start=2):
        ops = _random_ops(seed, nb, bs)
        yield Case(f"case {i}: {len(ops)} random operations on {nb} blocks of {bs} (some run out of blocks)",
                   inputs=f"Allocator({nb}, {bs}), then random allocate / append / fork / free / pop_copies",
                   expected="ok", call=_run_ops, data={"num_blocks": nb, "bs": bs, "ops": ops})


def check_allocator(Allocator) -> Verdict:
    """05.4: Allocator(num_blocks, block_size) with allocate, append, fork, free, pop_copies, block_table,
    ref_count and num_free_blocks, operation by operation equal to kvlab.BlockAllocator."""
    return run_check(
        "05.4 Allocator", Allocator, _allocator_cases(),
        compare=lambda e, g: None,
        checked=lambda n: (f"{n} operation lists (about 200 operations) leave your allocator equal to "
                           f"kvlab.BlockAllocator after every operation: return values, free blocks, every block "
                           f"table and every reference count; forks share blocks, the first append into a shared "
                           f"partly filled block copies it, and an allocation that does not fit raises and changes "
                           f"nothing."),
        todo="Write the Allocator's methods, then run this cell again.",
        what="a class (Allocator itself, not an instance)")
