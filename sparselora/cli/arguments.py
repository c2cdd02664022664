"""Argument types and options the commands share.

Every type is a thin adapter over a rule of :mod:`sparselora.rules`: the text is parsed (an
integer, a number, ``N:M``), then checked by the function the Python API checks the same
argument with, so the CLI refuses exactly what the API refuses, with the API's message
(naming the flag) as argparse's one-line error.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, TypeVar

from ..rules import check_sparsity

__all__ = ["integer", "number", "ratio", "checked", "sparsity", "add_progress_option", "add_overwrite_option",
           "progress"]

T = TypeVar("T")


def integer(text: str) -> int:
    """``text`` as an int (ValueError naming the text otherwise)."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def number(text: str) -> float:
    """``text`` as a float (ValueError naming the text otherwise); the rule judges nan/inf."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def ratio(text: str) -> tuple[int, int]:
    """``"N:M"`` as ``(N, M)``; the rule judges the numbers."""
    n, sep, m = text.partition(":")
    if sep and n.isdecimal() and m.isdecimal():
        return int(n), int(m)
    raise ValueError(f"{text!r} is not N:M (e.g. 2:4)")


def checked(rule: Callable[[Any, str], T], flag: str, parse: Callable[[str], Any] = number) -> Callable[[str], T]:
    """argparse type of ``flag``: the text read by ``parse``, then ``rule(value, flag)``.

    The parser's ValueError and the rule's TypeError/ValueError become the
    ``argparse.ArgumentTypeError`` that argparse prints as a one-line error (exit 2).
    """
    def convert(text: str) -> T:
        try:
            return rule(parse(text), flag)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = f"type of {flag}"
    return convert


sparsity = checked(check_sparsity, "--sparsity")


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def progress(args: argparse.Namespace) -> bool | None:
    """The API's ``progress=``: False with --no-progress, else None (bars on a terminal)."""
    return False if args.no_progress else None
