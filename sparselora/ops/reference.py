"""Pure-PyTorch implementations of every op: always available, and the oracle in tests.

Written for clarity over speed: each follows the op's definition directly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._dispatch import register
from ._types import PruneThreshold, masks_under_threshold

__all__ = [
    "prune_threshold",
    "write_prune_mask",
    "select_prune_mask",
    "apply_mask_",
    "merge_lora_",
    "masked_lora_weight",
    "masked_lora_linear",
]

REFERENCE_PRIORITY = 0


def _compare_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    # fp16/bf16/fp32 values are all exact in fp32; fp64 needs fp64.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _keys(score: torch.Tensor, absolute: bool, dtype: torch.dtype) -> torch.Tensor:
    key = score.to(dtype).reshape(-1)
    return key.abs() if absolute else key


@register("prune_threshold", "reference", priority=REFERENCE_PRIORITY)
def prune_threshold(scores: Sequence[torch.Tensor], k: int, absolute: bool) -> PruneThreshold:
    dtype = _compare_dtype(scores)
    flat = torch.cat([_keys(s.detach().cpu(), absolute, dtype) for s in scores])
    bad = int((~torch.isfinite(flat)).sum())
    if bad:
        raise ValueError(f"scores contain {bad} NaN or inf values; scores must be finite")
    if k == 0:
        return PruneThreshold(float("-inf"), 0)
    value = torch.kthvalue(flat, k).values
    below = int((flat < value).sum())
    return PruneThreshold(float(value), k - below)


@register("write_prune_mask", "reference", priority=REFERENCE_PRIORITY)
def write_prune_mask(
    score: torch.Tensor, threshold: PruneThreshold, ties_left: int, absolute: bool, packed: bool = False
) -> tuple[torch.Tensor, int]:
    dtype = torch.float64 if score.dtype == torch.float64 else torch.float32
    key = _keys(score.detach(), absolute, dtype)
    pruned = key < threshold.value
    used = 0
    if ties_left > 0:
        tied = key == threshold.value
        # the first `ties_left` tied elements in flat order are pruned
        take = tied & (torch.cumsum(tied, 0) <= ties_left)
        used = int(take.sum())
        pruned |= take
    keep = (~pruned).view(score.shape)
    return (_pack(keep) if packed else keep), used


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> ceil(n/8) uint8 bytes, least significant bit first (on the CPU)."""
    return torch.from_numpy(np.packbits(mask.cpu().reshape(-1).numpy(), bitorder="little"))


@register("select_prune_mask", "reference", priority=REFERENCE_PRIORITY)
def select_prune_mask(scores: Sequence[torch.Tensor], k: int, absolute: bool) -> list[torch.Tensor]:
    return masks_under_threshold(scores, prune_threshold(scores, k, absolute), write_prune_mask, absolute)


@register("apply_mask_", "reference", priority=REFERENCE_PRIORITY)
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # masked_fill, not mul: a pruned NaN/inf must become 0, not NaN
    return weight.masked_fill_(~mask, 0)


def _accumulate_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _merged(weight, lora_A, lora_B, scaling, mask, acc: torch.dtype) -> torch.Tensor:
    """``(W + scaling·B@A) ⊙ M`` in ``acc`` (W None: the delta alone; M None: no mask)."""
    merged = scaling * (lora_B.to(acc) @ lora_A.to(acc))
    if weight is not None:
        merged = merged + weight.to(acc)
    return merged if mask is None else merged.masked_fill(~mask, 0)


@register("merge_lora_", "reference", priority=REFERENCE_PRIORITY)
def merge_lora_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    return weight.copy_(_merged(weight, lora_A, lora_B, scaling, mask, _accumulate_dtype(weight)))


@register("masked_lora_weight", "reference", priority=REFERENCE_PRIORITY)
def masked_lora_weight(
    weight: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor,
) -> torch.Tensor:
    like = lora_A if weight is None else weight
    return _merged(weight, lora_A, lora_B, scaling, mask, _accumulate_dtype(like)).to(like.dtype)


@register("masked_lora_linear", "reference", priority=REFERENCE_PRIORITY)
def masked_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return F.linear(x, masked_lora_weight(weight, lora_A, lora_B, scaling, mask), bias)


def _order_keys(score: torch.Tensor, absolute: bool) -> torch.Tensor:
    """Order-preserving 32-bit keys (as int64) of ``score``'s fp32 values; -0 maps onto +0."""
    bits = score.detach().float().reshape(-1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if absolute:
        return bits & 0x7FFFFFFF
    flipped = torch.where(bits >= 0x80000000, (~bits) & 0xFFFFFFFF, bits | 0x80000000)
    return torch.where((bits & 0x7FFFFFFF) == 0, torch.full_like(bits, 0x80000000), flipped)


@register("key_histogram", "reference", priority=REFERENCE_PRIORITY)
def key_histogram(score: torch.Tensor, absolute: bool, high: int) -> torch.Tensor:
    if score.numel() and not bool(torch.isfinite(score).all()):
        raise ValueError("scores contain NaN or inf values; scores must be finite")
    keys = _order_keys(score.cpu(), absolute)
    if high < 0:
        return torch.bincount(keys >> 16, minlength=65536)
    return torch.bincount(keys[(keys >> 16) == high] & 0xFFFF, minlength=65536)
