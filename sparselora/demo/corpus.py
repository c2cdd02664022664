"""The demo's training corpus: byte windows of the built-in text.

The text itself (the docstrings of Python's standard library, no download) is the built-in
calibration text of :mod:`sparselora.pruning.calibration_text`, re-exported here as ``stdlib_text``.
"""

from __future__ import annotations

import torch

from ..pruning.calibration_text import stdlib_text

__all__ = ["stdlib_text", "byte_dataset", "batches"]


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
