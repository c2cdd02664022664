"""The outputs of one CLI run, so that a failure removes what the run created and nothing else."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import signal
from pathlib import Path
from typing import Sequence

__all__ = ["Outputs", "remove", "discard"]


class Outputs:
    """The outputs of one run and what was at their paths before it started.

    On failure, :meth:`discard` removes what this run created there and nothing that
    existed before: a path that was absent is removed whole; inside a directory that
    existed, only new entries whose names match the glob patterns given for it.
    """

    def __init__(self) -> None:
        self._paths: list[tuple[Path, bool, frozenset[str] | None, tuple[str, ...]]] = []
        self.aliases: dict[str, str] = {}  # internal path -> the path the user gave, for messages

    def add(self, path: Path, new_entries: Sequence[str] = ()) -> None:
        """Record ``path`` as it is now (call before anything is written to it)."""
        existed = os.path.lexists(path)
        entries = None
        if existed and new_entries and path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                entries = frozenset(os.listdir(path))
        self._paths.append((path, existed, entries, tuple(new_entries)))

    def created(self, path: Path) -> None:
        """Record ``path`` as made by this run (a staging directory)."""
        self._paths.append((path, False, None, ()))

    def discard(self) -> None:
        for path, existed, entries, patterns in reversed(self._paths):
            if not existed:
                remove(path)
            elif entries is not None:
                with contextlib.suppress(OSError):
                    for name in set(os.listdir(path)) - entries:
                        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                            remove(path / name)


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink()


def discard(outputs: Outputs) -> None:
    """Remove this run's outputs; a second Ctrl-C does not stop the cleanup halfway."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # not the main thread
        previous = None
    try:
        outputs.discard()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


