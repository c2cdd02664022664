"""Sequential one-shot pruning of decoder models, one block at a time (Wanda, SparseGPT, OWL).

The calibration batches run through the model up to its first decoder block; those block
inputs are kept (in memory, or in a folder when asked). Then, for each block in turn: its
``Linear`` layers' input statistics are gathered on the current inputs (Wanda's feature
norms, SparseGPT's Hessians ``2XXᵀ``), the block is pruned, and the pruned block is run again
to give the next block its inputs. So every block is calibrated on what the already-pruned
blocks before it produce, as in the Wanda and SparseGPT papers.

The decoder blocks are found from the module tree (the ``nn.ModuleList`` of identical
blocks holding the most parameters: ``model.layers`` of Llama/Mistral/Qwen, ``transformer.h``
of GPT-2), so no per-model code is needed. The blocks come from a *block source*, which
lets :mod:`sparselora.pruning.llm_checkpoint` read each block from a checkpoint on disk
when its turn comes. Under ``torch.distributed`` each rank runs its share of the batches;
statistics are summed across ranks before each block is pruned, so every rank prunes
the same way.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import ops
from ..distributed import Ranks
from ..progress import bar_disabled
from ..rules import check_sparsity
from ._targets import Target, filter_targets, is_hf_conv1d, model_targets
from .importance import _run_batch
from .owl import OWL_LAMBDA, OWL_THRESHOLD, outlier_ratio, owl_sparsities
from .sparsegpt import GramAccumulator, sparsegpt_prune_

__all__ = ["prune_model", "make_plan", "find_decoder_blocks", "PruningPlan", "InMemoryBlocks", "run_sequential", "LLM_METHODS"]

LLM_METHODS = ("magnitude", "wanda", "sparsegpt")
Globs = Union[str, Sequence[str], None]


@dataclass(frozen=True)
class PruningPlan:
    """What to do to each decoder block.

    ``sparsity`` (one float, or one per block after OWL) or ``nm = (n, m)``; ``scope`` is the
    comparison group of magnitude and Wanda (``"layer"`` or ``"row"``); SparseGPT picks
    its own groups (column blocks of ``block_size``).
    """

    method: str
    sparsity: float | None = None
    nm: tuple[int, int] | None = None
    scope: str = "row"
    owl: bool = False
    owl_threshold: float = OWL_THRESHOLD
    owl_lambda: float = OWL_LAMBDA
    block_size: int = 128
    damp: float = 0.01
    include: Globs = None
    exclude: Globs = None

    def __post_init__(self) -> None:
        if self.method not in LLM_METHODS:
            raise ValueError(f"method={self.method!r} is unknown; accepted: {', '.join(LLM_METHODS)}")
        if (self.sparsity is None) == (self.nm is None):
            raise ValueError("give exactly one of sparsity= and nm=(n, m)")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        if self.nm is not None:
            n, m = self.nm
            if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
                raise ValueError(f"nm={self.nm!r} must be (n, m) ints with 0 < n <= m, e.g. (2, 4)")
            if self.owl:
                raise ValueError("owl=True allocates unstructured sparsity per block; it does not apply to nm=")
        if self.scope not in ("layer", "row"):
            raise ValueError(f"scope={self.scope!r} is unknown; accepted: layer, row")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude" or self.owl


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


class _Activations:
    """The current inputs of a block, one tensor per calibration batch, in memory or on disk."""

    def __init__(self, folder: Path | None, generation: int) -> None:
        self.folder, self.generation = folder, generation
        self.items: list[Any] = []

    def append(self, tensor: torch.Tensor) -> None:
        if self.folder is None:
            self.items.append(tensor)
            return
        from safetensors.torch import save_file

        path = self.folder / f"inputs-{self.generation}-{len(self.items)}.safetensors"
        save_file({"x": tensor.contiguous()}, str(path))
        self.items.append(path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.items[index]
        if self.folder is None:
            return item
        from safetensors.torch import load_file

        return load_file(str(item))["x"]

    def discard(self) -> None:
        if self.folder is not None:
            for path in self.items:
                path.unlink(missing_ok=True)
        self.items = []


class _BlockInputs(Exception):
    """Raised by the hook on the first block: the rest of the forward pass is not needed."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


