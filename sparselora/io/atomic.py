"""Atomic writes: a failed or interrupted write leaves the old file (or folder) intact.

A file save replaces only a regular file, a folder output only a folder: anything else at
an output path (a device, FIFO, socket, link) is an error naming it, whatever the caller's
privileges. The target is replaced only after the new data was written, flushed and
fsynced (a folder: every file and folder in it). New files get the permissions ``open()``
would give them (tempfile makes 0600 files and 0700 folders).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

__all__ = ["atomic_open", "atomic_write_bytes", "check_replaceable", "check_folder_replaceable", "staging_dir",
           "swap_directory", "sync_tree", "default_mode", "mode_for"]

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


def check_folder_replaceable(path: PathLike, arg: str = "output") -> None:
    """Raise ValueError unless ``path`` is absent or a folder (not a link to one): what
    :func:`swap_directory` replaces, checked before the work rather than after it."""
    path = Path(path)
    if os.path.lexists(path) and (path.is_symlink() or not path.is_dir()):
        raise ValueError(f"{arg} {str(path)!r} exists and is not a directory; it is not replaced")


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
        handle = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)  # not yet owned by a file object
        os.unlink(tmp)
        raise
    try:
        yield handle
        # the target is replaced only once the data, flush, fsync and close all succeeded
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        check_replaceable(target)  # nothing may have appeared there meanwhile
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):  # the error being raised is the one to report
            handle.close()
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


def sync_tree(folder: Path) -> None:
    """fsync every regular file and folder under ``folder`` (links are not followed), the
    folders last: what was copied or moved in without its own sync is on disk before the
    tree replaces anything. An error (EIO, a full disk found at sync) propagates."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                _sync_path(path, os.O_RDONLY)
        _sync_path(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _sync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_directory(staging: Path, output: PathLike) -> None:
    """Put the finished folder ``staging`` at ``output``, once its whole tree is synced to disk
    (:func:`sync_tree`). An existing ``output`` (a folder) is moved aside first and removed
    only once the new one is in place; if the swap fails it is moved back, so ``output`` is
    never lost."""
    output = Path(output)
    sync_tree(staging)
    check_folder_replaceable(output)
    if not os.path.lexists(output):
        os.rename(staging, output)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    os.rmdir(aside)  # a free name on the same file system
    os.rename(output, aside)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(aside, output)
        raise
    shutil.rmtree(aside, ignore_errors=True)
