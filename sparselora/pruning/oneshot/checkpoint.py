"""One-shot pruning straight from a checkpoint on disk, for models larger than RAM.

The model is built from its ``config.json`` with every parameter on the meta device (no
memory), buffers real (rotary frequencies): :func:`~.blocks.meta_model`. The weights before
the first decoder block (embeddings) are read to compute the calibration inputs of block 0,
then dropped. Each decoder block is read from the safetensors shards when its turn comes
(:class:`~.blocks.CheckpointBlocks`), calibrated, pruned (:func:`~.engine.run_sequential`),
spilled to a file beside the output and dropped again. At the end the output checkpoint is
written tensor by tensor: the pruned weights from the spill files, everything else copied
from the input, with the same shards, index and companion files, plus the packed keep-masks
in ``masks.safetensors``.

Peak memory: one block, the calibration activations (or none, with ``offload_dir``) and a
fixed overhead (the embeddings while block 0's inputs are computed). The masks and weights
equal those of the in-memory :func:`~.model.prune_model` on the same model in the same
dtype, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Union

import torch

from ...distributed import Ranks
from ...io.atomic import check_folder_replaceable
from ...io.checkpoints import Checkpoint
from ...io.packed_masks import PackedMaskWriter
from ...io.paths import check_apart
from ..calibration import calibration_batches
from ..checkpoint_ops import rewrite_checkpoint
from .blocks import CheckpointBlocks, decoder_targets, find_decoder_blocks, meta_model
from .engine import run_sequential
from .plan import PruningPlan, make_plan

__all__ = ["prune_checkpoint", "MASKS_FILE"]

PathLike = Union[str, os.PathLike]
MASKS_FILE = "masks.safetensors"


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
    calibration_data: Iterable | None = None,
    tokenizer: Any = None,
    calibration_text: str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    dtype: torch.dtype | None = None,
    distributed: bool = False,
    offload_dir: PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Prune the Hugging Face causal LM in ``checkpoint`` (a folder with ``config.json`` and
    safetensors shards) block by block, never holding more than one block, and write the
    pruned checkpoint plus its packed masks (``output_dir/masks.safetensors``).

    ``method``, ``sparsity`` and the ``options`` (the other fields of
    :class:`~.plan.PruningPlan`: ``nm``, ``scope``, ``owl``, ``owl_threshold``, ``owl_lambda``,
    ``block_size``, ``damp``, ``include``, ``exclude``, ``reconstruct``) are those of
    :func:`~.model.prune_model`; with ``reconstruct`` the peak memory adds the block in fp32,
    its optimizer state and one or two more stores of block outputs.
    Calibration batches are ``calibration_data`` if given, else ``samples`` windows of
    ``seq_len`` tokens from ``calibration_text`` (the built-in text when None) tokenised by
    ``tokenizer`` (a tokenizer or its folder; the checkpoint's own by default). The
    computation runs in ``dtype`` (default: the dtype the blocks are stored in); the
    output keeps the stored dtypes. Under ``torchrun`` with ``distributed=True`` every rank
    prunes with statistics summed over all ranks' batches and rank 0 writes. The output is
    assembled beside ``output_dir`` and swapped in whole; the spill files of pruned blocks
    (about the size of the pruned weights) live beside it until then.

    Returns a summary: output folder, masks file, per-block sparsities, seconds, and with
    ``reconstruct`` each block's held-out error before and after (``"reconstruction"``).
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
    check_apart(output, [folder, *source.files], "output_dir")
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {str(output)!r} exists; pass overwrite=True to replace it")
    check_folder_replaceable(output, "output_dir")
    plan = make_plan(method, sparsity, **options)
    ranks = Ranks(distributed)
    batches = _calibration(folder, plan, calibration_data, tokenizer, calibration_text, samples, seq_len)
    compute_dtype = dtype or _stored_dtype(source)
    model = meta_model(folder, compute_dtype)
    prefix, blocks = find_decoder_blocks(model)
    writer_rank = ranks.rank == 0
    spill = Path(tempfile.mkdtemp(prefix=".sparselora-prune-", dir=output.parent)) if writer_rank else None
    try:
        blocks_source = CheckpointBlocks(model, prefix, blocks, source, compute_dtype, spill, plan.include,
                                         plan.exclude)
        layout = blocks_source.layout  # masks are written in the stored layout, as the weights are
        shapes = {name: tuple(piece.shape)
                  for t in decoder_targets(blocks, prefix, plan.include, plan.exclude)
                  for name, piece in layout.split(t.name, torch.empty(t.weight.shape, device="meta"))}
        masks_path = spill / MASKS_FILE if spill is not None else None
        recipe = {"method": method, "sparsity": plan.sparsity, "nm": plan.nm, "owl": plan.owl,
                  "reconstruct": dataclasses.asdict(plan.reconstruct) if plan.reconstruct else None}
        mask_writer = PackedMaskWriter(masks_path, shapes, recipe) if masks_path else None
        with mask_writer or contextlib.nullcontext():
            def on_block(_index: int, masks: dict[str, torch.Tensor]) -> None:
                if mask_writer is not None:
                    for whole, keep in masks.items():
                        for name, piece in layout.split(whole, keep):
                            mask_writer.write(name, piece)

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