def _without_cache(model: nn.Module, batch: Any) -> Any:
    """The batch with ``use_cache=False`` when the model takes it: no KV cache is built."""
    if isinstance(batch, Mapping) and "use_cache" in inspect.signature(model.forward).parameters:
        return {**batch, "use_cache": False}
    return batch


def capture_inputs(model: nn.Module, first_block: nn.Module, batches: Iterable, store: _Activations) -> list[tuple]:
    """Run each batch up to ``first_block``; keep its hidden states in ``store`` and return
    the other arguments it was called with (attention masks, positions), one per batch."""
    def hook(_module, args, kwargs):
        raise _BlockInputs(args, kwargs)

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    extras: list[tuple] = []
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    _run_batch(model, _without_cache(model, batch))
                except _BlockInputs as captured:
                    args, kwargs = captured.args, dict(captured.kwargs)
                    hidden = args[0] if args else kwargs.pop("hidden_states")
                    store.append(hidden)
                    extras.append((tuple(args[1:]), kwargs))
                    continue
                raise RuntimeError("the forward pass never reached the first decoder block")
    finally:
        handle.remove()
    return extras


def _capture(model: nn.Module, source, batches: Sequence, store: _Activations) -> list[tuple]:
    first = source.load(0)
    source.open_stem()
    try:
        return capture_inputs(model, first, batches, store)
    finally:
        source.close_stem()


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _block_targets(block: nn.Module, prefix: str, plan: PruningPlan) -> list[Target]:
    local = model_targets(block)
    named = [Target(f"{prefix}.{t.name}", f"{prefix}.{t.module_name}", t.weight, t.out_dim) for t in local]
    return filter_targets(named, plan.include, plan.exclude)


def _gather(block: nn.Module, prefix: str, targets: Sequence[Target], inputs: _Activations, extras: list[tuple],
            full: bool, next_inputs: _Activations | None = None) -> dict[str, GramAccumulator]:
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
                output = _block_output(block(inputs[i], *args, **kwargs))
                if next_inputs is not None:
                    next_inputs.append(output)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _forward(block: nn.Module, inputs: _Activations, extras: list[tuple], outputs: _Activations) -> None:
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(extras):
            outputs.append(_block_output(block(inputs[i], *args, **kwargs)))


def _sum_stats(stats: Mapping[str, GramAccumulator], ranks) -> None:
    """Totals over every rank's batches (a no-op on one process)."""
    if ranks.world == 1:
        return
    for acc in stats.values():
        ranks.sum(acc.total)
        count = torch.tensor([acc.tokens], dtype=torch.float64)
        acc.tokens = int(ranks.sum(count).item())


