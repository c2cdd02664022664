"""Paths named inside files stay inside their folder; outputs stay apart from inputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

__all__ = ["contained", "check_apart"]

PathLike = Union[str, os.PathLike]


def contained(folder: Path, entry: object, index: Path) -> Path:
    """The file ``entry`` names relative to ``folder``, resolved (symlinks followed).

    ``entry`` comes from inside ``index`` (a checkpoint or mask index): it must be a relative
    path that resolves inside ``folder``; anything else is a ValueError naming the index and
    the entry, raised before the file is opened.
    """
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"index {str(index)!r} names {entry!r}; entries must be file names (strings)")
    if os.path.isabs(entry):
        raise ValueError(f"index {str(index)!r} names {entry!r}, an absolute path; entries must lie in {str(folder)!r}")
    base = folder.resolve()
    target = (folder / entry).resolve()
    if target != base and base not in target.parents:
        raise ValueError(
            f"index {str(index)!r} names {entry!r}, which resolves to {str(target)!r} outside {str(base)!r}; "
            "files named by an index must lie in its folder"
        )
    return target


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_apart(output: PathLike, inputs: Iterable[PathLike], arg: str = "output") -> None:
    """Raise ValueError when ``output`` equals, lies inside, or contains one of ``inputs``
    (compared after resolving symlinks): writing it could replace what is being read."""
    out = Path(output).resolve()
    for item in inputs:
        source = Path(item).resolve()
        folder = source if source.is_dir() else source.parent
        if _overlaps(out, source) or (source.is_dir() and _overlaps(out, folder)):
            raise ValueError(
                f"{arg} {str(output)!r} overlaps the input {str(item)!r} (the same path, inside it, or containing "
                "it); write the output somewhere else"
            )
