"""Chapter 04 exercises (notebooks/exercises/04_fragmentation.ipynb): where one request's KV memory goes.

    04.1  slots_held(policy, num_tokens, final_len, max_seq_len, block_size) -> int
              slots a request holds while it has num_tokens tokens, under each allocation policy
    04.2  breakdown(policy, prompt_len, output_len, step, max_seq_len, block_size) -> dict
              its slots at one step, split into token_states, reservation, internal_fragmentation
    04.3  lifetime_shares(policy, prompt_len, output_len, max_seq_len, block_size) -> dict
              the same three as shares of its memory over its whole life (the paper's Figure 2, one request)

The reference is `kvlab.fragmentation`: the step-by-step simulator colours every slot of a
one-request trace at every step (its memory map), and the event-driven one gives the shares.
One request alone in the memory: nobody waits, so there is no external fragmentation.
"""

from __future__ import annotations

import functools

from kvlab import workloads
from kvlab.exercises.harness import Case, Verdict, compare_close, compare_equal, run_check, show
from kvlab.fragmentation import INTERNAL, RESERVED, TOKEN, simulate_allocation, simulate_allocation_reference

POLICIES = ("max-reserve", "pow2", "oracle", "paged")
KEYS = ("token_states", "reservation", "internal_fragmentation")


@functools.lru_cache(maxsize=512)
def _columns(policy: str, prompt_len: int, output_len: int, max_seq_len: int, block_size: int) -> tuple:
    """Per step of the request's life: (token_states, reservation, internal) slots, read off the memory map."""
    wl = workloads.from_lengths([prompt_len], [output_len])
    res = simulate_allocation_reference(wl, policy, capacity_tokens=4 * max_seq_len, max_seq_len=max_seq_len,
                                        block_size=block_size)
    m = res.memory_map                                                    # (capacity, steps) category codes
    return tuple((int((m[:, t] == TOKEN).sum()), int((m[:, t] == RESERVED).sum()), int((m[:, t] == INTERNAL).sum()))
                 for t in range(m.shape[1]))


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _trace_line(policy, P, O, M, b) -> str:
    return (f"policy {policy!r}, prompt_len {P}, output_len {O} (final length {P + O}), max_seq_len {M}, "
            f"block_size {b}")


# ---- 04.1 slots held ------------------------------------------------------------------------------

SLOT_CASES = [  # policy, tokens, final_len, max_seq_len, block_size
    ("max-reserve", 5, 12, 32, 4), ("max-reserve", 30, 30, 32, 4),
    ("oracle", 5, 12, 32, 4), ("oracle", 12, 12, 32, 4),
    ("pow2", 5, 12, 32, 4), ("pow2", 9, 16, 32, 4), ("pow2", 17, 17, 64, 8), ("pow2", 6, 40, 48, 8),
    ("paged", 6, 12, 32, 4), ("paged", 8, 12, 32, 4), ("paged", 9, 12, 32, 4), ("paged", 2, 30, 64, 16),
    ("paged", 16, 40, 64, 16), ("paged", 17, 40, 64, 16), ("paged", 33, 33, 64, 1),
]


def _slots_reference(policy, tokens, final_len, M, b):
    """Slots held at the step where the request has `tokens` tokens: a trace whose prompt is tokens - 1 long
    (admission holds the prompt plus the first output token) and whose final length is final_len."""
    return sum(_columns(policy, tokens - 1, final_len - tokens + 1, M, b)[0])


