"""The one-shot engine: decoder blocks pruned one at a time, each calibrated on the pruned ones before it.

The calibration batches run through the model up to its first decoder block; those block
inputs are kept (in memory, or in a folder when asked: :mod:`.activations`). Then, for each
block in turn: its weights' input statistics are gathered on the current inputs (what the
method's table entry asks for: Wanda's feature norms, SparseGPT's Hessians ``2XXᵀ``, or
nothing), each weight is pruned by the method's update, and the pruned block is run again
to give the next block its inputs. So every block is calibrated on what the already-pruned
blocks before it produce, as in the Wanda and SparseGPT papers.

With a reconstruction in the plan, the pruned block's kept weights are trained before it
computes the next block's inputs (:mod:`.reconstruct`). Its target is the dense block's
output: on the dense model's activations, a second stream carried beside the pruned one
(each block runs once more on it), or on the pruned inputs, which the statistics pass
computes anyway.

The engine knows no method by name: it reads the plan's :class:`~.plan.MethodRule`. The
blocks come from a block source (:mod:`.blocks`), from memory or from a checkpoint on disk.
Under ``torch.distributed`` each rank runs its share of the batches; statistics are summed
across ranks before each block is pruned, so every rank prunes the same way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ...distributed import Ranks
from ...progress import bar_disabled
from ..targets import Target
from .activations import ActivationStore, block_output, capture_block_inputs
from .blocks import BlockSource, block_targets
from .owl import outlier_ratio, owl_sparsities
from .plan import PruningPlan, WeightToPrune, wanda_score
from .reconstruct import reconstruct_block
from .sparsegpt import GramAccumulator

__all__ = ["run_sequential"]


def _gather(block: nn.Module, prefix: str, targets: Sequence[Target], inputs: ActivationStore, extras: list[tuple],
            full: bool, next_inputs: ActivationStore | None = None) -> dict[str, GramAccumulator]:
    """Run every batch through ``block``, accumulating each target's input statistics."""
    modules = dict(block.named_modules())
    stats: dict[str, GramAccumulator] = {}
    handles = []
    for t in targets:
        module = modules[t.module_name[len(prefix) + 1 :]]
        features = t.weight.shape[0] if t.out_dim == 1 else t.weight.shape[1]
        stats[t.name] = GramAccumulator(features, full=full, device=t.weight.device)
        handles.append(module.register_forward_hook(
            lambda _m, args, _out, acc=stats[t.name]: acc.add(args[0])))
    try:
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(extras):
                output = block_output(block(inputs[i], *args, **kwargs))
                if next_inputs is not None:
                    next_inputs.append(output)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _forward(block: nn.Module, inputs: ActivationStore, extras: list[tuple], outputs: ActivationStore) -> None:
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(extras):
            outputs.append(block_output(block(inputs[i], *args, **kwargs)))


def _sum_stats(stats: Mapping[str, GramAccumulator], ranks: Ranks) -> None:
    """Totals over every rank's batches (a no-op on one process)."""
    if ranks.world == 1:
        return
    for acc in stats.values():
        ranks.sum(acc.total)
        count = torch.tensor([acc.tokens], dtype=torch.float64)
        acc.tokens = int(ranks.sum(count).item())


