"""Masks meet checkpoints on disk: write pruned checkpoints, check pruned weights.

Both read one tensor (and one mask) at a time, so they run on models larger than RAM.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch
from tqdm.auto import tqdm

from .. import ops
from ..progress import bar_disabled
from ..io.atomic import atomic_write_bytes, check_folder_replaceable, staging_dir, swap_directory
from ..io.paths import check_apart
from ..io.safetensors import SafetensorsReader, SafetensorsWriter
from ..io.checkpoints import Checkpoint
from ..io.mask_files import as_bool_mask
from ..io.modelzoo import load_modelzoo_checkpoint, save_modelzoo_checkpoint
from ..io.packed_masks import PACKED_FORMAT, packed_header, read_index, unpack
from .mask_ops import load_mask

__all__ = ["MaskFile", "apply_masks_to_checkpoint", "validate_checkpoint_masks", "rewrite_checkpoint"]

PathLike = Union[str, os.PathLike]


class MaskFile:
    """Masks read one at a time from a packed file or shards; other files load whole.

    ``files`` lists the files read (none for masks given as a dict)."""

    def __init__(self, masks: Union[PathLike, Mapping[str, torch.Tensor]]) -> None:
        self._readers: dict[str, tuple[SafetensorsReader, tuple[int, ...]]] = {}
        self._masks: Mapping[str, torch.Tensor] = {}
        self.files: list[Path] = []
        if isinstance(masks, Mapping):
            self._masks = masks
            self.names = list(masks)
            return
        path = Path(masks)
        files: list[Path] = []
        if path.is_dir() or path.name.endswith(".index.json"):
            files = read_index(path)[2]
        elif path.suffix == ".safetensors" and SafetensorsReader(path).metadata.get("format") == PACKED_FORMAT:
            files = [path]
        if not files:
            self._masks, _ = load_mask(path)
            self.names = list(self._masks)
            self.files = [path]
            return
        self.files = files
        for file in files:
            reader = SafetensorsReader(file)
            shapes, order, _ = packed_header(reader)
            for name in order:
                self._readers[name] = (reader, tuple(shapes[name]))
        self.names = list(self._readers)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._masks[name].shape) if name in self._masks else self._readers[name][1]

    def get(self, name: str) -> torch.Tensor:
        if name in self._masks:
            return as_bool_mask(self._masks[name], f"mask {name!r}")
        reader, shape = self._readers[name]
        try:
            return unpack(reader.read(name), shape)
        except ValueError as exc:
            raise ValueError(f"mask {name!r} in {str(reader.path)!r}: {exc}") from None


def _check_match(checkpoint: Checkpoint, masks: MaskFile) -> None:
    names = set(checkpoint.names)
    unknown = [n for n in masks.names if n not in names]
    if unknown:
        raise ValueError(f"masks name tensors missing from the checkpoint: {unknown[:5]}")
    wrong = [n for n in masks.names if tuple(masks.shape(n)) != tuple(checkpoint.shape(n))]
    if wrong:
        raise ValueError(f"mask shapes differ from the checkpoint's tensors: {wrong[:5]}")


_COMPANION_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py", ".md", ".tiktoken")


def _copy_companion(item: Path, target: Path) -> None:
    """Copy the file ``item`` to ``target`` as a real file: a link (the hub cache links every
    file of a snapshot into its ``blobs/``) is followed and its content copied, never the link;
    a link to a folder, to nothing, or to anything but a regular file is refused by name."""
    if not item.is_file():
        why = "a folder" if item.is_dir() else "a missing file" if not item.exists() else "no regular file"
        raise ValueError(f"checkpoint file {str(item)!r} is a link to {why}; outputs hold real files only, so "
                         "replace the link by what it should hold (or remove it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(item, target)  # follows the link: the content and the permissions of what it names


def _copy_companions(source: Checkpoint, staging: Path) -> None:
    """Everything of the checkpoint that is not a rewritten shard: the whole folder tree of a
    directory checkpoint (config, tokenizer, sub-folders such as sentence-transformers'
    ``1_Pooling/``); for a single file, the small files beside it (config, tokenizer) so that
    ``from_pretrained`` loads the result. Links are copied as the files they name
    (:func:`_copy_companion`): the output holds no links."""
    shards = set(source.files)  # as named (folder / index entry), links not followed
    folder = source.path if source.path.is_dir() else source.path.parent
    if source.path.is_dir():
        for item in sorted(folder.rglob("*")):
            relative = item.relative_to(folder)
            if any(p.startswith(".") for p in relative.parts) or item in shards:
                continue  # hidden files (staging areas), and the shards, written pruned above
            if item.is_symlink() or item.is_file():
                _copy_companion(item, staging / relative)
            elif item.is_dir():
                (staging / relative).mkdir(parents=True, exist_ok=True)
        return
    for item in sorted(folder.iterdir()):
        if (item.suffix in _COMPANION_SUFFIXES and item.is_file() and not item.name.endswith(".index.json")
                and item not in shards):
            _copy_companion(item, staging / item.name)


def _write_single_file_index(source: Checkpoint, staging: Path) -> None:
    """The Hugging Face index beside a single-file output: tools that read sharded
    checkpoints only (``cszoo checkpoint convert``) then read it too."""
    import json

    (file,) = source.files
    name = file.name
    index = staging / f"{name}.index.json"
    if index.exists():
        return
    total = sum(int(torch.empty(0, dtype=source.dtype(n)).element_size()) * _numel(source.shape(n)) for n in source.names)
    payload = {"metadata": {"total_size": total}, "weight_map": {n: name for n in source.names}}
    atomic_write_bytes(index, (json.dumps(payload, indent=2) + "\n").encode())


def _numel(shape) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count


def _apply_to_modelzoo_file(source: Checkpoint, mask_file: "MaskFile", target: Path) -> int:
    """A ModelZoo checkpoint written whole (``cerebras.pytorch.save``) with its pruned
    weights zeroed; everything else in it (optimizer, step) is kept."""
    state = load_modelzoo_checkpoint(source.path)
    model = state["model"] if isinstance(state, Mapping) and "model" in state else state
    pruned = 0
    for name in mask_file.names:
        mask = mask_file.get(name)
        tensor = model[name].detach().clone().contiguous()
        ops.apply_mask_(tensor, mask)
        model[name] = tensor
        pruned += int(mask.numel() - mask.sum())
    save_modelzoo_checkpoint(state, target)
    return pruned


def rewrite_checkpoint(
    source: Checkpoint,
    output: Path,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    *,
    progress: bool | None = None,
    desc: str = "write",
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write ``source`` (safetensors) to the directory ``output`` with every tensor passed
    through ``transform(name, tensor)``, one tensor in memory at a time.

    Shard names, tensor order, dtypes and the rest of the folder (index, config, tokenizer)
    are kept. ``extra(staging)`` may add files. The result is assembled beside ``output``
    and swapped in whole (see :func:`~sparselora.io.atomic.swap_directory`).
    """
    staging = staging_dir(output)
    try:
        bar = tqdm(total=len(source.names), desc=desc, unit="tensor", disable=bar_disabled(progress))
        for file in source.files:
            reader = SafetensorsReader(file)
            layout = [(n, reader.dtype(n), reader.shape(n)) for n in reader.names]
            # the name the index gives (a hub cache links it to a blob with another name)
            target = staging / (file.relative_to(source.path) if source.path.is_dir() else file.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            with SafetensorsWriter(target, layout, reader.metadata) as writer:
                for name in reader.names:
                    writer.write(name, transform(name, reader.read(name)))
                    bar.update(1)
            reader.close()
        bar.close()
        _copy_companions(source, staging)
        if source.index_path is None:  # a single file: add the index sharded-only tools need
            _write_single_file_index(source, staging)
        if extra is not None:
            extra(staging)
        swap_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def apply_masks_to_checkpoint(
    checkpoint: PathLike,
    masks: Union[PathLike, Mapping[str, torch.Tensor]],
    output_dir: PathLike,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write a copy of ``checkpoint`` into ``output_dir`` with the pruned weights set to 0.

    Shard files keep their names, tensor order and dtypes, and the rest of the checkpoint's
    folder tree (index, config, tokenizer, sub-folders) is copied; from a single file, the
    small files beside it (config, tokenizer) are, plus a ``<file>.index.json`` for tools
    that read sharded checkpoints only (``cszoo checkpoint convert``). So the result loads
    wherever the original did (e.g. ``from_pretrained`` or ``cszoo checkpoint convert``). The output is assembled in
    a folder beside it and swapped in when complete: an existing output (``overwrite=True``)
    is moved aside, never deleted first, and kept if the swap fails. An output equal to,
    inside, or containing the checkpoint or the masks is refused.
    """
    start = time.perf_counter()
    source = Checkpoint(checkpoint)
    modelzoo = source.path.suffix == ".mdl"
    if not source.is_safetensors and not modelzoo:
        raise ValueError(f"checkpoint {str(checkpoint)!r}: pruned checkpoints are written from safetensors "
                         "checkpoints (or ModelZoo .mdl ones)")
    mask_file = MaskFile(masks)
    _check_match(source, mask_file)
    output = Path(output_dir)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output directory's parent {str(output.parent)!r} does not exist")
    mask_paths = [] if isinstance(masks, Mapping) else [masks]
    check_apart(output, [source.path, *source.files, *mask_paths, *mask_file.files], "output_dir")
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {str(output)!r} exists; pass overwrite=True to replace it")
    check_folder_replaceable(output, "output_dir")
    masked = set(mask_file.names)
    pruned = 0
    if modelzoo:
        staging = staging_dir(output)
        try:
            pruned = _apply_to_modelzoo_file(source, mask_file, staging / source.path.name)
            swap_directory(staging, output)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    else:
        def masked_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
            nonlocal pruned
            if name in masked:
                mask = mask_file.get(name)
                pruned += int(mask.numel() - mask.sum())
                ops.apply_mask_(tensor, mask)
            return tensor

        rewrite_checkpoint(source, output, masked_tensor, progress=progress, desc="apply")
    return {"output": str(output), "tensors": len(source.names), "masked": len(masked), "pruned": pruned,
            "seconds": time.perf_counter() - start}


def validate_checkpoint_masks(
    checkpoint: PathLike,
    masks: Union[PathLike, Mapping[str, torch.Tensor]],
    tolerance: float = 0.0,
    progress: bool | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Check that every weight the masks prune is zero (``|w| <= tolerance``) on disk.

    Returns ``(is_valid, report)`` shaped like ``validate_sparsity_preserved``'s.
    """
    if not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be a number >= 0")
    source = Checkpoint(checkpoint)
    mask_file = MaskFile(masks)
    _check_match(source, mask_file)
    per_layer: dict[str, dict[str, Any]] = {}
    for name in tqdm(mask_file.names, desc="validate", unit="tensor", disable=bar_disabled(progress)):
        mask = mask_file.get(name)
        values = source.read(name)[~mask]
        bad = int((~(values.float().abs() <= tolerance)).sum())
        per_layer[name] = {"violations": bad, "num_pruned": int(values.numel()),
                           "violation_rate": bad / values.numel() if values.numel() else 0.0}
    total = sum(v["violations"] for v in per_layer.values())
    pruned = sum(v["num_pruned"] for v in per_layer.values())
    report = {"global": {"total_violations": total, "total_pruned": pruned,
                         "violation_rate": total / pruned if pruned else 0.0, "num_layers": len(per_layer),
                         "layers_with_violations": [n for n, v in per_layer.items() if v["violations"]]},
              "per_layer": per_layer}
    return total == 0, report
