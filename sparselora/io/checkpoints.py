"""Model checkpoints on disk, read one tensor at a time.

Accepted: a ``.safetensors`` file; a directory holding a Hugging Face
``*.safetensors.index.json`` and its shards, or a single ``.safetensors`` file; a
``.pt`` / ``.pth`` / ``.bin`` state dict (loaded with ``weights_only=True`` and ``mmap=True``).

Checkpoint order, which decides ties: shard files in index order of first appearance,
tensors in the order their data lies in each file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Union

import torch

from .modelzoo import load_modelzoo_checkpoint
from .paths import contained
from .safetensors import SafetensorsReader

__all__ = ["Checkpoint", "StateDictSource", "open_source"]

PathLike = Union[str, os.PathLike]
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class StateDictSource:
    """An in-memory state dict behind the same interface as :class:`Checkpoint`."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
        for name, tensor in state_dict.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"state_dict[{name!r}] is {type(tensor).__name__}; expected a tensor")
        self._tensors = state_dict
        self.names = list(state_dict)
        self.files: dict[Path, list[str]] = {}

    def scratch(self) -> None:
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def read(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensors[name].detach()


class Checkpoint:
    """A checkpoint on disk; ``read(name)`` loads one tensor."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.index_path: Path | None = None
        self.files: dict[Path, list[str]] = {}
        self._readers: dict[str, SafetensorsReader] = {}
        self._state: Mapping[str, torch.Tensor] | None = None
        if self.path.is_dir():
            self._open_directory()
        elif not self.path.exists():
            raise FileNotFoundError(f"checkpoint {str(self.path)!r} does not exist")
        elif self.path.suffix == ".safetensors":
            self._add_file(self.path, None)
        elif self.path.suffix in _TORCH_SUFFIXES:
            self._open_torch_file()
        elif self.path.suffix == ".mdl":
            self._open_modelzoo_file()
        else:
            raise ValueError(
                f"checkpoint {str(self.path)!r}: unknown kind; give a .safetensors file, a directory with "
                "a *.safetensors.index.json, a .pt/.pth/.bin state dict, or a ModelZoo .mdl checkpoint"
            )

    def _open_directory(self) -> None:
        indexes = sorted(self.path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise ValueError(f"checkpoint directory {str(self.path)!r} holds several indexes: {[i.name for i in indexes]}")
        if indexes:
            self.index_path = indexes[0]
            try:
                weight_map = json.loads(self.index_path.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError, TypeError):
                raise ValueError(f"index {str(self.index_path)!r} is not a JSON object with a 'weight_map'") from None
            by_file: dict[Path, list[str]] = {}
            for name, file in weight_map.items():
                # a plain name inside the folder (the file itself may be a link, as in the hub cache)
                by_file.setdefault(contained(self.path, file, self.index_path), []).append(name)
            for shard, names in by_file.items():
                if not shard.is_file():
                    raise FileNotFoundError(f"index {str(self.index_path)!r} names shard {shard.name!r}, which is missing")
                self._add_file(shard, names)
            return
        files = sorted(self.path.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(
                f"checkpoint directory {str(self.path)!r} has {len(files)} .safetensors files and no "
                "*.safetensors.index.json; give the index or a single file"
            )
        self._add_file(files[0], None)

    def _add_file(self, file: Path, expected: list[str] | None) -> None:
        reader = SafetensorsReader(file)
        if expected is not None:
            missing = [n for n in expected if n not in reader.entries]
            if missing:
                raise ValueError(f"index names tensors missing from {file.name}: {missing[:5]}")
            names = [n for n in reader.names if n in set(expected)]
        else:
            names = reader.names
        for name in names:
            if name in self._readers:
                raise ValueError(f"tensor {name!r} appears in two shards")
            self._readers[name] = reader
        self.files[file] = names

    def _open_torch_file(self) -> None:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - torch raises many kinds; its text advises unsafe loading
            raise ValueError(
                f"checkpoint {str(self.path)!r} could not be read as a torch state dict of tensors (it is damaged, or "
                "holds objects other than tensors, which are never unpickled here); give a safetensors checkpoint"
            ) from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"checkpoint {str(self.path)!r} is not a dict of tensors")
        self._state = state
        self.files = {self.path: list(state)}

    def _open_modelzoo_file(self) -> None:
        """A Cerebras ModelZoo checkpoint (``cerebras.pytorch.save``): its ``model`` state."""
        state = load_modelzoo_checkpoint(self.path)
        model = state.get("model", state) if isinstance(state, Mapping) else None
        if not isinstance(model, Mapping) or not all(isinstance(v, torch.Tensor) for v in model.values()):
            raise ValueError(f"checkpoint {str(self.path)!r} has no 'model' dict of tensors")
        self._state = dict(model)
        self.files = {self.path: list(model)}

    @property
    def names(self) -> list[str]:
        if self._state is not None:
            return list(self._state)
        return [n for names in self.files.values() for n in names]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape) if self._state is not None else self._readers[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype if self._state is not None else self._readers[name].dtype(name)

    def file_of(self, name: str) -> Path:
        """The file tensor ``name`` is read from."""
        return self.path if self._state is not None else self._readers[name].path

    def read(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name``; with ``scratch`` (see ``SafetensorsReader.read``) a view into it."""
        if self._state is not None:
            return self._state[name].detach().clone()  # off the mmap: resident only while used
        return self._readers[name].read(name, scratch)

    def scratch(self) -> torch.Tensor:
        """A reusable read buffer as large as the largest tensor."""
        largest = max((r.entries[n][3] - r.entries[n][2] for n, r in self._readers.items()), default=0)
        return torch.empty(largest, dtype=torch.uint8)

    @property
    def is_safetensors(self) -> bool:
        return self._state is None


def open_source(source: Union[PathLike, Mapping[str, torch.Tensor], Checkpoint, StateDictSource]):
    """A :class:`Checkpoint` for a path, a :class:`StateDictSource` for a mapping."""
    if isinstance(source, (Checkpoint, StateDictSource)):
        return source
    if isinstance(source, Mapping):
        return StateDictSource(source)
    if isinstance(source, (str, os.PathLike)):
        return Checkpoint(source)
    raise TypeError(f"checkpoint must be a path or a state dict, got {type(source).__name__}")
