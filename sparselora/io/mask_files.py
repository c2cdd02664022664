"""Mask files: .pt, .npz and .safetensors (bool or packed), read without unpickling.

The one load/save core of masks: :func:`write_masks` and :func:`read_masks` check and
store ``{name: bool mask}`` with JSON metadata (``pruning.mask_ops.save_mask`` /
``load_mask`` are their public face), :func:`convert_mask_file` rewrites a mask file in
another format. ``.pt`` is loaded with ``torch.load(weights_only=True)`` after its zip
CRCs are checked, ``.npz`` with ``np.load(allow_pickle=False)``, ``.safetensors`` through
the strict reader of :mod:`.safetensors`; writes are atomic and replace only regular files.
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
from .packed_masks import PackedMaskWriter, is_packed_file, read_packed_masks
from .safetensors import SafetensorsReader

__all__ = [
    "MASK_FORMATS",
    "METADATA_KEY",
    "resolve_format",
    "metadata_json",
    "as_bool_mask",
    "write_masks",
    "read_masks",
    "convert_mask_file",
    "write_mask_file",
    "read_mask_file",
]

MASK_FORMATS = ("pt", "npz", "safetensors")
_EXTENSIONS = {".pt": "pt", ".pth": "pt", ".npz": "npz", ".safetensors": "safetensors"}
METADATA_KEY = "__sparselora_metadata__"
_FORMAT_TAG = "sparselora-masks"
_ORDER_KEY = "__sparselora_order__"
PathLike = Union[str, os.PathLike]


def resolve_format(path: PathLike, format: str | None) -> str:
    """The mask format of ``path``: ``format`` when given, else its extension's (a folder or
    an index is sharded packed safetensors); an unknown one is refused naming the accepted."""
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


def as_bool_mask(mask: Any, name: str = "mask") -> torch.Tensor:
    """Return ``mask`` as a bool tensor; numeric masks must hold only 0 and 1."""
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} is {type(mask).__name__}; expected a torch.Tensor")
    if mask.dtype == torch.bool:
        # a bool tensor read from a damaged file can hold bytes other than 0/1
        if mask.numel() and bool((mask.view(torch.uint8) > 1).any()):
            raise ValueError(f"{name} holds bytes other than 0 and 1; the data is corrupted")
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} has complex dtype {mask.dtype}; masks are bool or 0/1")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} holds values other than 0 and 1 (or NaN); masks are bool or 0/1")
    return mask != 0


def write_masks(
    masks: Mapping[str, Any],
    path: PathLike,
    metadata: Mapping[str, Any] | None = None,
    format: str | None = None,
    packed: bool = False,
) -> None:
    """Check ``masks`` (bool or 0/1, named) and write them with JSON ``metadata``, atomically.

    The format comes from ``format`` or the extension; ``packed=True`` (safetensors only)
    stores 8 mask elements per byte. On any error the previous file at ``path`` is kept.
    """
    fmt = resolve_format(path, format)
    if packed and fmt != "safetensors":
        raise ValueError(f"packed=True needs format='safetensors', got format={fmt!r}")
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty dict of parameter name -> bool tensor")
    meta = metadata_json(metadata)
    tensors = {}
    for name, mask in masks.items():
        if not isinstance(name, str) or not name or name == METADATA_KEY:
            raise ValueError(f"mask name {name!r} is not allowed")
        tensors[name] = as_bool_mask(mask, f"masks[{name!r}]").detach().cpu().contiguous()
    write_mask_file(tensors, path, fmt, meta, packed)


def read_masks(path: PathLike, format: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(bool masks on the CPU, metadata)`` of a mask file of any format, packed ones and
    folders of packed shards included; a damaged file is a ValueError naming it."""
    fmt = resolve_format(path, format)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mask file {str(path)!r} does not exist")
    raw, metadata = read_mask_file(path, fmt)
    masks = {}
    for name, t in raw.items():
        try:
            masks[name] = as_bool_mask(t, f"mask {name!r}")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{str(path)!r}: {exc}") from None
    return masks, metadata


def convert_mask_file(source: PathLike, destination: PathLike, format: str | None = None, *,
                      packed: bool = False) -> None:
    """Rewrite the masks of ``source`` at ``destination`` in another format, bit for bit.

    ``source`` is any mask file :func:`read_masks` reads (.pt, .npz, .safetensors, packed,
    or a folder of packed shards / its index). ``format`` (one of :data:`MASK_FORMATS`)
    comes from ``destination``'s extension when None; ``packed=True`` writes packed
    safetensors. Mask names, their order and the metadata are kept. The write is atomic:
    on any error the previous ``destination`` is left as it was.
    """
    fmt = resolve_format(destination, format)  # an unknown format is refused before reading
    masks, metadata = read_masks(source)
    write_masks(masks, destination, metadata, fmt, packed)


def write_mask_file(tensors: Mapping[str, torch.Tensor], path: PathLike, fmt: str, meta: str, packed: bool) -> None:
    """Write bool ``tensors`` (checked by the caller) with JSON text ``meta``, atomically."""
    if packed:
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
