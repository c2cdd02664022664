"""Small value types shared by the ops and their backends."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PruneThreshold"]


@dataclass(frozen=True)
class PruneThreshold:
    """Where a comparison group is cut.

    Every score below ``value`` is pruned, and so are the first ``ties`` scores equal to
    ``value`` in flat order (tensors in the order given, row-major inside each). ``value``
    is ``-inf`` when nothing is pruned.
    """

    value: float
    ties: int
