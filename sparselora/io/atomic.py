"""Atomic writes: a failed or interrupted write leaves the old file (or folder) intact.

Only regular files are ever replaced: a device, FIFO, socket or directory at an output
path is an error naming it, whatever the caller's privileges. New files get the
permissions ``open()`` would give them (tempfile makes 0600 files and 0700 folders).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

__all__ = ["atomic_open", "atomic_write_bytes", "check_replaceable", "staging_dir", "swap_directory", "default_mode", "mode_for"]

PathLike = Union[str, os.PathLike]


def default_mode(directory: bool = False) -> int:
    """0o666 (files) or 0o777 (folders) less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def mode_for(target: Path) -> int:
    """The permissions ``open()`` would leave: the old file's, or the default."""
    with contextlib.suppress(FileNotFoundError):
        return target.stat().st_mode & 0o7777
    return default_mode()


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def check_replaceable(path: PathLike, arg: str = "output") -> None:
    """Raise ValueError unless ``path`` is absent or a regular file (or a link to one)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    for test, kind in _KINDS:
        if test(mode):
            raise ValueError(f"{arg} {str(path)!r} is {kind}; only a regular file is replaced by a save")


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[IO[bytes]]:
    """Open a temporary file beside ``path`` for binary writing; on success it replaces
    ``path`` with ``os.replace``, on error it is removed and ``path`` is untouched."""
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"directory {str(target.parent)!r} does not exist (writing {str(target)!r})")
    check_replaceable(target)
    mode = mode_for(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        check_replaceable(target)  # nothing may have appeared there meanwhile
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(data)


def staging_dir(output: PathLike) -> Path:
    """A fresh hidden folder beside ``output`` (same file system, so it can be renamed
    into place), with the permissions ``mkdir`` would give."""
    output = Path(output)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output directory's parent {str(output.parent)!r} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    os.chmod(staging, default_mode(directory=True))
    return staging


def swap_directory(staging: Path, output: PathLike) -> None:
    """Put the finished folder ``staging`` at ``output``. An existing ``output`` (a folder)
    is moved aside first and removed only once the new one is in place; if the swap fails
    it is moved back, so ``output`` is never lost."""
    output = Path(output)
    if not output.exists() and not output.is_symlink():
        os.rename(staging, output)
        return
    if output.is_symlink() or not output.is_dir():
        raise ValueError(f"output {str(output)!r} exists and is not a directory; it is not replaced")
    aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    os.rmdir(aside)  # a free name on the same file system
    os.rename(output, aside)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(aside, output)
        raise
    shutil.rmtree(aside, ignore_errors=True)
