"""A built-in training corpus: the docstrings of Python's standard library (no download)."""

from __future__ import annotations

import importlib
import inspect

import torch

__all__ = ["stdlib_text", "byte_dataset", "batches"]

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


def byte_dataset(text: str, context: int, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``text`` into train/validation byte tensors (validation = the tail)."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    cut = int(len(data) * (1 - val_fraction))
    if cut < context + 1 or len(data) - cut < context + 1:
        raise ValueError("corpus too small for the context length")
    return data[:cut], data[cut:]


def batches(data: torch.Tensor, batch_size: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """One batch of random windows of ``context + 1`` bytes."""
    starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
    return torch.stack([data[s : s + context + 1] for s in starts.tolist()])
