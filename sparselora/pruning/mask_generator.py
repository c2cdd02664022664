"""Pruning masks: unstructured (global or per layer), structured, random and N:M.

A mask is a ``torch.bool`` tensor shaped like its weight, ``True`` = kept, keyed by the
parameter's full name. A comparison group of ``n`` weights loses exactly
``round(sparsity * n)``; ties at the cut go lowest flat index first, weights in model order.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import ops
from . import importance as imp
from ._targets import (
    SparsitySpec,
    Target,
    check_sparsity,
    filter_targets,
    model_targets,
    resolve_sparsity,
    state_dict_targets,
)

__all__ = [
    "MaskGenerator",
    "compute_unstructured_mask",
    "compute_structured_mask",
    "compute_random_mask",
    "compute_nm_mask",
    "compute_masks_for_state_dict",
    "masks_from_scores",
    "sparsity_schedule",
    "prune_gradually",
    "METHODS",
    "METRICS",
]

METHODS = ("unstructured", "structured", "random")
METRICS = ("magnitude", "taylor", "wanda")
STRUCTURED_NORMS = ("l1", "l2")
Metric = Union[str, Callable[[nn.Module, str], torch.Tensor]]
Globs = Union[str, Sequence[str], None]


def _check_choice(value: object, arg: str, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ValueError(f"{arg}={value!r} is unknown; accepted: {', '.join(accepted)}")
    return value  # type: ignore[return-value]


def _channel_scores(score: torch.Tensor, out_dim: int, norm: str) -> torch.Tensor:
    rows = score.detach().movedim(out_dim, 0).reshape(score.shape[out_dim], -1).float()
    p = 1 if norm == "l1" else 2
    return torch.linalg.vector_norm(rows, ord=p, dim=1)


def _expand_channels(channel_mask: torch.Tensor, shape: torch.Size, out_dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[out_dim] = shape[out_dim]
    return channel_mask.view(view).expand(shape).contiguous()


def masks_from_scores(
    targets: Sequence[Target],
    sparsities: Mapping[str, float],
    scores: Mapping[str, torch.Tensor] | None = None,
    *,
    global_pruning: bool = False,
    structured: bool = False,
    structured_norm: str = "l2",
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Masks for ``targets`` from their ``scores`` (magnitude of the weights when None).

    Each target in ``sparsities`` is pruned; ``global_pruning`` ranks them together (one
    threshold; all must share one sparsity), otherwise each is its own group.
    ``structured`` ranks whole output channels by the L1/L2 norm of their scores.
    """
    chosen = [t for t in targets if t.name in sparsities]
    absolute = scores is None  # magnitude: read |w| straight from the weight

    def score_of(t: Target) -> torch.Tensor:
        s = t.weight.detach() if scores is None else scores[t.name]
        return _channel_scores(s, t.out_dim, structured_norm) if structured else s

    def finish(t: Target, mask: torch.Tensor) -> torch.Tensor:
        return _expand_channels(mask, t.weight.shape, t.out_dim) if structured else mask

    masks: dict[str, torch.Tensor] = {}
    if global_pruning and chosen:
        values = {sparsities[t.name] for t in chosen}
        if len(values) != 1:
            raise ValueError("global_pruning=True needs one sparsity for every weight; got a per-layer mapping")
        group = [score_of(t) for t in chosen]
        k = ops.prune_count(sum(g.numel() for g in group), values.pop())
        # one fused call: the compiled backends read every weight once
        for t, mask in zip(chosen, ops.select_prune_mask(group, k, absolute=absolute)):
            masks[t.name] = finish(t, mask)
        return masks
    for t in tqdm(chosen, desc="masks", unit="tensor", disable=_no_bar(progress)):
        g = score_of(t)
        (mask,) = ops.select_prune_mask([g], ops.prune_count(g.numel(), sparsities[t.name]), absolute=absolute)
        masks[t.name] = finish(t, mask)
    return masks


def _no_bar(progress: bool | None) -> bool | None:
    # tqdm's disable=None hides the bar when not writing to a TTY
    return None if progress is None else not progress


def _random_scores(targets: Sequence[Target], seed: int) -> dict[str, torch.Tensor]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int")
    gen = torch.Generator().manual_seed(seed)
    # drawn on the CPU in model order, so a seed gives the same mask on every device
    return {t.name: torch.rand(t.weight.shape, generator=gen).to(t.weight.device) for t in targets}


