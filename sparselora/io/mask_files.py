"""Mask files: .pt, .npz and .safetensors (bool or packed), read without unpickling.

``.pt`` is loaded with ``torch.load(weights_only=True)`` after its zip CRCs are checked,
``.npz`` with ``np.load(allow_pickle=False)``, ``.safetensors`` through the strict reader
of :mod:`.safetensors`; writes are atomic and replace only regular files.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch

from .atomic import atomic_open, atomic_write_bytes
from .safetensors import SafetensorsReader

__all__ = ["MASK_FORMATS", "METADATA_KEY", "resolve_format", "metadata_json", "write_mask_file", "read_mask_file"]

MASK_FORMATS = ("pt", "npz", "safetensors")
_EXTENSIONS = {".pt": "pt", ".pth": "pt", ".npz": "npz", ".safetensors": "safetensors"}
METADATA_KEY = "__sparselora_metadata__"
_FORMAT_TAG = "sparselora-masks"
_ORDER_KEY = "__sparselora_order__"
PathLike = Union[str, os.PathLike]


def resolve_format(path: PathLike, format: str | None) -> str:
    if format is None and (Path(path).is_dir() or str(path).endswith(".index.json")):
        return "safetensors"  # sharded packed masks
    if format is not None:
        if format not in MASK_FORMATS:
            raise ValueError(f"format={format!r} is unknown; accepted: {', '.join(MASK_FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(
            f"cannot infer the mask format from {str(path)!r}; pass format= one of "
            f"{', '.join(MASK_FORMATS)} or use a .pt/.npz/.safetensors extension"
        )
    return _EXTENSIONS[suffix]


def metadata_json(metadata: Mapping[str, Any] | None) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        return json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable (str, numbers, bools, lists, dicts): {exc}") from None


def write_mask_file(tensors: Mapping[str, torch.Tensor], path: PathLike, fmt: str, meta: str, packed: bool) -> None:
    """Write bool ``tensors`` (checked by the caller) with JSON text ``meta``, atomically."""
    if packed:
        from .packed_masks import PackedMaskWriter

        with PackedMaskWriter(path, {n: tuple(t.shape) for n, t in tensors.items()}, json.loads(meta)) as writer:
            for name, mask in tensors.items():
                writer.write(name, mask)
    elif fmt == "pt":
        with atomic_open(path) as handle:
            torch.save({"format": _FORMAT_TAG, "version": 1, "metadata": meta, "masks": dict(tensors)}, handle)
    elif fmt == "npz":
        arrays = {name: t.numpy() for name, t in tensors.items()}
        arrays[METADATA_KEY] = np.frombuffer(meta.encode(), dtype=np.uint8)
        with atomic_open(path) as handle:
            np.savez_compressed(handle, **arrays)
    else:
        from safetensors.torch import save

        # safetensors sorts its keys; the order (model order) is kept in the header
        header = {METADATA_KEY: meta, "format": _FORMAT_TAG, _ORDER_KEY: json.dumps(list(tensors))}
        atomic_write_bytes(path, save(dict(tensors), metadata=header))


def _read(path: Path, fmt: str) -> tuple[dict[str, Any], str]:
    if fmt == "pt":
        # torch's zip reader skips CRC checks; verify them so damaged data is not loaded
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise ValueError(f"record {damaged!r} fails its CRC check")
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and obj.get("format") == _FORMAT_TAG:
            return dict(obj["masks"]), obj.get("metadata", "{}")
        if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj), "{}"  # a plain {name: tensor} file written by other tools
        raise ValueError("the file holds no masks (expected a dict of tensors)")
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = arrays.pop(METADATA_KEY, np.frombuffer(b"{}", dtype=np.uint8))
        return arrays, bytes(meta.astype(np.uint8)).decode()
    reader = SafetensorsReader(path)
    try:
        names = list(reader.names)
        order = json.loads(reader.metadata.get(_ORDER_KEY, "[]"))
        if isinstance(order, list) and sorted(order) == sorted(names):
            names = order
        return {name: reader.read(name) for name in names}, reader.metadata.get(METADATA_KEY, "{}")
    finally:
        reader.close()


def read_mask_file(path: Path, fmt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(raw masks, metadata) of a mask file of any format, packed ones included; a damaged
    or refused file is a one-line ValueError naming it."""
    from .packed_masks import is_packed_file, read_packed_masks

    try:
        if fmt == "safetensors" and is_packed_file(path):
            raw, metadata = read_packed_masks(path)
        else:
            raw, meta = _read(path, fmt)
            metadata = json.loads(meta)
            if not isinstance(metadata, dict):
                raise ValueError("its metadata is not a JSON object")
    except (ValueError, KeyError, EOFError, OSError, RuntimeError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read masks from {str(path)!r} as {fmt}: {_one_line(exc)}") from None
    except Exception:  # noqa: BLE001 - e.g. torch refusing to unpickle an object: its text advises unsafe loading
        raise ValueError(f"could not read masks from {str(path)!r} as {fmt}: it holds objects other than tensors "
                         "(never unpickled here) or is damaged") from None
    if not raw:
        raise ValueError(f"{str(path)!r} holds no masks")
    return raw, metadata


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
