"""The inputs of the current decoder block: captured from the model, kept in memory or on disk.

The calibration batches run through the model up to its first decoder block, where a hook
stops the forward pass and keeps what the block was called with: the hidden states go into
an :class:`ActivationStore`, the other arguments (attention masks, positions, rotary
embeddings) are kept per batch and passed again to every block.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from ..importance import run_batch
from .blocks import BlockSource

__all__ = ["ActivationStore", "block_output", "capture_inputs", "capture_block_inputs"]


class ActivationStore:
    """The current inputs of a block, one tensor per calibration batch, in memory or on disk
    (files under ``folder``, named by ``generation`` so that two stores can share it)."""

    def __init__(self, folder: Path | None, generation: int | str) -> None:
        self.folder, self.generation = folder, generation
        self.items: list[Any] = []

    def append(self, tensor: torch.Tensor) -> None:
        if self.folder is None:
            self.items.append(tensor)
            return
        from safetensors.torch import save_file

        path = self.folder / f"inputs-{self.generation}-{len(self.items)}.safetensors"
        save_file({"x": tensor.contiguous()}, str(path))
        self.items.append(path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.items[index]
        if self.folder is None:
            return item
        from safetensors.torch import load_file

        return load_file(str(item))["x"]

    def discard(self) -> None:
        if self.folder is not None:
            for path in self.items:
                path.unlink(missing_ok=True)
        self.items = []


def block_output(result: Any) -> torch.Tensor:
    """The hidden states a decoder block returns (alone, or first of a tuple)."""
    return result[0] if isinstance(result, (tuple, list)) else result


class _BlockInputs(Exception):
    """Raised by the hook on the first block: the rest of the forward pass is not needed."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


def _cache_off(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` when the model's forward takes it, whatever form the batch has."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _is_cache(value: Any) -> bool:
    # transformers' KV caches (DynamicCache, StaticCache, ...) share a base class named Cache;
    # matched by name so that transformers stays optional
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


def _without_caches(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block call's arguments with any KV cache replaced by None: a cache captured once
    would be appended to by every later call of every block and attended over."""
    return (tuple(None if _is_cache(a) else a for a in args),
            {k: (None if _is_cache(v) else v) for k, v in kwargs.items()})


def capture_inputs(model: nn.Module, first_block: nn.Module, batches: Iterable, store: ActivationStore) -> list[tuple]:
    """Run each batch up to ``first_block``; keep its hidden states in ``store`` and return
    the other arguments it was called with (attention masks, positions), one per batch."""
    def hook(_module, args, kwargs):
        raise _BlockInputs(args, kwargs)

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    options = _cache_off(model)
    extras: list[tuple] = []
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    run_batch(model, batch, **options)
                except _BlockInputs as captured:
                    args, kwargs = _without_caches(captured.args, dict(captured.kwargs))
                    hidden = args[0] if args else kwargs.pop("hidden_states")
                    store.append(hidden)
                    extras.append((tuple(args[1:]), kwargs))
                    continue
                raise RuntimeError("the forward pass never reached the first decoder block")
    finally:
        handle.remove()
    return extras


def capture_block_inputs(model: nn.Module, source: BlockSource, batches: Sequence,
                         store: ActivationStore) -> list[tuple]:
    """:func:`capture_inputs` for the first block of ``source``, with the weights before it
    (the embeddings) in memory for the time it takes."""
    first = source.load(0)
    source.open_stem()
    try:
        return capture_inputs(model, first, batches, store)
    finally:
        source.close_stem()
