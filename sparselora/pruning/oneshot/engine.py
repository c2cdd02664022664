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
from ..targets import Target, expert_of, join_experts, split_experts
from .activations import ActivationStore, block_output, capture_block_inputs
from .blocks import BlockSource, block_targets
from .experts import watch_experts
from .owl import outlier_ratio, owl_sparsities
from .plan import PruningPlan, WeightToPrune, magnitude_update, wanda_score
from .reconstruct import reconstruct_block
from .sparsegpt import GramAccumulator

__all__ = ["run_sequential"]


def _gather(block: nn.Module, prefix: str, targets: Sequence[Target], inputs: ActivationStore, extras: list[tuple],
            full: bool, next_inputs: ActivationStore | None = None, *, all_experts: bool = False,
            expert_tokens: dict[str, list[int]] | None = None) -> dict[str, GramAccumulator]:
    """Run every batch through ``block``, accumulating each target's input statistics. A fused
    expert's statistics come from the tokens routed to it (:mod:`.experts`; all of them with
    ``all_experts``), whose counts go to ``expert_tokens[experts module name]``."""
    modules = dict(block.named_modules())
    stats: dict[str, GramAccumulator] = {}
    routed: dict[str, dict[tuple[str, int], Callable]] = {}  # experts module -> (weight, expert) -> add
    handles = []
    for t in targets:
        features = t.weight.shape[0] if t.out_dim == 1 else t.weight.shape[1]
        stats[t.name] = acc = GramAccumulator(features, full=full, device=t.weight.device)
        expert = expert_of(t.name)
        if expert is not None:
            weight_name, index = expert
            routed.setdefault(t.module_name, {})[(weight_name.rsplit(".", 1)[-1], index)] = acc.add
            continue
        module = modules[t.module_name[len(prefix) + 1 :]]
        handles.append(module.register_forward_hook(lambda _m, args, _out, acc=acc: acc.add(args[0])))
    for module_name, adds in routed.items():
        handle, counts = watch_experts(modules[module_name[len(prefix) + 1 :]], adds, all_experts=all_experts)
        handles.append(handle)
        if expert_tokens is not None:
            expert_tokens[module_name] = counts
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


def _prune(t: Target, stats: GramAccumulator | None, sparsity: float | None, plan: PruningPlan,
           unreached: list[str]) -> torch.Tensor:
    """Prune one target with the plan's method; a weight the calibration never reached (an
    expert no token was routed to: no statistics) by magnitude, its name added to ``unreached``."""
    weight = WeightToPrune(t.name, t.weight.data, t.out_dim, stats, sparsity, plan)
    if stats is not None and stats.tokens == 0 and expert_of(t.name) is not None:
        unreached.append(t.name)
        return magnitude_update(weight)
    return plan.rule.update(weight, plan.rule.score)


def _warn_unreached(unreached: Sequence[str]) -> None:
    if unreached:
        shown = ", ".join(unreached[:6]) + (f" and {len(unreached) - 6} more" if len(unreached) > 6 else "")
        warnings.warn(
            f"{len(unreached)} expert weights received none of the calibration tokens ({shown}); they were pruned "
            "by magnitude. More calibration data, or all_experts=True (every token through every expert, for the "
            "statistics only), calibrates them.",
            UserWarning,
            stacklevel=3,
        )


def _forward(block: nn.Module, inputs: ActivationStore, extras: list[tuple], outputs: ActivationStore) -> None:
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(extras):
            outputs.append(block_output(block(inputs[i], *args, **kwargs)))


def _sum_counts(expert_tokens: dict[str, list[int]], ranks: Ranks) -> None:
    """Each expert's token counts over every rank's batches (a no-op on one process)."""
    if ranks.world == 1:
        return
    for name, counts in expert_tokens.items():
        expert_tokens[name] = [int(v) for v in ranks.sum(torch.tensor(counts, dtype=torch.float64)).tolist()]


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
        expert_tokens: dict[str, list[int]] = {}  # calibration tokens each expert was calibrated on
        summary["expert_tokens"] = expert_tokens
        bar = tqdm(range(len(source)), desc=f"prune ({plan.method})", unit="block", disable=bar_disabled(progress))
        for index in bar:
            block = source.load(index)
            whole = block_targets(block, f"{prefix}.{index}", plan.include, plan.exclude)
            targets = split_experts(whole)  # each expert of a fused weight pruned as its own matrix
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
                block_tokens: dict[str, list[int]] = {}
                stats = _gather(block, f"{prefix}.{index}", targets, inputs, extras, full=rule.gathers.full,
                                next_inputs=goal_from_inputs, all_experts=plan.all_experts,
                                expert_tokens=block_tokens)
                _sum_stats(stats, ranks)
                _sum_counts(block_tokens, ranks)
                expert_tokens.update(block_tokens)
            elif goal_from_inputs is not None:
                _forward(block, inputs, extras, goal_from_inputs)
            unreached: list[str] = []
            masks = {t.name: _prune(t, stats.get(t.name), sparsities[index], plan, unreached) for t in targets}
            _warn_unreached(unreached)
            masks = join_experts(whole, masks)
            targets = whole
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
        targets = split_experts(block_targets(block, f"{prefix}.{index}", plan.include, plan.exclude))
        outputs = ActivationStore(folder, -2 - index)
        stats = _gather(block, f"{prefix}.{index}", targets, inputs, extras, full=False, next_inputs=outputs,
                        all_experts=plan.all_experts)
        _sum_stats(stats, ranks)
        scores = [wanda_score(t.weight.detach().t() if t.out_dim == 1 else t.weight.detach(), stats[t.name])
                  for t in targets]
        ratios.append(outlier_ratio(scores, plan.owl_threshold) if targets else 0.0)
        inputs.discard()
        inputs = outputs
        source.release(index, block, False)
    inputs.discard()
    return ratios
