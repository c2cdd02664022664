"""Reading and writing safetensors files one tensor at a time.

The reader parses and checks the header itself and reads each tensor with plain file
reads (no mmap), so resident memory stays at one tensor whatever the file size. The
writer lays out the header up front from the names, dtypes and shapes, then streams the
tensors in order into a temporary file that replaces the target only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Iterable, Mapping, Union

import torch

from .atomic import atomic_open

__all__ = ["SafetensorsReader", "SafetensorsWriter", "DTYPE_CODES", "CORRUPT"]

PathLike = Union[str, os.PathLike]
DTYPE_CODES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODE_OF = {v: k for k, v in DTYPE_CODES.items()}
_MAX_HEADER = 100 * 2**20
CORRUPT = "is not a valid safetensors file"


def _read_at(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` at ``offset`` of ``fd`` (no shared file position); bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.readv(fd, [view])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SafetensorsReader:
    """Header and per-tensor reads of one ``.safetensors`` file.

    The header is checked strictly: each entry names a known dtype, a shape of integers
    >= 0 and an integer byte range of exactly the right length inside the data, ranges do
    not overlap, and ``__metadata__`` maps strings to strings; anything else is a
    ValueError naming the file. Every read goes through one open file descriptor, and a
    file whose size, modification time or inode changes while it is open (rewritten
    between two passes) is a ValueError naming it.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint file {str(self.path)!r} does not exist")
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            info = os.fstat(self._fd)
            self._identity = (info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)
            self._parse(info.st_size)
        except BaseException:
            self.close()
            raise

    def _corrupt(self, why: str) -> ValueError:
        return ValueError(f"{str(self.path)!r} {CORRUPT}: {why}")

    def _parse(self, size: int) -> None:
        raw = os.pread(self._fd, 8, 0)
        if len(raw) < 8:
            raise self._corrupt("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_MAX_HEADER, size - 8):
            raise self._corrupt(f"header length {length} exceeds the file")
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(f"header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise self._corrupt("__metadata__ must be an object of strings")
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + length
        data_size = size - self._data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if not isinstance(info, dict) or info.get("dtype") not in DTYPE_CODES:
                raise self._corrupt(f"entry {name!r} has no known dtype")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise self._corrupt(f"entry {name!r} has shape {shape!r}; dims must be integers >= 0")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
                raise self._corrupt(f"entry {name!r} has data_offsets {offsets!r}; expected two integers")
            dtype, (begin, end) = DTYPE_CODES[info["dtype"]], offsets
            numel = 1
            for d in shape:
                numel *= d
            if not 0 <= begin <= end <= data_size:
                raise self._corrupt(f"tensor {name!r} lies outside the file (bytes {begin}..{end} of {data_size})")
            if end - begin != numel * _itemsize(dtype):
                raise self._corrupt(
                    f"tensor {name!r} has {end - begin} bytes; {info['dtype']} {shape} needs {numel * _itemsize(dtype)}")
            self.entries[name] = (dtype, tuple(shape), begin, end)
        # file order: the order the tensors were written in; byte ranges may not overlap
        self.names = sorted(self.entries, key=lambda n: (self.entries[n][2], self.entries[n][3]))
        previous_end, previous = 0, None
        for name in self.names:
            begin, end = self.entries[name][2:]
            if begin < previous_end:
                raise self._corrupt(f"tensors {previous!r} and {name!r} overlap")
            if end > begin:
                previous_end, previous = end, name

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def check_unchanged(self) -> None:
        """Raise ValueError when the file was modified or replaced since it was opened."""
        now = os.fstat(self._fd)
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            on_disk = None
        same_file = on_disk is not None and (on_disk.st_ino, on_disk.st_dev) == self._identity[2:]
        if (now.st_size, now.st_mtime_ns) != self._identity[:2] or not same_file:
            raise ValueError(
                f"{str(self.path)!r} changed while it was being read (size, modification time or inode); "
                "results would mix two versions of it, so nothing was written"
            )

    def read(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` as a CPU tensor.

        With ``scratch`` (a uint8 tensor, grown as needed) the bytes land in it and the
        result is a view valid until the next read into the same scratch: one buffer for
        a whole pass instead of a fresh allocation (and its page faults) per tensor.
        """
        self.check_unchanged()
        dtype, shape, begin, end = self.entries[name]
        nbytes = end - begin
        if scratch is not None and scratch.numel() >= nbytes:
            buffer = scratch[:nbytes]
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done = 0
        while done < nbytes:
            got = _read_at(self._fd, view[done:], self._data_start + begin + done)
            if not got:
                raise self._corrupt(f"truncated inside tensor {name!r}")
            done += got
        return buffer.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the order of ``layout``.

    Use as a context manager; ``write`` each tensor in order. The file appears at ``path``
    only when every tensor was written and the block exits without error.
    """

    def __init__(
        self, path: PathLike, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"output directory {str(self.path.parent)!r} does not exist")
        header: dict[str, object] = {}
        self._order: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in layout:
            numel = 1
            for d in shape:
                numel *= int(d)
            nbytes = numel * _itemsize(dtype)
            header[name] = {"dtype": _CODE_OF[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        self._header = struct.pack("<Q", len(encoded)) + encoded
        self._next = 0

    def __enter__(self) -> "SafetensorsWriter":
        # atomic_open owns the temporary file: it replaces the target only after this writer's
        # data, flush, fsync and close succeeded, and removes it on any error
        self._stack = contextlib.ExitStack()
        self._handle = self._stack.enter_context(atomic_open(self.path))
        try:
            self._handle.write(self._header)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())  # __exit__ does not run when __enter__ fails
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, nbytes = self._order[self._next]
        if name != expected:
            raise ValueError(f"tensors must be written in layout order: expected {expected!r}, got {name!r}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # no copy
        if data.nbytes != nbytes:
            raise ValueError(f"tensor {name!r} has {data.nbytes} bytes; the layout says {nbytes}")
        self._handle.write(memoryview(data))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and self._next != len(self._order):
            try:
                raise ValueError(f"only {self._next} of {len(self._order)} tensors were written to {str(self.path)!r}")
            except ValueError:
                self._stack.__exit__(*sys.exc_info())
                raise
        return self._stack.__exit__(exc_type, exc, tb)