class MaskGenerator:
    """Builds pruning masks for a model.

    Args:
        model: the model; its Linear/Conv weights are the default targets.
        sparsity: fraction pruned, a float in [0, 1] or a mapping from parameter name,
            module name or glob to a float (unmatched weights stay dense).
        method: ``"unstructured"``, ``"structured"`` (whole output channels/filters) or
            ``"random"`` (seeded).
        importance_metric: ``"magnitude"``, ``"taylor"`` (needs ``.grad``), ``"wanda"``
            (needs ``calibration_data`` or ``activation_norms``), or a callable
            ``(module, name) -> Tensor``.
        global_pruning: rank all targets together (one threshold) instead of per layer.
        structured_norm: ``"l1"`` or ``"l2"`` norm ranking channels in structured mode.
        include / exclude: globs over parameter or module names narrowing the targets.
        seed: seed of the random method.
        calibration_data: iterable of batches for ``"wanda"``.
        activation_norms: precomputed input-feature norms for ``"wanda"``.
        progress: show a progress bar (None: only on a terminal).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: SparsitySpec,
        method: str = "unstructured",
        importance_metric: Metric = "magnitude",
        *,
        global_pruning: bool = False,
        structured_norm: str = "l2",
        include: Globs = None,
        exclude: Globs = None,
        seed: int = 0,
        calibration_data: Iterable | None = None,
        activation_norms: Mapping[str, torch.Tensor] | None = None,
        progress: bool | None = None,
    ) -> None:
        self.model = model
        self.method = _check_choice(method, "method", METHODS)
        if not callable(importance_metric):
            _check_choice(importance_metric, "importance_metric", METRICS)
        self.importance_metric = importance_metric
        self.structured_norm = _check_choice(structured_norm, "structured_norm", STRUCTURED_NORMS)
        if not isinstance(global_pruning, bool):
            raise TypeError(f"global_pruning={global_pruning!r} must be True or False")
        self.global_pruning = global_pruning
        self.targets = filter_targets(model_targets(model), include, exclude)
        if not self.targets:
            raise ValueError("the model has no prunable weights (Linear/Conv) after include/exclude")
        self.sparsities = resolve_sparsity(sparsity, self.targets)
        self.seed = seed
        self.calibration_data = calibration_data
        self.activation_norms = activation_norms
        self.progress = progress
        if importance_metric == "wanda" and method != "random" and calibration_data is None and activation_norms is None:
            raise ValueError("importance_metric='wanda' needs calibration_data or activation_norms")

    def _scores(self) -> dict[str, torch.Tensor] | None:
        if self.method == "random":
            return _random_scores(self.targets, self.seed)
        metric = self.importance_metric
        if metric == "magnitude":
            return None
        norms = self.activation_norms
        if metric == "wanda" and norms is None:
            norms = imp.collect_activation_norms(self.model, self.calibration_data)
        if callable(metric):
            return imp.compute_layer_importance(self.model, method=metric)
        return imp.compute_layer_importance(self.model, method=metric, activation_norms=norms)

    def generate_masks(self) -> dict[str, torch.Tensor]:
        """Compute and return ``{parameter name: bool mask}`` for every pruned weight."""
        return masks_from_scores(
            self.targets,
            self.sparsities,
            self._scores(),
            global_pruning=self.global_pruning,
            structured=self.method == "structured",
            structured_norm=self.structured_norm,
            progress=self.progress,
        )


def compute_unstructured_mask(
    model: nn.Module,
    sparsity: SparsitySpec,
    importance_metric: Metric = "magnitude",
    global_pruning: bool = False,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Element-wise masks; see :class:`MaskGenerator` for the keyword arguments."""
    return MaskGenerator(
        model, sparsity, "unstructured", importance_metric, global_pruning=global_pruning, **kwargs
    ).generate_masks()


