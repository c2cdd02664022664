"""Calibration batches for one-shot pruning: token windows cut from a text.

Wanda, SparseGPT and OWL need inputs that look like what the model will see. The papers
use 128 random windows of 2048 tokens from C4; here any text works (a file, or the
built-in text of :mod:`.calibration_text`: the docstrings of Python's standard library, so
nothing is downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch

from ..rules import check_positive_int
from .calibration_text import stdlib_text

__all__ = ["builtin_text", "read_text", "calibration_batches"]


def builtin_text() -> str:
    """The built-in calibration text (docstrings of a fixed set of stdlib modules)."""
    return stdlib_text()


def read_text(path: Union[str, os.PathLike]) -> str:
    """A UTF-8 text file's content; a clear error for a missing or non-text file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"calibration file {str(file)!r} does not exist or is not a file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"calibration file {str(file)!r} is not UTF-8 text ({exc.reason})") from None


def calibration_batches(
    tokenizer: Any,
    text: str | None = None,
    *,
    samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets in ``text``
    (the built-in text when None), as ``{"input_ids": (b, seq_len)}`` batches of up to
    ``batch_size``. ``tokenizer`` is a Hugging Face tokenizer (anything with ``encode``).
    """
    samples = check_positive_int(samples, "samples")
    seq_len = check_positive_int(seq_len, "seq_len")
    batch_size = check_positive_int(batch_size, "batch_size")
    if text is None:
        text = builtin_text()
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = tokenizer.encode(text, add_special_tokens=False) if hasattr(tokenizer, "encode") else None
    if ids is None:
        raise TypeError(f"tokenizer={type(tokenizer).__name__} has no encode(); pass a Hugging Face tokenizer")
    tokens = torch.as_tensor(ids, dtype=torch.long)
    if tokens.numel() <= seq_len:
        raise ValueError(f"the calibration text has {tokens.numel()} tokens; seq_len={seq_len} needs more "
                         "(give a longer text or a smaller seq_len)")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (samples,), generator=generator).tolist()
    windows = torch.stack([tokens[s : s + seq_len] for s in starts])
    return [{"input_ids": chunk} for chunk in windows.split(batch_size)]