def _nm_mask(score: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    if score.shape[1] % m:
        raise ValueError(f"{name}: input size {score.shape[1]} is not a multiple of m={m}")
    return ops.nm_prune_mask(score, n, m)


def _row_or_layer_mask(score: torch.Tensor, sparsity: float, scope: str) -> torch.Tensor:
    """Keep-mask of a 2-D ``(out, in)`` score: per row or over the whole layer, exact counts."""
    if scope == "row":
        return ops.row_prune_mask(score, ops.prune_count(score.shape[1], sparsity))
    (keep,) = ops.select_prune_mask([score], ops.prune_count(score.numel(), sparsity))
    return keep


def _prune_target(t: Target, stats: GramAccumulator | None, plan: PruningPlan, sparsity: float | None) -> torch.Tensor:
    """Prune one weight in place; its keep-mask in the weight's own layout."""
    weight = t.weight.data
    matrix = weight.t() if t.out_dim == 1 else weight  # (out, in) view
    if plan.method == "sparsegpt":
        work = matrix.contiguous()
        n, m = plan.nm if plan.nm else (None, None)
        keep = sparsegpt_prune_(work, stats.hessian(), sparsity, n=n, m=m, block_size=plan.block_size, damp=plan.damp)
        matrix.copy_(work)
    else:
        # one fp32 buffer for the score, built in place
        score = matrix.float() if matrix.dtype != torch.float32 else matrix.clone()
        score.abs_()
        if plan.method == "wanda":
            score.mul_(stats.feature_norms().to(matrix.device).unsqueeze(0))
        if plan.nm:
            keep = _nm_mask(score, *plan.nm, name=t.name)
        else:
            keep = _row_or_layer_mask(score, sparsity, plan.scope)
        del score
        if t.out_dim == 1:
            keep = keep.t().contiguous()
        ops.apply_mask_(weight, keep)
        return keep
    return keep.t().contiguous() if t.out_dim == 1 else keep


def _wanda_scores(targets: Sequence[Target], stats: Mapping[str, GramAccumulator]) -> list[torch.Tensor]:
    scores = []
    for t in targets:
        matrix = t.weight.detach().t() if t.out_dim == 1 else t.weight.detach()
        scores.append(matrix.abs().float() * stats[t.name].feature_norms().to(matrix.device).unsqueeze(0))
    return scores


def run_sequential(
    model: nn.Module,
    source,
    prefix: str,
    batches: Sequence,
    plan: PruningPlan,
    on_block: Callable[[int, dict[str, torch.Tensor]], None],
    *,
    ranks=None,
    offload_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The sequential engine behind :func:`prune_model` and checkpoint pruning.

    ``source`` hands out the decoder blocks (``load(i)`` / ``release(i, block, pruned)``),
    ``prefix`` is their module path (``"model.layers"``); ``on_block(i, masks)`` receives
    each block's keep-masks as soon as it is pruned. Returns a summary (per-block
    sparsities, OWL ratios).
    """
    ranks = ranks or Ranks(False)
    batches = list(batches)
    if plan.needs_data and not batches:
        raise ValueError("calibration_data is empty; give at least one batch")
    if len(batches) < ranks.world:
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
            ratios = _owl_pass(model, source, prefix, mine, plan, ranks, folder, progress)
            sparsities = owl_sparsities(ratios, plan.sparsity, plan.owl_lambda)
            summary["owl_ratios"] = ratios
        summary["sparsities"] = sparsities
        inputs = _Activations(folder, 0)
        extras = _capture(model, source, mine, inputs) if plan.needs_data else []
        bar = tqdm(range(len(source)), desc=f"prune ({plan.method})", unit="block", disable=bar_disabled(progress))
        for index in bar:
            block = source.load(index)
            targets = _block_targets(block, f"{prefix}.{index}", plan)
            stats: dict[str, GramAccumulator] = {}
            if plan.method != "magnitude" and targets:
                stats = _gather(block, f"{prefix}.{index}", targets, inputs, extras, full=plan.method == "sparsegpt")
                _sum_stats(stats, ranks)
            masks = {t.name: _prune_target(t, stats.get(t.name), plan, sparsities[index]) for t in targets}
            outputs = _Activations(folder, index + 1)
            if plan.needs_data and index + 1 < len(source):
                _forward(block, inputs, extras, outputs)
            inputs.discard()
            inputs = outputs
            on_block(index, masks)
            source.release(index, block, True)
        inputs.discard()
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return summary


def _owl_pass(model, source, prefix, batches, plan, ranks, folder, progress) -> list[float]:
    """OWL's outlier ratio of every block, from Wanda scores on the dense model's activations."""
    inputs = _Activations(folder, -1)
    extras = _capture(model, source, batches, inputs)
    ratios = []
    for index in tqdm(range(len(source)), desc="OWL ratios", unit="block", disable=bar_disabled(progress)):
        block = source.load(index)
        targets = _block_targets(block, f"{prefix}.{index}", plan)
        outputs = _Activations(folder, -2 - index)
        stats = _gather(block, f"{prefix}.{index}", targets, inputs, extras, full=False, next_inputs=outputs)
        _sum_stats(stats, ranks)
        ratios.append(outlier_ratio(_wanda_scores(targets, stats), plan.owl_threshold) if targets else 0.0)
        inputs.discard()
        inputs = outputs
        source.release(index, block, False)
    inputs.discard()
    return ratios


def make_plan(method: str, sparsity: float | None, *, nm: tuple[int, int] | None = None, scope: str | None = None,
              **options: Any) -> PruningPlan:
    """The plan of :func:`prune_model`'s arguments: ``nm`` replaces ``sparsity``; the scope
    defaults to rows for Wanda and layers for magnitude; SparseGPT takes none."""
    if method == "sparsegpt" and scope is not None:
        raise ValueError("method='sparsegpt' chooses its own groups (column blocks); scope= is for magnitude and wanda")
    return PruningPlan(method=method, sparsity=None if nm is not None else sparsity,
                       nm=tuple(nm) if nm is not None else None,
                       scope=scope or ("row" if method == "wanda" else "layer"), **options)


def prune_model(
    model: nn.Module,
    calibration_data: Iterable | None = None,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    *,
    nm: tuple[int, int] | None = None,
    owl: bool = False,
    owl_threshold: float = OWL_THRESHOLD,
    owl_lambda: float = OWL_LAMBDA,
    scope: str | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    include: Globs = None,
    exclude: Globs = None,
    distributed: bool = False,
    offload_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Prune a decoder model in place, one block at a time; return ``{parameter name: keep-mask}``.

    Args:
        model: a decoder model (Llama, Mistral, Qwen, GPT-2 style: its blocks are found
            from the module tree, see :func:`find_decoder_blocks`).
        calibration_data: batches the model is called on (``model(**batch)`` for a dict,
            e.g. ``{"input_ids": ...}``); needed by ``"wanda"``, ``"sparsegpt"`` and OWL.
        method: ``"magnitude"`` (``|W|``), ``"wanda"`` (``|W|·‖X‖₂``) or ``"sparsegpt"``
            (OBS reconstruction: the kept weights are updated).
        sparsity: fraction pruned from every pruned weight (or the mean over blocks with
            ``owl=True``). Give ``nm=(2, 4)`` instead for N:M masks (``sparsity=None``).
        owl: non-uniform sparsity per block from each block's outlier ratio (OWL), within
            ``±owl_lambda`` of ``sparsity``, mean exactly ``sparsity``; ``owl_threshold`` is the
            paper's M.
        scope: comparison group of magnitude/Wanda: ``"row"`` (default for Wanda, as in its
            paper) or ``"layer"`` (default for magnitude). SparseGPT takes no scope.
        block_size, damp: SparseGPT's column block and dampening (fraction of the mean
            Hessian diagonal).
        include / exclude: globs over parameter or module names narrowing the pruned weights
            (the LM head and embeddings are never pruned).
        distributed: under ``torchrun``: each rank runs its share of the batches and the
            statistics are summed before each block is pruned; every rank gets the same masks.
        offload_dir: keep the block inputs in files under this folder instead of in memory.
        progress: progress bar per block (None: only on a terminal).

    Only the weights of the decoder blocks are pruned. The model runs in eval mode during
    the call (restored afterwards) and without a KV cache.
    """
    plan = make_plan(method, sparsity, nm=nm, owl=owl, owl_threshold=owl_threshold, owl_lambda=owl_lambda,
                     scope=scope, block_size=block_size, damp=damp, include=include, exclude=exclude)
    if plan.needs_data and calibration_data is None:
        raise ValueError(f"method={method!r}{' with owl=True' if owl else ''} needs calibration_data (batches of inputs)")
    prefix, blocks = find_decoder_blocks(model)
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
