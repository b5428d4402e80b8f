"""How every exercise is checked: cases, a comparison, a diagnosis, one printed verdict.

A check runs the learner's function on a list of cases, each computed by kvlab's own code (the
reference: the model, the allocator, the kernels, the scheduler), and stops at the first case
where the learner's answer differs. The verdict says one of three things:

    passed            what was checked (how many cases, which edge cases, what they were held to)
    not implemented   the function still raises NotImplementedError (the stub as given)
    failed            the first failing case: its inputs, what was expected, what came back, and a
                      hint at the usual mistake

The hint comes from a *diagnosis*: each exercise knows the mistakes learners commonly make
(a mask that lets a token see the future, a GQA mapping that pairs the wrong heads, a split-K
merge without the max shift ...) and can compute what each mistake would have returned; an
answer that matches one of them gets that mistake's hint. The verdict never shows the reference
code. Everything printed on a pass is an exact count or a stated tolerance, so a passing check
prints the same text on every machine.

A check returns a `Verdict`; in a notebook the check cell displays it (its repr is the message).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

PASSED, NOT_IMPLEMENTED, FAILED = "passed", "not implemented", "failed"
MARK = {PASSED: "✓", NOT_IMPLEMENTED: "…", FAILED: "✗"}


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check; str() and repr() are the message a learner reads."""
    exercise: str                 # "01.1 attention_head: one causal attention head"
    status: str                   # PASSED | NOT_IMPLEMENTED | FAILED
    message: str                  # the whole text
    hint: str | None = None       # FAILED: what is usually wrong

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return self.message

    __repr__ = __str__


@dataclass
class Case:
    """One call of the learner's function, and what kvlab's own code says it must return.

    label:    "random 3 of 12: T=7, D=16" (what kind of case it is, shown when it fails)
    args:     the positional arguments of the call (copied per call by `call`, when given)
    inputs:   how the inputs read in a failure message (defaults to a short description of args)
    expected: the reference answer, or a function of no arguments that computes it (computed
              only after the learner's call, so a stub is detected before anything costly runs)
    """
    label: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    inputs: str | None = None
    expected: Any = None
    call: Callable[[Callable, "Case"], Any] | None = None    # how to call fn (default fn(*args, **kwargs))
    data: dict = field(default_factory=dict)                 # anything a diagnosis needs

    def run(self, fn: Callable):
        if self.call is not None:
            return self.call(fn, self)
        return fn(*self.args, **self.kwargs)

    def reference(self):
        if callable(self.expected):
            self.expected = self.expected()
        return self.expected


class Mismatch(Exception):
    """Raised by a comparison or a case's call: the answer is wrong, and here is how."""

    def __init__(self, where: str, expected: str | None = None, got: str | None = None, hint: str | None = None):
        super().__init__(where)
        self.where, self.expected, self.got, self.hint = where, expected, got, hint


# ---- comparisons: None when equal, else a Mismatch ------------------------------------------------

def compare_tensors(expected, got, *, atol: float, rtol: float = 0.0, name: str = "output") -> Mismatch | None:
    """Same shape, finite where expected is finite, equal within atol + rtol * |expected|."""
    import torch

    if got is None:
        return Mismatch(f"your function returned None (a missing `return`?)", describe(expected), "None")
    if not isinstance(got, torch.Tensor):
        return Mismatch(f"the {name} must be a torch.Tensor", describe(expected), describe(got))
    if tuple(got.shape) != tuple(expected.shape):
        return Mismatch(f"the {name} has the wrong shape", describe(expected), describe(got))
    e, g = expected.detach().double().cpu(), got.detach().double().cpu()
    bad_nan = torch.isfinite(e) & ~torch.isfinite(g)
    if bad_nan.any():
        idx = tuple(int(i) for i in bad_nan.nonzero()[0])
        return Mismatch(f"the {name} holds {int(bad_nan.sum())} NaN or inf values (first at index {idx}) where "
                        f"the answer is finite", describe(expected), describe(got) + f"; {name}{list(idx)} = "
                        f"{float(g[idx])}")
    diff = (g - e).abs()
    bad = diff > atol + rtol * e.abs()
    if not bad.any():
        return None
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return Mismatch(f"{int(bad.sum())} of {bad.numel()} values differ by more than the tolerance "
                    f"(atol {tol(atol)}{f', rtol {tol(rtol)}' if rtol else ''}); the first at index {idx}: "
                    f"expected {float(e[idx]):.4g}, got {float(g[idx]):.4g}",
                    describe(expected), describe(got))


def compare_equal(expected, got, *, name: str = "answer") -> Mismatch | None:
    """Exactly equal (ints, lists, tuples, dicts; numpy and torch integers count as ints)."""
    if got is None and expected is not None:
        return Mismatch("your function returned None (a missing `return`?)", show(expected), "None")
    if normalize(got) != normalize(expected):
        return Mismatch(f"wrong {name}", show(expected), show(got))
    return None