def run_sequential(
    model: nn.Module,
    source: BlockSource,
    prefix: str,
    batches: Sequence,
    plan: PruningPlan,
    on_block: Callable[[int, dict[str, torch.Tensor]], None],
    *,
    ranks: Ranks | None = None,
    offload_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The engine behind :func:`~.model.prune_model` and :func:`~.checkpoint.prune_checkpoint`.

    ``source`` hands out the decoder blocks (``load(i)`` / ``release(i, block, pruned)``),
    ``prefix`` is their module path (``"model.layers"``); ``on_block(i, masks)`` receives
    each block's keep-masks as soon as it is pruned. Returns a summary (per-block
    sparsities, OWL ratios, reconstruction errors).
    """
    ranks = ranks or Ranks(False)
    rule = plan.rule
    batches = list(batches)
    if plan.needs_data and not batches:
        raise ValueError("calibration_data is empty; give at least one batch")
    if plan.needs_data and len(batches) < ranks.world:
        warnings.warn(f"{len(batches)} calibration batches for {ranks.world} ranks: ranks above "
                      f"{len(batches) - 1} have no batch and only take part in the sums", UserWarning, stacklevel=2)
    # every world-th batch: a rank's statistics are its batches' sums, added up across ranks
    mine = batches[ranks.rank :: ranks.world]
    folder = None
    if offload_dir is not None:
        folder = Path(tempfile.mkdtemp(prefix=".sparselora-inputs-", dir=offload_dir))
    summary: dict[str, Any] = {"blocks": len(source), "method": plan.method}
    try:
        sparsities: list[float | None] = [plan.sparsity] * len(source)
        if plan.owl:
            ratios = _owl_ratios(model, source, prefix, mine, plan, ranks, folder, progress)
            sparsities = owl_sparsities(ratios, plan.sparsity, plan.owl_lambda)
            summary["owl_ratios"] = ratios
        summary["sparsities"] = sparsities
        inputs = ActivationStore(folder, 0)
        extras = capture_block_inputs(model, source, mine, inputs) if plan.needs_data else []
        recon = plan.reconstruct
        # the dense model's block inputs, carried beside the pruned ones when they are the target
        dense_inputs = inputs if recon is not None and recon.target == "dense" else None
        if recon is not None:
            summary["reconstruction"] = []
        bar = tqdm(range(len(source)), desc=f"prune ({plan.method})", unit="block", disable=bar_disabled(progress))
        for index in bar:
            block = source.load(index)
            targets = block_targets(block, f"{prefix}.{index}", plan.include, plan.exclude)
            goal = None  # what the reconstruction trains the pruned block towards
            goal_from_inputs = None  # the goal when it is the dense block on the pruned inputs
            if recon is not None:
                goal = ActivationStore(folder, f"goal-{index}")
                if dense_inputs is not None:
                    _forward(block, dense_inputs, extras, goal)
                else:
                    goal_from_inputs = goal
            stats: dict[str, GramAccumulator] = {}
            if rule.needs_data and targets:
                # with the pruned inputs as the target, the statistics pass gives it for free
                stats = _gather(block, f"{prefix}.{index}", targets, inputs, extras, full=rule.gathers.full,
                                next_inputs=goal_from_inputs)
                _sum_stats(stats, ranks)
            elif goal_from_inputs is not None:
                _forward(block, inputs, extras, goal_from_inputs)
            masks = {t.name: rule.update(WeightToPrune(t.name, t.weight.data, t.out_dim, stats.get(t.name),
                                                       sparsities[index], plan), rule.score)
                     for t in targets}
            del stats
            if goal is not None and targets:
                def report(text: str, index: int = index) -> None:
                    bar.set_postfix_str(f"block {index}: {text}", refresh=True)

                summary["reconstruction"].append(reconstruct_block(
                    block, targets, masks, inputs, goal, extras, recon, batch_count=len(batches),
                    block_index=index, ranks=ranks, report=report))
            outputs = ActivationStore(folder, index + 1)
            if plan.needs_data and index + 1 < len(source):
                _forward(block, inputs, extras, outputs)
            if dense_inputs is not None:
                # the dense block's outputs are the next block's dense inputs
                if dense_inputs is not inputs:
                    dense_inputs.discard()
                dense_inputs = goal
            elif goal is not None:
                goal.discard()
            inputs.discard()
            inputs = outputs
            on_block(index, masks)
            source.release(index, block, True)
        inputs.discard()
        if dense_inputs is not None:
            dense_inputs.discard()
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return summary


def _owl_ratios(model: nn.Module, source: BlockSource, prefix: str, batches: Sequence, plan: PruningPlan,
                ranks: Ranks, folder: Path | None, progress: bool | None) -> list[float]:
    """OWL's outlier ratio of every block, from Wanda scores on the dense model's activations."""
    inputs = ActivationStore(folder, -1)
    extras = capture_block_inputs(model, source, batches, inputs)
    ratios = []
    for index in tqdm(range(len(source)), desc="OWL ratios", unit="block", disable=bar_disabled(progress)):
        block = source.load(index)
        targets = block_targets(block, f"{prefix}.{index}", plan.include, plan.exclude)
        outputs = ActivationStore(folder, -2 - index)
        stats = _gather(block, f"{prefix}.{index}", targets, inputs, extras, full=False, next_inputs=outputs)
        _sum_stats(stats, ranks)
        scores = [wanda_score(t.weight.detach().t() if t.out_dim == 1 else t.weight.detach(), stats[t.name])
                  for t in targets]
        ratios.append(outlier_ratio(scores, plan.owl_threshold) if targets else 0.0)
        inputs.discard()
        inputs = outputs
        source.release(index, block, False)
    inputs.discard()
    return ratios