def compute_structured_mask(
    model: nn.Module,
    sparsity: SparsitySpec,
    importance_metric: Metric = "magnitude",
    norm: str = "l2",
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Masks removing whole output channels / filters ranked by the ``norm`` of their importance."""
    return MaskGenerator(
        model, sparsity, "structured", importance_metric, structured_norm=norm, **kwargs
    ).generate_masks()


def compute_random_mask(model: nn.Module, sparsity: SparsitySpec, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """Seeded random masks with exactly ``round(sparsity·n)`` pruned per group (a baseline)."""
    return MaskGenerator(model, sparsity, "random", seed=seed, **kwargs).generate_masks()


def compute_nm_mask(
    model: nn.Module, n: int = 2, m: int = 4, importance_metric: Metric = "magnitude", **kwargs
) -> dict[str, torch.Tensor]:
    """N:M semi-structured masks: in every run of ``m`` consecutive input weights of a row,
    the ``n`` most important are kept (2:4 is what sparse tensor cores run)."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"n={n!r}, m={m!r} must be ints with 0 < n <= m")
    generator = MaskGenerator(model, 0.0, "unstructured", importance_metric, **kwargs)
    scores = generator._scores()
    masks = {}
    for t in generator.targets:
        score = (t.weight.detach().abs() if scores is None else scores[t.name]).movedim(t.out_dim, 0)
        if score.numel() % m or score[0].numel() % m:
            raise ValueError(f"{t.name}: input size {score[0].numel()} is not a multiple of m={m}")
        runs = score.reshape(-1, m).float()
        # stable sort keeps the lower index first among equal scores, as everywhere else
        order = torch.sort(runs, dim=1, stable=True).indices
        keep = torch.ones_like(runs, dtype=torch.bool)
        keep.scatter_(1, order[:, : m - n], False)
        masks[t.name] = keep.reshape(score.shape).movedim(0, t.out_dim).contiguous()
    return masks


def compute_masks_for_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    sparsity: SparsitySpec,
    method: str = "unstructured",
    importance_metric: str = "magnitude",
    *,
    global_pruning: bool = False,
    include: Globs = None,
    exclude: Globs = None,
    seed: int = 0,
    structured_norm: str = "l2",
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Masks straight from a state dict, without building the model.

    ``state_dict`` may also be a path: use
    :func:`sparselora.pruning.streaming.compute_checkpoint_masks` for checkpoints on disk.
    Targets are floating ``*weight`` tensors with at least 2 dims whose names do not mark
    them as embeddings, norms or the LM head. Only data-free metrics apply here
    (``"magnitude"``; ``method="random"``).
    """
    _check_choice(method, "method", METHODS)
    _check_choice(importance_metric, "importance_metric", ("magnitude",))
    targets = filter_targets(state_dict_targets(state_dict), include, exclude)
    if not targets:
        raise ValueError("state_dict has no prunable weights (floating *weight tensors with >= 2 dims)")
    if method == "unstructured":
        # the streaming engine of checkpoints larger than RAM, fed from memory
        from .checkpoints import StateDictSource
        from .streaming import stream_masks

        masks: dict[str, torch.Tensor] = {}
        stream_masks(StateDictSource(state_dict), sparsity, masks.__setitem__, targets=targets,
                     scope="global" if global_pruning else "layer", progress=progress)
        return masks
    sparsities = resolve_sparsity(sparsity, targets)
    scores = _random_scores(targets, seed) if method == "random" else None
    return masks_from_scores(
        targets,
        sparsities,
        scores,
        global_pruning=global_pruning,
        structured=method == "structured",
        structured_norm=_check_choice(structured_norm, "structured_norm", STRUCTURED_NORMS),
        progress=progress,
    )


def sparsity_schedule(
    final_sparsity: float, num_steps: int, initial_sparsity: float = 0.0, power: float = 3.0
) -> list[float]:
    """Gradual pruning schedule from ``initial_sparsity`` to ``final_sparsity`` in ``num_steps``
    steps, shaped like Zhu & Gupta's cubic ramp (fast at first, slow near the end)."""
    final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
    initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an int >= 1")
    if num_steps == 1:
        return [final_sparsity]
    return [
        final_sparsity + (initial_sparsity - final_sparsity) * (1 - i / (num_steps - 1)) ** power
        for i in range(num_steps)
    ]


def prune_gradually(
    model: nn.Module,
    schedule: Sequence[float],
    train_fn: Callable[[nn.Module, dict[str, torch.Tensor], int], None] | None = None,
    **mask_kwargs,
) -> dict[str, torch.Tensor]:
    """The seed's gradual-pruning loop: for each sparsity in ``schedule``, compute masks,
    zero the pruned weights, call ``train_fn(model, masks, step)``, and re-apply the masks
    (training must not regrow pruned weights). Returns the last masks."""
    from .mask_ops import apply_masks_to_model  # mask_ops does not import this module

    if not schedule:
        raise ValueError("schedule is empty; give at least one sparsity (see sparsity_schedule)")
    masks: dict[str, torch.Tensor] = {}
    for step, sparsity in enumerate(schedule):
        masks = compute_unstructured_mask(model, sparsity, **mask_kwargs)
        apply_masks_to_model(model, masks)
        if train_fn is not None:
            train_fn(model, masks, step)
            apply_masks_to_model(model, masks)
    return masks