def compare_close(expected: float, got, *, rel: float = 1e-9, name: str = "answer") -> Mismatch | None:
    """A number equal to expected within a relative tolerance (for fractions computed from integers)."""
    try:
        value = float(got)
    except (TypeError, ValueError):
        return Mismatch(f"the {name} must be a number", show(expected), show(got))
    if not math.isclose(value, expected, rel_tol=rel, abs_tol=rel):
        return Mismatch(f"wrong {name} (relative tolerance {tol(rel)})", show(expected), show(got))
    return None


def tol(x: float) -> str:
    """A tolerance as people write it: 1e-05 -> '1e-5', 0.0001 -> '1e-4', 0.5 -> '0.5'."""
    if x >= 0.01:
        return f"{x:g}"
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def normalize(value):
    """Plain Python values, so that [np.int64(3)] == [3] and a tuple equals a list."""
    import numbers

    if isinstance(value, dict):
        return {normalize(k): normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return normalize(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    return value


def describe(value) -> str:
    """A short description: a tensor's dtype and shape, otherwise `show`."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return show(value)


def show(value, limit: int = 300) -> str:
    """repr of plain values (ints with thousands separators), cut to `limit` characters."""
    value = normalize(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        text = f"{value:,}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 20] + f" ... ({len(text)} characters)"


# ---- running a check ------------------------------------------------------------------------------

def not_callable(exercise: str, fn, what: str = "a function") -> Verdict | None:
    if callable(fn):
        return None
    return Verdict(exercise, FAILED, f"{MARK[FAILED]} {exercise}: expected {what}, got {type(fn).__name__} "
                                     f"{show(fn, 60)}. Pass the function itself: check(my_function), not its result.")


def not_implemented(exercise: str, todo: str) -> Verdict:
    return Verdict(exercise, NOT_IMPLEMENTED,
                   f"{MARK[NOT_IMPLEMENTED]} {exercise}: not implemented yet. {todo}")


def passed(exercise: str, checked: str) -> Verdict:
    return Verdict(exercise, PASSED, f"{MARK[PASSED]} {exercise}: passed. {checked}")


def failed(exercise: str, case_label: str, inputs: str | None, where: str, expected: str | None,
           got: str | None, hint: str | None) -> Verdict:
    lines = [f"{MARK[FAILED]} {exercise}: failed on {case_label}."]
    if inputs:
        lines.append(_field("inputs", inputs))
    lines.append(_field("what", where))
    if expected is not None:
        lines.append(_field("expected", expected))
    if got is not None:
        lines.append(_field("got", got))
    if hint:
        lines.append(_field("hint", hint))
    return Verdict(exercise, FAILED, "\n".join(lines), hint)


def _field(name: str, text: str) -> str:
    pad = " " * 12
    body = str(text).replace("\n", "\n" + pad)
    return f"  {name + ':':<10}{body}"


def run_check(exercise: str, fn: Callable, cases: Iterable[Case], *, compare: Callable[[Any, Any], Mismatch | None],
              checked: str | Callable[[int], str], todo: str,
              diagnose: Callable[[Case, Any], str | None] | None = None,
              on_error: Callable[[Case, BaseException], str | None] | None = None, generic_hint: str | None = None,
              what: str = "a function") -> Verdict:
    """Run fn on every case; the first that differs from its reference fails the check.

    compare(expected, got) -> Mismatch or None; diagnose(case, got) -> a hint (which known mistake
    the answer matches) or None; on_error(case, exception) -> a hint for an exception raised by fn.
    checked: what a pass reports (or a function of the number of cases run)."""
    bad = not_callable(exercise, fn, what)
    if bad is not None:
        return bad
    n = 0
    for case in cases:
        n += 1
        try:
            got = case.run(fn)
        except NotImplementedError:
            return not_implemented(exercise, todo)
        except Mismatch as m:                   # a case's own call found the answer wrong (e.g. mid-sequence)
            return failed(exercise, case.label, case.inputs, m.where, m.expected, m.got,
                          m.hint or generic_hint)
        except Exception as err:                # noqa: BLE001 -- the learner's exception is the answer here
            hint = (on_error(case, err) if on_error else None) or generic_hint
            return failed(exercise, case.label, case.inputs, f"your function raised {type(err).__name__}: "
                          f"{_first_line(err)}", describe(case.reference()) if case.expected is not None else None,
                          None, hint)
        problem = compare(case.reference(), got)
        if problem is not None:
            hint = problem.hint or (diagnose(case, got) if diagnose else None) or generic_hint
            return failed(exercise, case.label, case.inputs, problem.where, problem.expected, problem.got, hint)
    return passed(exercise, checked(n) if callable(checked) else checked)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else "(no message)"


def matches(expected_of_mistake, got, compare: Callable) -> bool:
    """Does the answer equal what a known mistake would have returned? (Used by diagnoses.)"""
    try:
        return compare(expected_of_mistake, got) is None
    except Exception:                           # noqa: BLE001 -- a mistake model that cannot be compared: no match
        return False
