"""Small value types and the rules every backend applies alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["PruneThreshold", "masks_under_threshold", "raise_nonfinite"]


@dataclass(frozen=True)
class PruneThreshold:
    """Where a comparison group is cut.

    Every score below ``value`` is pruned, and so are the first ``ties`` scores equal to
    ``value`` in flat order (tensors in the order given, row-major inside each). ``value``
    is ``-inf`` when nothing is pruned.
    """

    value: float
    ties: int


def masks_under_threshold(scores: Sequence, threshold: PruneThreshold, write: Callable, absolute: bool) -> list:
    """Keep-masks of a group's tensors, walked in order so the ties go lowest flat index
    first; ``write(score, threshold, ties_left, absolute)`` returns (mask, ties used)."""
    masks, ties_left = [], threshold.ties
    for score in scores:
        mask, used = write(score, threshold, ties_left, absolute)
        ties_left -= used
        masks.append(mask)
    return masks


def raise_nonfinite(count: int) -> None:
    """The one refusal of NaN/inf scores, raised by every backend that counted ``count`` of them."""
    if count:
        raise ValueError(f"scores contain {count} NaN or inf values; scores must be finite")

