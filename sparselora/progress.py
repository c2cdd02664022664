"""Progress-bar switch shared by every long-running function."""

from __future__ import annotations

__all__ = ["bar_disabled"]


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable=`` for a ``progress`` argument: True shows the bar, False hides it,
    None shows it only when writing to a terminal (tqdm's own ``disable=None``)."""
    return None if progress is None else not progress
