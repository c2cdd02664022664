"""Decoder blocks and where they come from: the model in memory, or a checkpoint on disk.

The decoder blocks are found from the module tree (the ``nn.ModuleList`` of identical
blocks holding the most parameters: ``model.layers`` of Llama/Mistral/Qwen, ``transformer.h``
of GPT-2), so no per-model code is needed. The engine takes them from a *block source*
(:class:`BlockSource`): :class:`InMemoryBlocks` hands out the blocks of a loaded model;
:class:`CheckpointBlocks` reads each block from the safetensors shards when its turn comes,
into a skeleton whose parameters live on the meta device (:func:`meta_model`), and drops it
again once pruned. One engine runs from RAM or from disk, with bit-identical results.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence, Union

import torch
import torch.nn as nn

from ...io.checkpoints import Checkpoint
from ...io.safetensors import SafetensorsReader, SafetensorsWriter
from ..targets import Target, filter_targets, is_hf_conv1d, model_targets
from .layout import StoredLayout

__all__ = ["BlockSource", "InMemoryBlocks", "CheckpointBlocks", "find_decoder_blocks", "block_targets",
           "decoder_targets", "meta_model"]

Globs = Union[str, Sequence[str], None]


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: the ``nn.ModuleList`` of same-type modules containing
    ``Linear`` layers with the most parameters (``"model.layers"``, ``"transformer.h"``)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) or is_hf_conv1d(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks (an nn.ModuleList of identical "
                         "modules with Linear layers); sequential pruning needs one")
    return best[1], best[2]


def block_targets(block: nn.Module, prefix: str, include: Globs = None, exclude: Globs = None) -> list[Target]:
    """The weights of ``block`` that are pruned, named from the model's root (``prefix`` is the
    block's path, ``"model.layers.3"``), narrowed by the ``include`` / ``exclude`` globs (an
    ``include`` glob may match nothing in one block: :func:`decoder_targets` checks them)."""
    local = model_targets(block)
    named = [Target(f"{prefix}.{t.name}", f"{prefix}.{t.module_name}", t.weight, t.out_dim, t.experts) for t in local]
    return filter_targets(named, include, exclude, require_matches=False)


def decoder_targets(blocks: nn.ModuleList, prefix: str, include: Globs = None, exclude: Globs = None) -> list[Target]:
    """The pruned weights of every block (on the meta device for a checkpoint's skeleton);
    an ``include`` glob matching none of them is refused."""
    everything = [t for i, block in enumerate(blocks) for t in block_targets(block, f"{prefix}.{i}")]
    return filter_targets(everything, include, exclude)


class BlockSource(Protocol):
    """Where the engine takes the decoder blocks from."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> nn.Module:
        """Block ``index``, its weights in memory."""

    def release(self, index: int, block: nn.Module, pruned: bool) -> None:
        """Called when the run is done with a block (after pruning, or after an OWL pass)."""

    def open_stem(self) -> None:
        """Called before the batches run up to the first block (the weights before it are needed)."""

    def close_stem(self) -> None:
        """Called once the first block's inputs are captured."""


class InMemoryBlocks:
    """Block source of a model held whole in memory."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, index: int) -> nn.Module:
        return self.blocks[index]

    def release(self, index: int, block: nn.Module, pruned: bool) -> None:
        """Called when the run is done with a block (after pruning, or after an OWL pass)."""

    def open_stem(self) -> None:
        """Called before the batches run up to the first block (the weights before it are needed)."""

    def close_stem(self) -> None:
        """Called once the first block's inputs are captured."""


# ---------------------------------------------------------------- the meta skeleton of a checkpoint


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lands on the meta device; buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _return_freed_memory() -> None:
    """Hand the block's freed heap back to the system (glibc keeps it otherwise, and the next
    block would add to the high-water mark); a no-op where ``malloc_trim`` does not exist."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def meta_model(folder: Union[str, os.PathLike], dtype: torch.dtype) -> nn.Module:
    """The causal LM of the ``config.json`` in ``folder`` with its parameters on the meta device."""
    import transformers

    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"checkpoint {str(folder)!r} has no config.json; pruning from a checkpoint builds the model "
                         "from its Hugging Face config")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _set_parameter(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _to_meta(root: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        param = root.get_parameter(name)
        _set_parameter(root, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))


class CheckpointBlocks:
    """Block source reading each decoder block from the checkpoint when it is needed.

    ``model`` is the :func:`meta_model` skeleton; a pruned block's weights (those the
    ``include`` / ``exclude`` globs select) are spilled to a file under ``spill`` when it is
    released, and :meth:`pruned_tensor` hands them back when the output is written.
    """

    def __init__(self, model: nn.Module, prefix: str, blocks: nn.ModuleList, source: Checkpoint,
                 dtype: torch.dtype, spill: Path | None, include: Globs = None, exclude: Globs = None) -> None:
        self.model, self.prefix, self.blocks, self.source = model, prefix, blocks, source
        self.dtype, self.spill, self.include, self.exclude = dtype, spill, include, exclude
        self.spilled: dict[str, Path] = {}
        # the stored layout may differ from the model's (fused experts, renamed modules)
        self.layout = StoredLayout(getattr(getattr(model, "config", None), "model_type", None), source.names,
                                   source.read)
        block_prefix = prefix + "."
        self.stem = [n for n, _ in model.named_parameters() if not n.startswith(block_prefix) and self.layout.has(n)]

    def __len__(self) -> int:
        return len(self.blocks)

    def _read(self, name: str) -> torch.Tensor:
        if not self.layout.has(name):
            raise ValueError(f"checkpoint {str(self.source.path)!r} has no tensor {name!r} (nor its stored form), "
                             "which the model's config needs")
        return self.layout.read(name).to(self.dtype)

    def open_stem(self) -> None:
        """Read the weights outside the blocks lazily: a module's weights are read when it first
        runs, so only what runs before block 0 (the embeddings) is ever loaded, not the LM head."""
        owners: dict[str, list[str]] = {}
        for name in self.stem:
            owner, _, _ = name.rpartition(".")
            owners.setdefault(owner, []).append(name)
        self._loaded: list[str] = []
        self._hooks = []
        for owner, names in owners.items():
            module = self.model.get_submodule(owner) if owner else self.model

            def load(_module, _args, names=names):
                for name in names:
                    if self.model.get_parameter(name).device.type == "meta":
                        _set_parameter(self.model, name, self._read(name))
                        self._loaded.append(name)

            self._hooks.append(module.register_forward_pre_hook(load))

    def close_stem(self) -> None:
        for hook in self._hooks:
            hook.remove()
        _to_meta(self.model, self._loaded)

    def load(self, index: int) -> nn.Module:
        block = self.blocks[index]
        for local, param in block.named_parameters():
            if param.device.type == "meta":
                _set_parameter(block, local, self._read(f"{self.prefix}.{index}.{local}"))
        return block

    def release(self, index: int, block: nn.Module, pruned: bool) -> None:
        if pruned and self.spill is not None:
            targets = block_targets(block, f"{self.prefix}.{index}", self.include, self.exclude)
            path = self.spill / f"block-{index:05d}.safetensors"
            # in the stored layout (each expert's matrices), tensor by tensor: no serialised copy
            # of the whole block in memory
            parts = [part for t in targets for part in self.layout.split(t.name, t.weight.detach())]
            with SafetensorsWriter(path, [(n, x.dtype, tuple(x.shape)) for n, x in parts]) as out:
                for name, tensor in parts:
                    out.write(name, tensor)
            self.spilled.update({name: path for name, _ in parts})
        _to_meta(block, [n for n, _ in block.named_parameters()])
        _return_freed_memory()

    def pruned_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The output value of checkpoint tensor ``name`` (read as ``tensor``)."""
        path = self.spilled.get(name)
        if path is None:
            return tensor
        reader = SafetensorsReader(path)
        try:
            return reader.read(name).to(tensor.dtype)
        finally:
            reader.close()
