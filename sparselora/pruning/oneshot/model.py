"""One-shot pruning of a decoder model held in memory, one block at a time."""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
import torch.nn as nn

from ...distributed import Ranks
from .blocks import InMemoryBlocks, decoder_targets, find_decoder_blocks
from .engine import run_sequential
from .plan import make_plan

__all__ = ["prune_model"]


def prune_model(
    model: nn.Module,
    calibration_data: Iterable | None = None,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    *,
    distributed: bool = False,
    offload_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Prune a decoder model in place, one block at a time; return ``{parameter name: keep-mask}``.

    Args:
        model: a decoder model (Llama, Mistral, Qwen, GPT-2 style: its blocks are found
            from the module tree, see :func:`~.blocks.find_decoder_blocks`).
        calibration_data: batches the model is called on (``model(**batch)`` for a dict,
            e.g. ``{"input_ids": ...}``, ``model(*batch)`` for a tuple, ``model(batch)`` for a
            tensor); needed by ``"wanda"``, ``"sparsegpt"`` and OWL.
        method: a name of the method table (:func:`~.plan.method_names`): ``"magnitude"``
            (``|W|``), ``"wanda"`` (``|W|·‖X‖₂``) or ``"sparsegpt"`` (OBS reconstruction:
            the kept weights are updated), or one added with :func:`~.plan.register_method`.
        sparsity: fraction pruned from every pruned weight (or the mean over blocks with
            ``owl=True``). Give ``nm=(2, 4)`` instead for N:M masks.
        distributed: under ``torchrun``: each rank runs its share of the batches and the
            statistics are summed before each block is pruned; every rank gets the same masks.
        offload_dir: keep the block inputs in files under this folder instead of in memory.
        progress: progress bar per block (None: only on a terminal).
        options: the rest of the plan, the fields of :class:`~.plan.PruningPlan`: ``nm``,
            ``scope`` (``"row"`` or ``"layer"``; the method's default when None), ``owl``,
            ``owl_threshold``, ``owl_lambda``, ``block_size``, ``damp``, ``include`` and
            ``exclude`` (globs over parameter or module names; the LM head and embeddings are
            never pruned), and ``reconstruct``: True (or a
            :class:`~.reconstruct.Reconstruction`, or a dict of its fields) trains each pruned
            block's kept weights towards the dense model's block outputs on the calibration
            batches before the next block is calibrated; pruned weights stay exactly 0 and the
            masks are those the block was pruned with.

    Only the weights of the decoder blocks are pruned. The model runs in eval mode during
    the call (restored afterwards) and without a KV cache.
    """
    plan = make_plan(method, sparsity, **options)
    if plan.needs_data and calibration_data is None:
        needs = f"method={method!r}" if plan.rule.needs_data else ("owl=True" if plan.owl else "reconstruct=")
        raise ValueError(f"{needs} needs calibration_data (batches of inputs)")
    prefix, blocks = find_decoder_blocks(model)
    decoder_targets(blocks, prefix, plan.include, plan.exclude)  # refuses an include glob matching nothing
    masks: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    ranks = Ranks(distributed)
    try:
        run_sequential(model, InMemoryBlocks(blocks), prefix, list(calibration_data or []), plan,
                       lambda _i, block_masks: masks.update(block_masks), ranks=ranks,
                       offload_dir=offload_dir, progress=progress)
    finally:
        model.train(was_training)
    ranks.close()
    return masks