def _slots_mistakes(policy, tokens, F, M, b):
    if policy == "paged":
        return [((tokens // b + 1) * b, "Off by one block: ceil(n / b) blocks, not n // b + 1 (that takes an extra "
                                        "block whenever n is an exact multiple of b)."),
                (tokens // b * b, "Round the blocks up, not down: a partly filled last block is held whole, "
                                  "ceil(num_tokens / block_size) blocks."),
                (-(-tokens // b), "That is the number of blocks; the answer is in slots (blocks x block_size)."),
                (tokens, "Paging holds whole blocks: the last block's unfilled slots are held too.")]
    if policy == "pow2":
        return [(_pow2(F), "Cap the region at max_seq_len: min(next power of two >= final_len, max_seq_len)."),
                (min(_pow2(tokens), M), "A contiguous region is reserved once, at admission, for the final length: "
                                         "the next power of two >= final_len, not >= the tokens so far.")]
    if policy == "oracle":
        return [(tokens, "The oracle reserves the final length up front (it knows the output length), not the "
                         "tokens so far.")]
    return [(F, "max-reserve reserves max_seq_len slots for every request, whatever its length.")]


def _slots_cases():
    for i, (policy, tokens, F, M, b) in enumerate(SLOT_CASES, start=1):
        yield Case(f"case {i}: {policy}, {tokens} tokens of a {F}-token request", (policy, tokens, F, M, b),
                   inputs=f"policy {policy!r}, num_tokens {tokens}, final_len {F}, max_seq_len {M}, block_size {b}",
                   expected=(lambda a=(policy, tokens, F, M, b): _slots_reference(*a)),
                   data={"args": (policy, tokens, F, M, b)})


def check_slots_held(slots_held) -> Verdict:
    """04.1: slots_held(policy, num_tokens, final_len, max_seq_len, block_size): the slots the request holds."""
    return run_check(
        "04.1 slots_held", slots_held, _slots_cases(),
        compare=lambda e, g: compare_equal(e, g, name="slots"),
        checked=lambda n: (f"{n} cases equal the slots kvlab's simulator gives the request (its memory map): every "
                           f"policy, a pow2 region capped at max_seq_len, and pages at, just below and just past a "
                           f"block boundary."),
        todo="Write the body of slots_held(...), then run this cell again.",
        diagnose=lambda case, got: next((h for v, h in _slots_mistakes(*case.data["args"])
                                         if compare_equal(v, got) is None), None),
        generic_hint="max-reserve: max_seq_len; pow2: min(next power of two >= final_len, max_seq_len); oracle: "
                     "final_len; paged: ceil(num_tokens / block_size) x block_size.")


# ---- 04.2 one step's breakdown --------------------------------------------------------------------

BREAKDOWN_TRACES = [  # policy, prompt, output, max_seq_len, block_size
    ("max-reserve", 5, 7, 32, 4), ("pow2", 5, 7, 32, 4), ("oracle", 5, 7, 32, 4), ("paged", 5, 7, 32, 4),
    ("paged", 3, 10, 32, 8), ("pow2", 9, 10, 24, 4), ("paged", 1, 1, 16, 16), ("max-reserve", 1, 1, 16, 4),
]


def _breakdown_cases():
    i = 0
    for policy, P, O, M, b in BREAKDOWN_TRACES:
        for step in sorted({0, 1, O // 2, O - 1}):
            if step >= O:
                continue
            i += 1
            yield Case(f"case {i}: {policy}, step {step} of a request of {P} + {O} tokens", (policy, P, O, step, M, b),
                       inputs=_trace_line(policy, P, O, M, b) + f"; step {step} (0 = the admission step)",
                       expected=(lambda a=(policy, P, O, M, b), s=step: dict(zip(KEYS, _columns(*a)[s]))),
                       data={"args": (policy, P, O, M, b), "step": step})


def _breakdown_diagnose(case: Case, got) -> str | None:
    policy, P, O, M, b = case.data["args"]
    k = case.data["step"]
    if not isinstance(got, dict) or set(got) != set(KEYS):
        return f"Return a dict with exactly the keys {', '.join(KEYS)}."
    want = case.reference()
    if got["token_states"] == P + k:
        return ("At the admission step (step 0) the request already holds its prompt AND its first output token "
                "(the prefill samples it): token_states = prompt_len + 1 + step.")
    if got["reservation"] == want["internal_fragmentation"] and got["internal_fragmentation"] == want["reservation"]:
        return ("Reservation and internal fragmentation are swapped: reserved slots the request WILL fill (up to its "
                "final length) are reservation; reserved slots it will never fill (past the final length) are "
                "internal fragmentation.")
    if policy == "paged" and got["internal_fragmentation"] == 0 and want["internal_fragmentation"] > 0:
        return ("Under paging, the slots of the last block past the request's final length are never filled: they "
                "are internal fragmentation, not reservation.")
    return None


def check_breakdown(breakdown) -> Verdict:
    """04.2: breakdown(policy, prompt_len, output_len, step, max_seq_len, block_size) -> {"token_states",
    "reservation", "internal_fragmentation"}: the request's slots at that step (0 = admission)."""
    return run_check(
        "04.2 breakdown", breakdown, _breakdown_cases(),
        compare=lambda e, g: compare_equal(e, g, name="breakdown"),
        checked=lambda n: (f"{n} cases equal kvlab's simulator's memory map, slot for slot: each policy at the "
                           f"admission step, the next, the middle and the last step, including one-token outputs "
                           f"and a last block that ends past the final length."),
        todo="Write the body of breakdown(...), then run this cell again.",
        diagnose=_breakdown_diagnose,
        generic_hint="tokens = prompt_len + 1 + step; held = slots_held(policy, tokens, final_len, ...); "
                     "reservation = min(held, final_len) - tokens; internal = held - min(held, final_len).")


# ---- 04.3 over the request's life -----------------------------------------------------------------

SHARE_TRACES = [("max-reserve", 5, 7, 32, 4), ("pow2", 5, 7, 32, 4), ("oracle", 5, 7, 32, 4), ("paged", 5, 7, 32, 4),
                ("paged", 40, 90, 256, 16), ("max-reserve", 40, 90, 256, 16), ("pow2", 100, 29, 256, 16),
                ("paged", 1, 1, 16, 16), ("paged", 13, 200, 256, 64)]


def _slots_mistake_held(policy, tokens, F, M, b) -> int:
    """Slots held with `tokens` tokens (the rule 04.1 checks), for diagnosing a slip elsewhere."""
    return {"max-reserve": M, "pow2": min(_pow2(F), M), "oracle": F}.get(policy, -(-tokens // b) * b)


def _shares_reference(policy, P, O, M, b) -> dict:
    wl = workloads.from_lengths([P], [O])
    f = simulate_allocation(wl, policy, capacity_tokens=4 * M, max_seq_len=M, block_size=b).fractions()
    return {k: f[k] for k in KEYS}


def _shares_diagnose(case: Case, got) -> str | None:
    if not isinstance(got, dict) or set(got) != set(KEYS):
        return f"Return a dict with exactly the keys {', '.join(KEYS)}."
    cols = _columns(*case.data["args"])
    means = [sum(c[j] / sum(c) for c in cols) / len(cols) for j in range(3)]
    if all(compare_close(m, got[k], rel=1e-6) is None for m, k in zip(means, KEYS)):
        return ("You averaged each step's fractions; the shares are slot-steps: sum each category over all steps, "
                "then divide by the total slot-steps held (a step that holds more memory weighs more).")
    P, O = case.data["args"][1:3]
    policy, _, _, M, b = case.data["args"]
    shifted = []                                                          # tokens = prompt_len + step (04.2's slip)
    for k in range(O):
        held = _slots_mistake_held(policy, P + k, P + O, M, b)
        fill = min(held, P + O)
        shifted.append((P + k, fill - P - k, held - fill))
    total = sum(map(sum, shifted))
    if all(compare_close(sum(c[j] for c in shifted) / total, got[k], rel=1e-6) is None for j, k in enumerate(KEYS)):
        return ("Your shares count prompt_len + step tokens at each step; the admission step already holds the first "
                "output token too (prompt_len + 1 + step), as in exercise 04.2.")
    return ("Sum each category over the request's output_len steps (step 0 .. output_len - 1), then divide each sum "
            "by the total of the three.")


def check_lifetime_shares(lifetime_shares) -> Verdict:
    """04.3: lifetime_shares(policy, prompt_len, output_len, max_seq_len, block_size) -> the three shares of the
    request's memory over its life (slot-steps), as kvlab.simulate_allocation(...).fractions() gives them."""
    def compare(expected, got):
        if not isinstance(got, dict) or set(got) != set(KEYS):
            return compare_equal(expected, got, name="shares")
        for k in KEYS:
            problem = compare_close(expected[k], got[k], rel=1e-9, name=f"{k} share")
            if problem is not None:
                problem.expected, problem.got = show({k: round(v, 6) for k, v in expected.items()}), \
                    show({k: round(float(v), 6) for k, v in got.items()})
                return problem
        return None

    return run_check(
        "04.3 lifetime_shares", lifetime_shares,
        (Case(f"case {i}: {p}, a request of {P} + {O} tokens", (p, P, O, M, b), inputs=_trace_line(p, P, O, M, b),
              expected=(lambda a=(p, P, O, M, b): _shares_reference(*a)), data={"args": (p, P, O, M, b)})
         for i, (p, P, O, M, b) in enumerate(SHARE_TRACES, start=1)),
        compare=compare,
        checked=lambda n: (f"{n} cases equal kvlab.simulate_allocation(...).fractions() within a relative 1e-9: every "
                           f"policy, short and long requests, blocks of 1 to 64 slots."),
        todo="Write the body of lifetime_shares(...), then run this cell again.",
        diagnose=_shares_diagnose)
