"""The built-in calibration text: the docstrings of Python's standard library (no download).

One-shot pruning calibrates on it when no text is given; the demo trains its small model on it.
"""

from __future__ import annotations

import importlib
import inspect

__all__ = ["stdlib_text"]

_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "fractions", "functools", "heapq", "http.client", "inspect",
    "itertools", "json", "logging", "pathlib", "pickle", "random", "re", "shutil", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "zipfile",
)


def stdlib_text() -> str:
    """Module, class and function docstrings of a fixed list of stdlib modules."""
    parts: list[str] = []
    for name in _MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            parts.append(inspect.cleandoc(module.__doc__))
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and (inspect.isfunction(obj) or inspect.isclass(obj)):
                parts.append(doc)
    return "\n\n".join(parts)
