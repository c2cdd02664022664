"""Argument rules: each check is written here once, with the one message every caller gives.

Every public entry point (the ops, the pruning API, one-shot pruning, LoRA, the Cerebras
configs and the CLI's argument types) checks its arguments with these functions, so the same
bad value is refused the same way everywhere. A wrong type raises ``TypeError``, a value
outside the accepted range ``ValueError``; both name the argument, the value and what would
be accepted. ``bool`` is never taken for a number: ``True`` is not a sparsity of 1.0.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = [
    "is_int",
    "check_int",
    "check_positive_int",
    "check_number",
    "check_finite",
    "check_sparsity",
    "check_dropout",
    "check_nm",
    "check_choice",
    "check_bool",
]


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, not to this library)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(kind: str, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """The accepted values in words: ``an int >= 1``, ``a number in [0, 1)``."""
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def check_int(value: object, arg: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within ``[minimum, maximum]`` (either bound may be open-ended)."""
    wanted = _describe("an int", minimum, maximum, False, False)
    if not is_int(value):
        raise TypeError(f"{arg}={value!r} must be {wanted}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{arg}={value!r} must be {wanted}")
    return value


def check_positive_int(value: object, arg: str) -> int:
    """``value`` as an int >= 1 (ranks, steps, sizes, counts of samples)."""
    return check_int(value, arg, minimum=1)


def check_number(value: object, arg: str, *, low: float | None = None, high: float | None = None,
                 high_open: bool = False, low_open: bool = False, wanted: str | None = None) -> float:
    """``value`` as a finite float within the given bounds (closed unless ``*_open``).

    ``wanted`` replaces the generated description of the accepted values in the message.
    """
    if wanted is None:
        kind = "a number" if low is not None and high is not None else "a finite number"
        wanted = _describe(kind, low, high, low_open, high_open)
    if not _is_number(value):
        raise TypeError(f"{arg}={value!r} must be {wanted}")
    number = float(value)
    inside = math.isfinite(number)
    if inside and low is not None:
        inside = number > low if low_open else number >= low
    if inside and high is not None:
        inside = number < high if high_open else number <= high
    if not inside:
        raise ValueError(f"{arg}={value!r} must be {wanted}")
    return number


def check_finite(value: object, arg: str) -> float:
    """``value`` as a finite float (LoRA's alpha, learning rates)."""
    return check_number(value, arg)


def check_sparsity(value: object, arg: str = "sparsity") -> float:
    """``value`` as a fraction pruned, a float in [0, 1]."""
    return check_number(value, arg, low=0.0, high=1.0, wanted="a float in [0, 1]")


def check_dropout(value: object, arg: str = "dropout") -> float:
    """``value`` as a dropout probability, a float in [0, 1)."""
    return check_number(value, arg, low=0.0, high=1.0, high_open=True, wanted="a float in [0, 1)")


def check_nm(n: object, m: object, arg: str | None = None) -> tuple[int, int]:
    """``(n, m)`` of an N:M pattern: ``n`` kept in every ``m``, ints with ``0 < n < m``.

    ``arg`` names a pair argument (``nm=(n, m)``); None when ``n`` and ``m`` are arguments of
    their own. ``n == m`` keeps everything and ``n == 0`` nothing; neither is an N:M pattern
    (``sparsity=0`` or ``1`` says those), so both are refused.
    """
    shown = f"n={n!r}, m={m!r}" if arg is None else f"{arg}=({n!r}, {m!r})"
    message = f"{shown} must be ints with 0 < n < m, e.g. 2:4"
    if not (is_int(n) and is_int(m)):
        raise TypeError(message)
    if not 0 < n < m:
        raise ValueError(message)
    return n, m


def check_choice(value: object, arg: str, accepted: Sequence[str]) -> str:
    """``value`` as one of the names in ``accepted``."""
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{arg}={value!r} is unknown; accepted: {', '.join(accepted)}")
    return value


def check_bool(value: object, arg: str) -> bool:
    """``value`` as a bool (``0``/``1`` and other truthy values are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{arg}={value!r} must be True or False")
    return value
