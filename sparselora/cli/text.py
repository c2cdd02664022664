"""What the CLI prints: one line of plain text per error or warning."""

from __future__ import annotations

import re

__all__ = ["one_line", "printable", "describe"]

# ANSI/VT escape sequences (CSI, OSC, two-byte) and the other control characters
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# the Python API's words for what the CLI calls flags
_API_WORDS = [
    (re.compile(r"overwrite=True\s*\(--overwrite\)"), "--overwrite"),
    (re.compile(r"\boverwrite=True\b"), "--overwrite"),
    (re.compile(r"distributed=True\s*\(--distributed\)"), "--distributed"),
    (re.compile(r"\bdistributed=True\b"), "--distributed"),
]


def one_line(text: object) -> str:
    """``text`` as one line of plain text: escape sequences and control characters
    stripped, lines joined with spaces, the API's ``overwrite=True`` read as ``--overwrite``."""
    text = _ESCAPES.sub("", str(text)).replace("\t", " ")
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    text = _CONTROLS.sub("", text)
    for pattern, flag in _API_WORDS:
        text = pattern.sub(flag, text)
    return text


def printable(text: object) -> str:
    """A name or value read from a file, safe to print: control characters (escape
    sequences, newlines) are shown escaped instead of reaching the terminal."""
    text = str(text)
    if _CONTROLS.search(text) or any(c in text for c in "\n\t\u2028\u2029\x85"):
        return text.encode("unicode_escape").decode("ascii")
    return text


# exceptions that carry a message written for the user: printed as is, without their type
_DOCUMENTED = (ValueError, TypeError, OSError, RuntimeError)


def describe(exc: BaseException, aliases: dict[str, str] | None = None) -> str:
    """``exc`` as one line; ``aliases`` maps internal paths (staging files) to the user's."""
    message = str(exc)
    for internal, shown in sorted((aliases or {}).items(), key=lambda item: -len(item[0])):
        message = message.replace(internal, shown)
    message = one_line(message)
    if isinstance(exc, _DOCUMENTED):
        return message or type(exc).__name__
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


