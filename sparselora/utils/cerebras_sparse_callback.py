"""Cerebras ModelZoo integration: ``SparseMaskCallback`` and ``create_sparse_config``.

Not implemented yet: both raise ``NotImplementedError`` rather than pretend to work.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["SparseMaskCallback", "create_sparse_config"]

_PENDING = (
    "the Cerebras ModelZoo backend is not implemented yet; until it is, prune the "
    "checkpoint with sparselora.pruning.mask_ops.apply_masks_to_model and use "
    "ModelZoo's own sparsity settings"
)


class SparseMaskCallback:
    """ModelZoo callback that keeps pruned weights at zero during training (pending)."""

    def __init__(self, mask_path: str, apply_every_step: bool = False) -> None:
        raise NotImplementedError(_PENDING)


def create_sparse_config(
    base_config: Mapping[str, Any],
    mask_path: str,
    lora_config: Mapping[str, Any] | None = None,
    sparse_mode: str = "sparse_to_dense",
) -> dict[str, Any]:
    """Return a ModelZoo trainer config carrying the masks and LoRA settings (pending)."""
    raise NotImplementedError(_PENDING)
