"""Argument checks shared by kvlab's public functions, so that every message reads alike.

A learner who passes a bad argument gets a TypeError (wrong kind of thing) or a ValueError
(right kind, impossible value) whose message names the argument, says what is allowed and
shows what came:

    layers must be a positive integer, got the bool True
    context_len must be a positive integer, got float 4096.5
    gpu_memory_utilization must be a number in (0, 1], got nan

Numbers from numpy count as numbers (np.int64(4096) is the integer 4096, and a message
shows it as 4096, never as "np.int64(4096)"); bool is never a number here (True is not a
layer count), although Python lets it pass for 1.
"""

from __future__ import annotations

import math
import numbers
import operator


def shown(value) -> str:
    """How a message shows a value of the wrong kind: its type, then a short repr."""
    if value is None:
        return "None"
    if _is_bool(value):
        return f"the bool {bool(value)}"
    return f"{type(value).__name__} {brief(value)}"


def brief(value) -> str:
    """repr, cut to 60 characters (a 400-digit integer stays readable)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:45] + f"... ({len(text)} characters)"


def _is_bool(value) -> bool:
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None,
            allowed: str | None = None) -> int:
    """value as a plain int (numpy and other integer types accepted, bool refused), within
    minimum..maximum. TypeError when it is not an integer, ValueError when out of range."""
    if allowed is None:
        if minimum == 1 and maximum is None:
            allowed = "a positive integer"
        elif maximum is None:
            allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        else:
            allowed = f"an integer in {minimum}..{maximum}"
    if _is_bool(value):
        raise TypeError(f"{name} must be {allowed}, got {shown(value)}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {allowed}, got {shown(value)}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {brief(value)}")
    return value


# The largest count kvlab takes (int64, what a tensor or numpy array can hold): it keeps every
# byte count exact and every float conversion in a message finite.
INT64_MAX = 2**63 - 1


def positive_int(name: str, value, allowed: str | None = None, maximum: int | None = None) -> int:
    return integer(name, value, minimum=1, maximum=maximum, allowed=allowed)


def count(name: str, value, *, optional: bool = False) -> int | None:
    """A positive integer below 2**63 (a layer count, a length, a byte count); None too when
    optional."""
    if optional and value is None:
        return None
    allowed = "a positive integer below 2**63" + (" or None" if optional else "")
    return integer(name, value, minimum=1, maximum=INT64_MAX, allowed=allowed)


def real(name: str, value, allowed: str) -> float:
    """value as a float (ints and numpy numbers accepted, bool refused); TypeError when it is
    not a real number, ValueError when it is NaN or too large for a float. Range checks are
    the caller's (say them in `allowed`)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {shown(value)}")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {allowed}, got {brief(value)} (too large for a float)") from None
    if math.isnan(out):
        raise ValueError(f"{name} must be {allowed}, got nan")
    return out


def in_range(name: str, value, low: float, high: float, allowed: str, *, low_open: bool = False,
             high_open: bool = False) -> float:
    """A real number in [low, high], an end excluded when open (so inf passes only where high
    is inf and closed), e.g. in_range("rate", r, 0, math.inf, "a positive finite number",
    low_open=True, high_open=True)."""
    out = real(name, value, allowed)
    if out < low or (low_open and out == low) or out > high or (high_open and out == high):
        raise ValueError(f"{name} must be {allowed}, got {out!r}")
    return out


def whole_number(name: str, value, minimum: int, allowed: str) -> int:
    """An int, or a float that is a whole number (80e9 bytes), >= minimum; fractions refused."""
    if isinstance(value, float) or type(value).__module__ == "numpy" and isinstance(value, numbers.Real) \
            and not isinstance(value, numbers.Integral):
        out = real(name, value, allowed)
        if not math.isfinite(out) or not out.is_integer():
            raise ValueError(f"{name} must be {allowed}, got {out!r}")
        value = int(out)
    value = integer(name, value, allowed=allowed)
    if value < minimum:
        raise ValueError(f"{name} must be {allowed}, got {brief(value)}")
    return value


def text(name: str, value, allowed: str = "a non-empty string") -> str:
    """A non-empty str."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {allowed}, got {shown(value)}")
    if not value.strip():
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def boolean(name: str, value) -> bool:
    """True or False (numpy's bool too); anything else, 0 and 1 included, is a TypeError."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be True or False, got {shown(value)}")
    return bool(value)
