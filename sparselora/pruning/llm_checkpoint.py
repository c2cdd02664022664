"""Sequential one-shot pruning straight from a checkpoint on disk, for models larger than RAM.

The model is built from its ``config.json`` with every parameter on the meta device (no
memory), buffers real (rotary frequencies). The weights before the first decoder block
(embeddings) are read to compute the calibration inputs of block 0, then dropped. Each
decoder block is read from the safetensors shards when its turn comes, calibrated, pruned
(:func:`sparselora.pruning.sequential.run_sequential`), spilled to a file beside the output
and dropped again. At the end the output checkpoint is written tensor by tensor: the pruned
weights from the spill files, everything else copied from the input, with the same shards,
index and companion files, plus the packed keep-masks in ``masks.safetensors``.

Peak memory: one block, the calibration activations (or none, with ``offload_dir``) and a
fixed overhead (the embeddings while block 0's inputs are computed). The masks and
weights equal those of the in-memory :func:`~sparselora.pruning.sequential.prune_model`
on the same model in the same dtype, bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

import torch
import torch.nn as nn

from ..distributed import Ranks
from ..io.atomic import check_replaceable
from ..io.checkpoints import Checkpoint
from ..io.packed_masks import PackedMaskWriter
from ..io.safetensors import SafetensorsReader, SafetensorsWriter
from ..io.paths import check_apart
from .calibration import calibration_batches
from .checkpoint_ops import rewrite_checkpoint
from .owl import OWL_LAMBDA, OWL_THRESHOLD
from .sequential import PruningPlan, _block_targets, find_decoder_blocks, make_plan, run_sequential

__all__ = ["prune_checkpoint", "MASKS_FILE", "meta_model"]

PathLike = Union[str, os.PathLike]
Globs = Union[str, Sequence[str], None]
MASKS_FILE = "masks.safetensors"


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


def meta_model(folder: PathLike, dtype: torch.dtype) -> nn.Module:
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
    """Block source reading each decoder block from the checkpoint when it is needed."""

    def __init__(self, model: nn.Module, prefix: str, blocks: nn.ModuleList, source: Checkpoint,
                 dtype: torch.dtype, spill: Path | None, plan: PruningPlan) -> None:
        self.model, self.prefix, self.blocks, self.source = model, prefix, blocks, source
        self.dtype, self.spill, self.plan = dtype, spill, plan
        self.spilled: dict[str, Path] = {}
        names = set(source.names)
        block_prefix = prefix + "."
        self.stem = [n for n, _ in model.named_parameters() if not n.startswith(block_prefix) and n in names]

    def __len__(self) -> int:
        return len(self.blocks)

    def _read(self, name: str) -> torch.Tensor:
        if name not in self.source.names:
            raise ValueError(f"checkpoint {str(self.source.path)!r} has no tensor {name!r}, which the model's "
                             "config needs")
        return self.source.read(name).to(self.dtype)

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
            targets = _block_targets(block, f"{self.prefix}.{index}", self.plan)
            path = self.spill / f"block-{index:05d}.safetensors"
            # tensor by tensor: no serialised copy of the whole block in memory
            with SafetensorsWriter(path, [(t.name, t.weight.dtype, tuple(t.weight.shape)) for t in targets]) as out:
                for t in targets:
                    out.write(t.name, t.weight.detach())
            self.spilled.update({t.name: path for t in targets})
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


def _calibration(checkpoint: Path, plan: PruningPlan, calibration_data, tokenizer, calibration_text, samples,
                 seq_len) -> list:
    if not plan.needs_data:
        return []
    if calibration_data is not None:
        return list(calibration_data)
    if tokenizer is None:
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"no tokenizer in {str(checkpoint)!r} ({exc}); give one (--tokenizer DIR, or "
                             "tokenizer= in Python) or calibration batches (calibration_data=)") from None
    elif isinstance(tokenizer, (str, os.PathLike)):
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    return calibration_batches(tokenizer, calibration_text, samples=samples, seq_len=seq_len)


def _stored_dtype(source: Checkpoint) -> torch.dtype:
    """The dtype of the checkpoint's first floating matrix (what its Linear weights are stored in)."""
    for name in source.names:
        if source.dtype(name).is_floating_point and len(source.shape(name)) >= 2:
            return source.dtype(name)
    return torch.float32


