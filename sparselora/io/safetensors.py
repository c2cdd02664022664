"""Reading and writing safetensors files one tensor at a time.

The reader parses and checks the header itself and reads each tensor with plain file
reads (no mmap), so resident memory stays at one tensor whatever the file size. The
writer lays out the header up front from the names, dtypes and shapes, then streams the
tensors in order into a temporary file that replaces the target only when complete.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Union

import torch

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


class SafetensorsReader:
    """Header and per-tensor reads of one ``.safetensors`` file.

    Raises ValueError naming the file when the header is truncated or inconsistent.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint file {str(self.path)!r} does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError(f"{str(self.path)!r} {CORRUPT}: shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{str(self.path)!r} {CORRUPT}: header length {length} exceeds the file")
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{str(self.path)!r} {CORRUPT}: header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{str(self.path)!r} {CORRUPT}: header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + length
        data_size = size - self._data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPE_CODES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{str(self.path)!r} {CORRUPT}: bad header entry for {name!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            if not (0 <= begin <= end <= data_size) or end - begin != numel * _itemsize(dtype):
                raise ValueError(f"{str(self.path)!r} {CORRUPT}: tensor {name!r} lies outside the file or has the wrong size")
            self.entries[name] = (dtype, shape, begin, end)
        # file order: the order the tensors were written in
        self.names = sorted(self.entries, key=lambda n: self.entries[n][2])

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` as a CPU tensor.

        With ``scratch`` (a uint8 tensor, grown as needed) the bytes land in it and the
        result is a view valid until the next read into the same scratch: one buffer for
        a whole pass instead of a fresh allocation (and its page faults) per tensor.
        """
        dtype, shape, begin, end = self.entries[name]
        nbytes = end - begin
        if scratch is not None and scratch.numel() >= nbytes:
            buffer = scratch[:nbytes]
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self._data_start + begin)
            view = memoryview(buffer.numpy())
            done = 0
            while done < nbytes:
                got = handle.readinto(view[done:])
                if not got:
                    raise ValueError(f"{str(self.path)!r} {CORRUPT}: truncated inside tensor {name!r}")
                done += got
        return buffer.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)


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
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._handle = os.fdopen(fd, "wb")
        self._handle.write(self._header)
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

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._next != len(self._order):
                raise ValueError(f"only {self._next} of {len(self._order)} tensors were written to {str(self.path)!r}")
            self._handle.flush()
            if exc_type is None:
                os.fsync(self._handle.fileno())
        finally:
            self._handle.close()
            if exc_type is None and self._next == len(self._order):
                os.replace(self._tmp, self.path)
            elif os.path.exists(self._tmp):
                os.unlink(self._tmp)
