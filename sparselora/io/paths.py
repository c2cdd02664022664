"""Paths named inside files stay inside their folder; outputs stay apart from inputs.

An index (a checkpoint's or a mask folder's ``*.index.json``) names its files by plain
relative names: ``/``-separated components, none of them empty, ``.`` or ``..``, no
absolute path, no drive letter, no backslash. The check is on the name alone, so the file
it names may be a symlink and is opened through the link: the Hugging Face hub cache keeps
``snapshots/<rev>/model-00001-of-00002.safetensors`` as a link to ``../../blobs/<sha>``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Union

__all__ = ["contained", "check_apart"]

PathLike = Union[str, os.PathLike]

_DRIVE = re.compile(r"^[A-Za-z]:")  # "C:x" is relative to drive C's current folder on Windows


def _entry_problem(entry: object) -> str | None:
    """Why ``entry`` is not a plain relative file name, or None when it is one."""
    if not isinstance(entry, str):
        return f"a {type(entry).__name__}, not a file name"
    if not entry:
        return "an empty name"
    if "\x00" in entry:
        return "a name with a NUL character"
    if "\\" in entry:
        return "a name with a backslash (a separator on Windows)"
    if entry.startswith("/") or os.path.isabs(entry):
        return "an absolute path"
    parts = entry.split("/")
    if any(_DRIVE.match(part) for part in parts):
        return "a name with a drive letter"
    if "" in parts:
        return "a name with an empty component"
    if "." in parts or ".." in parts:
        return "a name with a '.' or '..' component"
    return None


def contained(folder: Path, entry: object, index: Path) -> Path:
    """The file ``entry`` names in ``folder``: ``folder / entry``, not resolved.

    ``entry`` comes from inside ``index`` (a checkpoint or mask index) and must be a plain
    relative name (see the module's rule); anything else is a ValueError naming the index
    and the entry, raised before any file is opened. Symlinks are not resolved here: the
    named file may be one, and callers open it through the link.
    """
    problem = _entry_problem(entry)
    if problem is not None:
        raise ValueError(
            f"index {str(index)!r} names {entry!r}, {problem}; entries must be plain relative file names inside "
            f"{str(folder)!r} ('/'-separated, no '..' or '.', no absolute path, drive letter, backslash or empty "
            "component)"
        )
    return Path(folder) / entry


def _forms(path: PathLike) -> set[Path]:
    """``path`` as named (made absolute) and with every symlink resolved."""
    return {Path(os.path.abspath(path)), Path(path).resolve()}


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_apart(output: PathLike, inputs: Iterable[PathLike], arg: str = "output") -> None:
    """Raise ValueError when ``output`` equals, lies inside, or contains one of ``inputs``,
    compared both as named and with symlinks resolved: writing it could replace what is
    being read, be it the folder the user named or the files its links lead to (the
    ``blobs/`` of a hub cache). Callers pass every file they read, not only its folder."""
    outs = _forms(output)
    for item in inputs:
        if any(_overlaps(out, source) for out in outs for source in _forms(item)):
            raise ValueError(
                f"{arg} {str(output)!r} overlaps the input {str(item)!r} (the same path, inside it, or containing "
                "it, as named or through symlinks); write the output somewhere else"
            )