def prune_checkpoint(
    checkpoint: PathLike,
    output_dir: PathLike,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    *,
    nm: tuple[int, int] | None = None,
    owl: bool = False,
    owl_threshold: float = OWL_THRESHOLD,
    owl_lambda: float = OWL_LAMBDA,
    scope: str | None = None,
    calibration_data: Iterable | None = None,
    tokenizer: Any = None,
    calibration_text: str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    dtype: torch.dtype | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    include: Globs = None,
    exclude: Globs = None,
    distributed: bool = False,
    offload_dir: PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Prune the Hugging Face causal LM in ``checkpoint`` (a folder with ``config.json`` and
    safetensors shards) block by block, never holding more than one block, and write the
    pruned checkpoint plus its packed masks (``output_dir/masks.safetensors``).

    The method arguments are those of :func:`~sparselora.pruning.sequential.prune_model`.
    Calibration batches are ``calibration_data`` if given, else ``samples`` windows of
    ``seq_len`` tokens from ``calibration_text`` (the built-in text when None) tokenised by
    ``tokenizer`` (a tokenizer or its folder; the checkpoint's own by default). The
    computation runs in ``dtype`` (default: the dtype the blocks are stored in); the
    output keeps the stored dtypes. Under ``torchrun`` with ``distributed=True`` every rank
    prunes with statistics summed over all ranks' batches and rank 0 writes. The output is
    assembled beside ``output_dir`` and swapped in whole; the spill files of pruned blocks
    (about the size of the pruned weights) live beside it until then.

    Returns a summary: output folder, masks file, per-block sparsities, seconds.
    """
    start = time.perf_counter()
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise ValueError(f"checkpoint={str(checkpoint)!r} must be a folder with config.json and safetensors shards")
    source = Checkpoint(folder)
    if not source.is_safetensors:
        raise ValueError(f"checkpoint {str(folder)!r} holds no safetensors shards; pruning from disk reads safetensors")
    output = Path(output_dir)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output directory's parent {str(output.parent)!r} does not exist")
    check_apart(output, [folder], "output_dir")
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {str(output)!r} exists; pass overwrite=True to replace it")
    check_replaceable(output, "output_dir")
    plan = make_plan(method, sparsity, nm=nm, owl=owl, owl_threshold=owl_threshold, owl_lambda=owl_lambda,
                     scope=scope, block_size=block_size, damp=damp, include=include, exclude=exclude)
    ranks = Ranks(distributed)
    batches = _calibration(folder, plan, calibration_data, tokenizer, calibration_text, samples, seq_len)
    compute_dtype = dtype or _stored_dtype(source)
    model = meta_model(folder, compute_dtype)
    prefix, blocks = find_decoder_blocks(model)
    writer_rank = ranks.rank == 0
    spill = Path(tempfile.mkdtemp(prefix=".sparselora-prune-", dir=output.parent)) if writer_rank else None
    try:
        blocks_source = CheckpointBlocks(model, prefix, blocks, source, compute_dtype, spill, plan)
        shapes = {t.name: tuple(t.weight.shape) for i in range(len(blocks))
                  for t in _block_targets(blocks[i], f"{prefix}.{i}", plan)}
        masks_path = spill / MASKS_FILE if spill is not None else None
        mask_writer = PackedMaskWriter(masks_path, shapes, {"method": method, "sparsity": sparsity, "nm": nm,
                                                            "owl": owl}) if masks_path else None
        with mask_writer or contextlib.nullcontext():
            def on_block(_index: int, masks: dict[str, torch.Tensor]) -> None:
                if mask_writer is not None:
                    for name, keep in masks.items():
                        mask_writer.write(name, keep)

            summary = run_sequential(model, blocks_source, prefix, batches, plan, on_block, ranks=ranks,
                                     offload_dir=offload_dir, progress=progress)
        if writer_rank:
            def add_masks(staging: Path) -> None:
                shutil.move(str(masks_path), str(staging / MASKS_FILE))

            rewrite_checkpoint(source, output, blocks_source.pruned_tensor, progress=progress, desc="write",
                               extra=add_masks)
        ranks.barrier()
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    ranks.close()
    summary.update({"output": str(output), "masks": str(output / MASKS_FILE), "dtype": str(compute_dtype),
                    "seconds": time.perf_counter() - start})
    return summary
