"""Packed mask files: safetensors holding 8 mask elements per byte.

Format (readable by any safetensors library):

* each mask is a ``U8`` tensor of ``ceil(n/8)`` bytes; element ``i`` of the flattened
  (row-major) mask is bit ``i % 8`` of byte ``i // 8``, least significant bit first
  (``numpy.unpackbits(data, count=n, bitorder="little")``); 1 = kept, 0 = pruned;
* header metadata: ``format = "sparselora-packed-masks"``, ``bit_order = "little"``,
  ``shapes`` (JSON ``{name: shape}``), ``order`` (JSON list of names) and
  ``__sparselora_metadata__`` (JSON: sparsity, method, metric, source checkpoint, ...);
* masks split over several files come with ``masks.safetensors.index.json``
  (``{"metadata": {...}, "weight_map": {name: file}}``), as Hugging Face shards do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import numpy as np
import torch

from ..ops.masks import pack_bits, packed_size, unpack_bits
from .atomic import atomic_write_bytes
from .paths import contained
from .safetensors import SafetensorsReader, SafetensorsWriter

__all__ = [
    "PACKED_FORMAT",
    "MASK_INDEX_NAME",
    "pack",
    "count_kept",
    "unpack",
    "PackedMaskWriter",
    "is_packed_file",
    "packed_header",
    "read_index",
    "read_packed_masks",
    "write_mask_index",
]

PACKED_FORMAT = "sparselora-packed-masks"
MASK_INDEX_NAME = "masks.safetensors.index.json"
METADATA_KEY = "__sparselora_metadata__"
PathLike = Union[str, os.PathLike]


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def count_kept(packed: torch.Tensor) -> int:
    """Number of 1 bits (kept elements) of a packed mask."""
    data = packed.numpy()
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return int(np.bitwise_count(data).sum(dtype=np.int64))
    return int(_POPCOUNT[data].sum(dtype=np.int64))


def pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> ``ceil(n/8)`` uint8 bytes, LSB first."""
    return pack_bits(mask.detach().cpu())


def unpack(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(n):
        raise ValueError(f"packed mask has {packed.numel()} {packed.dtype} bytes; shape {shape} needs {packed_size(n)} uint8")
    return unpack_bits(packed, shape)


class PackedMaskWriter:
    """Streams masks into a packed safetensors file; names and shapes are fixed up front."""

    def __init__(self, path: PathLike, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, Any] | None = None):
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        layout = [(name, torch.uint8, (packed_size(int(np.prod(shape, dtype=np.int64))),)) for name, shape in self.shapes.items()]
        header = {
            "format": PACKED_FORMAT,
            "bit_order": "little",
            "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
            "order": json.dumps(list(self.shapes)),
            METADATA_KEY: json.dumps(dict(metadata or {}), allow_nan=False),
        }
        self._writer = SafetensorsWriter(path, layout, header)

    def __enter__(self) -> "PackedMaskWriter":
        self._writer.__enter__()
        return self

    def write(self, name: str, mask: torch.Tensor) -> None:
        if tuple(mask.shape) != self.shapes[name]:
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}; expected {self.shapes[name]}")
        self._writer.write(name, pack(mask))

    def write_packed(self, name: str, packed: torch.Tensor) -> None:
        """Write a mask already packed (``ceil(n/8)`` uint8 bytes, LSB first)."""
        self._writer.write(name, packed)

    def __exit__(self, *exc) -> None:
        self._writer.__exit__(*exc)


def is_packed_file(path: PathLike) -> bool:
    path = Path(path)
    if path.is_dir():
        return (path / MASK_INDEX_NAME).is_file()
    if path.name.endswith(".index.json"):
        return True
    return SafetensorsReader(path).metadata.get("format") == PACKED_FORMAT


def packed_header(reader: SafetensorsReader) -> tuple[dict[str, list[int]], list[str], dict[str, Any]]:
    """(shapes, mask names in order, user metadata) of a packed mask file, checked: every
    listed mask is a U8 tensor of ``ceil(n/8)`` bytes for its integer shape."""
    meta, where = reader.metadata, repr(str(reader.path))
    if meta.get("format") != PACKED_FORMAT:
        raise ValueError(f"{where} is not a packed mask file (format={meta.get('format')!r})")
    try:
        shapes = json.loads(meta["shapes"])
        order = json.loads(meta.get("order", "[]")) or reader.names
        metadata = json.loads(meta.get(METADATA_KEY, "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: bad packed-mask header ({exc})") from None
    if not isinstance(shapes, dict) or not isinstance(order, list) or not isinstance(metadata, dict):
        raise ValueError(f"{where}: bad packed-mask header (shapes, order and metadata must be JSON object/list/object)")
    for name in order:
        if name not in reader.entries or name not in shapes:
            raise ValueError(f"{where}: mask {name!r} is listed but missing")
        shape = shapes[name]
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"{where}: mask {name!r} has shape {shape!r}; dims must be integers >= 0")
        n = int(np.prod(shape, dtype=np.int64))
        if reader.dtype(name) != torch.uint8 or reader.shape(name) != (packed_size(n),):
            raise ValueError(f"{where}: mask {name!r} must be {packed_size(n)} U8 bytes for shape {shape}, "
                             f"found {reader.dtype(name)} {list(reader.shape(name))}")
    return shapes, order, metadata


def read_index(path: PathLike) -> tuple[dict[str, str], dict[str, Any], list[Path]]:
    """(weight_map, metadata, shard files) of a mask index, given the index or its directory.

    Every shard is a plain relative name inside the index's folder (the file may be a link)."""
    path = Path(path)
    index = path / MASK_INDEX_NAME if path.is_dir() else path
    if not index.is_file():
        raise FileNotFoundError(f"mask index {str(index)!r} does not exist")
    try:
        content = json.loads(index.read_text())
        weight_map, metadata = content["weight_map"], content.get("metadata", {})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"mask index {str(index)!r} is unreadable: {exc}") from None
    if not isinstance(weight_map, dict) or not isinstance(metadata, dict):
        raise ValueError(f"mask index {str(index)!r}: 'weight_map' and 'metadata' must be JSON objects")
    shards = [contained(index.parent, file, index) for file in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"mask index {str(index)!r} names shard {shard.name!r}, which is missing")
    return weight_map, metadata, shards


def _read_one(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    reader = SafetensorsReader(path)
    shapes, order, metadata = packed_header(reader)
    return {name: unpack(reader.read(name), shapes[name]) for name in order}, metadata


def read_packed_masks(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Bool masks and metadata from a packed file, a directory of shards, or their index."""
    path = Path(path)
    if not (path.is_dir() or path.name.endswith(".index.json")):
        return _read_one(path)
    weight_map, metadata, shards = read_index(path)
    masks: dict[str, torch.Tensor] = {}
    for shard in shards:
        masks.update(_read_one(shard)[0])
    missing = [n for n in weight_map if n not in masks]
    if missing:
        raise ValueError(f"mask index names masks missing from their shards: {missing[:5]}")
    return {n: masks[n] for n in weight_map}, metadata


def write_mask_index(directory: PathLike, weight_map: Mapping[str, str], metadata: Mapping[str, Any]) -> Path:
    """Write ``masks.safetensors.index.json`` atomically and return its path."""
    path = Path(directory) / MASK_INDEX_NAME
    atomic_write_bytes(path, json.dumps({"metadata": dict(metadata), "weight_map": dict(weight_map)}, indent=1).encode())
    return path
