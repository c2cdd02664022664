"""Pruning masks: unstructured (global, per layer or per output row), structured, random
and N:M; gradual pruning schedules.

A mask is a ``torch.bool`` tensor shaped like its weight, ``True`` = kept, keyed by the
parameter's full name. A comparison group of ``n`` weights loses exactly
``round(sparsity * n)``; ties at the cut go lowest flat index first, weights in model order.
The comparison group is set by ``scope``: every target weight together (``"global"``),
each weight tensor (``"layer"``, the default), or each output row of each weight
(``"row"``: the group Wanda compares within).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import ops
from ..rules import check_bool, check_choice, check_int, check_nm, check_number, check_positive_int, is_int
from ..progress import bar_disabled
from . import importance as imp
from .targets import (
    SparsitySpec,
    Target,
    check_sparsity,
    expert_slice_name,
    filter_targets,
    join_experts,
    model_targets,
    normalise_mask_keys,
    resolve_sparsity,
    split_experts,
    state_dict_targets,
    warn_overpruned,
)
from ..io.mask_files import as_bool_mask

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
    "SCOPES",
]

METHODS = ("unstructured", "structured", "random")
METRICS = ("magnitude", "taylor", "wanda")
SCOPES = ("layer", "global", "row")
STRUCTURED_NORMS = ("l1", "l2")
Metric = Union[str, Callable[[nn.Module, str], torch.Tensor]]
Globs = Union[str, Sequence[str], None]


def _channel_scores(score: torch.Tensor, out_dim: int, norm: str) -> torch.Tensor:
    rows = score.detach().movedim(out_dim, 0).reshape(score.shape[out_dim], -1).float()
    p = 1 if norm == "l1" else 2
    return torch.linalg.vector_norm(rows, ord=p, dim=1)


def _expand_channels(channel_mask: torch.Tensor, shape: torch.Size, out_dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[out_dim] = shape[out_dim]
    return channel_mask.view(view).expand(shape).contiguous()


def _resolve_scope(scope: str | None, global_pruning: bool) -> str:
    """``scope`` if given (it must agree with ``global_pruning``), else what the flag says."""
    check_bool(global_pruning, "global_pruning")
    if scope is None:
        return "global" if global_pruning else "layer"
    check_choice(scope, "scope", SCOPES)
    if global_pruning and scope != "global":
        raise ValueError(f"global_pruning=True contradicts scope={scope!r}; give only scope=")
    return scope


def _prior_keep(
    previous_masks: Mapping[str, torch.Tensor] | None, targets: Sequence[Target], chosen: Sequence[Target]
) -> dict[str, torch.Tensor]:
    """Previous keep-masks of the ``chosen`` targets, as bool tensors on their weights' devices."""
    if previous_masks is None:
        return {}
    resolved = normalise_mask_keys(previous_masks, {t.name: t.weight for t in targets}, "previous_masks")
    chosen_names = {t.name: t for t in chosen}
    prior: dict[str, torch.Tensor] = {}
    for name, raw in resolved.items():
        mask = as_bool_mask(raw, f"previous_masks[{name!r}]")
        if name not in chosen_names:
            if not bool(mask.all()):
                raise ValueError(
                    f"previous_masks prunes weights of {name!r}, which this sparsity leaves dense; "
                    "those weights would grow back"
                )
            continue
        prior[name] = mask.to(chosen_names[name].weight.device)
    return prior


def _select_within(
    group: Sequence[torch.Tensor],
    priors: Sequence[torch.Tensor | None],
    k: int,
    absolute: bool,
    label: str,
) -> list[torch.Tensor]:
    """Keep-masks of a group losing exactly ``k``, where weights pruned by ``priors`` stay
    pruned: they count towards ``k`` and the rest is chosen among the weights still kept."""
    already = sum(int((~p).sum()) for p in priors if p is not None)
    if already > k:
        raise ValueError(
            f"previous_masks already prune {already} weights of {label}, more than the {k} this "
            "sparsity prunes; a smaller mask would regrow pruned weights"
        )
    alive = [s.reshape(-1) if p is None else s.reshape(-1)[p.reshape(-1)] for s, p in zip(group, priors)]
    # the alive weights keep their flat order, so ties still go lowest flat index first
    kept = ops.select_prune_mask(alive, k - already, absolute=absolute)
    masks = []
    for score, prior, keep in zip(group, priors, kept):
        if prior is None:
            masks.append(keep.view(score.shape))
            continue
        full = prior.reshape(-1).clone()
        full[prior.reshape(-1)] = keep
        masks.append(full.view(score.shape))
    return masks


def _row_mask(
    score: torch.Tensor,
    out_dim: int,
    sparsity: float,
    prior: torch.Tensor | None,
    absolute: bool,
    name: str,
) -> torch.Tensor:
    """Keep-mask pruning exactly ``round(sparsity · row length)`` in every output row.

    A row is every weight sharing one output index (a Linear row, a Conv filter). Ties go
    lowest flat index first (stable sort); weights pruned by ``prior`` are pruned first.
    """
    rows = score.detach().movedim(out_dim, 0)
    shape = rows.shape
    rows = rows.reshape(shape[0], -1)
    n_out, n_in = rows.shape
    k = ops.prune_count(n_in, sparsity)
    if rows.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        rows = rows.float()  # e.g. integer scores of a custom metric: compared as before
    prior_rows = None
    if prior is not None:
        prior_rows = prior.movedim(out_dim, 0).reshape(n_out, n_in)
        already = (~prior_rows).sum(1)
        worst = int(already.argmax()) if n_out else 0
        if n_out and int(already[worst]) > k:
            raise ValueError(
                f"previous_masks already prune {int(already[worst])} weights of row {worst} of {name!r}, "
                f"more than the {k} per row this sparsity prunes; a smaller mask would regrow pruned weights"
            )
    try:
        keep = ops.row_prune_mask(rows, k, absolute=absolute, prior=prior_rows)
    except ValueError:
        # the op's message lacks the tensor's name: count again only on this error path
        bad = ~torch.isfinite(rows)
        if prior_rows is not None:
            bad &= prior_rows
        if bool(bad.any()):
            raise ValueError(
                f"scores of {name!r} contain {int(bad.sum())} NaN or inf values; scores must be finite"
            ) from None
        raise
    return keep.reshape(shape).movedim(0, out_dim).contiguous()


def _per_slice(targets: Sequence[Target], values: Mapping[str, Any] | None, index: bool) -> dict[str, Any] | None:
    """``values`` keyed by the names of :func:`split_experts`: a fused-experts target's entry
    is indexed per expert (``index``: tensors) or repeated (a sparsity)."""
    if values is None:
        return None
    out = dict(values)
    for t in targets:
        if t.experts and t.name in values:
            value = out.pop(t.name)
            for e in range(t.experts):
                out[expert_slice_name(t.name, e)] = value[e] if index else value
    return out


def masks_from_scores(
    targets: Sequence[Target],
    sparsities: Mapping[str, float],
    scores: Mapping[str, torch.Tensor] | None = None,
    *,
    global_pruning: bool = False,
    scope: str | None = None,
    structured: bool = False,
    structured_norm: str = "l2",
    previous_masks: Mapping[str, torch.Tensor] | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Masks for ``targets`` from their ``scores`` (magnitude of the weights when None).

    Each target in ``sparsities`` is pruned. ``scope`` sets the comparison groups:
    ``"layer"`` (each target alone), ``"global"`` (all together, one threshold; they must
    share one sparsity) or ``"row"`` (each output row of each target); when None,
    ``global_pruning`` picks ``"global"`` or ``"layer"``. ``structured`` ranks whole output
    channels by the L1/L2 norm of their scores (not with ``scope="row"``).
    ``previous_masks``: weights they prune stay pruned and count towards each group's
    exact ``round(s·n)`` (unstructured only). A fused-experts weight (a mixture-of-experts
    block's ``mlp.experts.gate_up_proj``) is one matrix per expert: each is its own group
    under ``"layer"``, its rows are that expert's rows under ``"row"``; its mask has the
    weight's 3-D shape.
    """
    whole = list(targets)  # fused experts are pruned as one matrix per expert, then stacked back
    targets = split_experts(whole)
    sparsities = _per_slice(whole, sparsities, index=False)
    scores = _per_slice(whole, scores, index=True)
    previous_masks = _per_slice(whole, previous_masks, index=True)
    scope = _resolve_scope(scope, global_pruning)
    if structured and scope == "row":
        raise ValueError("scope='row' ranks weights within each output row; structured masks remove whole "
                         "rows: use scope='layer' or 'global'")
    if structured and previous_masks is not None:
        raise ValueError("previous_masks works with unstructured and random masks, not structured=True")
    chosen = [t for t in targets if t.name in sparsities]
    absolute = scores is None  # magnitude: read |w| straight from the weight
    prior = _prior_keep(previous_masks, targets, chosen)

    def score_of(t: Target) -> torch.Tensor:
        s = t.weight.detach() if scores is None else scores[t.name]
        return _channel_scores(s, t.out_dim, structured_norm) if structured else s

    def finish(t: Target, mask: torch.Tensor) -> torch.Tensor:
        return _expand_channels(mask, t.weight.shape, t.out_dim) if structured else mask

    masks: dict[str, torch.Tensor] = {}
    if scope == "global" and chosen:
        values = {sparsities[t.name] for t in chosen}
        if len(values) != 1:
            raise ValueError("global_pruning=True needs one sparsity for every weight; got a per-layer mapping")
        group = [score_of(t) for t in chosen]
        k = ops.prune_count(sum(g.numel() for g in group), values.pop())
        if prior:
            group_masks = _select_within(group, [prior.get(t.name) for t in chosen], k, absolute, "the global group")
            pruned = [int(m.numel() - m.count_nonzero()) for m in group_masks]
        else:
            # one fused call: the compiled backends read every weight once, and count each
            # mask's pruned weights in that pass (the warning below needs no second read)
            counts = torch.empty(len(group), dtype=torch.int64, device=group[0].device)
            group_masks = ops.select_prune_mask(group, k, absolute=absolute, pruned=counts)
            pruned = counts.tolist()
        if structured:  # counts of channels: each stands for its whole slice of the weight
            pruned = [p * (t.weight.numel() // max(g.numel(), 1)) for p, t, g in zip(pruned, chosen, group)]
        for t, mask in zip(chosen, group_masks):
            masks[t.name] = finish(t, mask)
        warn_overpruned(dict(zip(masks, pruned)), {n: m.numel() for n, m in masks.items()})
        return join_experts(whole, masks)
    for t in tqdm(chosen, desc="masks", unit="tensor", disable=bar_disabled(progress)):
        g = score_of(t)
        if scope == "row":
            mask = _row_mask(g, t.out_dim, sparsities[t.name], prior.get(t.name), absolute, t.name)
        elif t.name in prior:
            k = ops.prune_count(g.numel(), sparsities[t.name])
            (mask,) = _select_within([g], [prior[t.name]], k, absolute, repr(t.name))
        else:
            (mask,) = ops.select_prune_mask([g], ops.prune_count(g.numel(), sparsities[t.name]), absolute=absolute)
        masks[t.name] = finish(t, mask)
    return join_experts(whole, masks)


def _random_scores(targets: Sequence[Target], seed: int) -> dict[str, torch.Tensor]:
    # the range torch.Generator.manual_seed accepts
    check_int(seed, "seed", minimum=-(2**63), maximum=2**64 - 1)
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
        global_pruning: rank all targets together (one threshold) instead of per layer;
            the same as ``scope="global"``.
        scope: the comparison group losing exactly ``round(s·n)``: ``"layer"`` (each
            weight tensor, the default), ``"global"`` (all targets, one threshold) or
            ``"row"`` (each output row of each weight, or output channel of a Conv: the
            group Wanda compares within). ``"row"`` is for unstructured and random masks.
        structured_norm: ``"l1"`` or ``"l2"`` norm ranking channels in structured mode.
        include / exclude: globs over parameter or module names narrowing the targets.
        seed: seed of the random method.
        calibration_data: iterable of batches for ``"wanda"``, or for ``"taylor"`` with
            ``loss_fn``.
        activation_norms: precomputed input-feature norms for ``"wanda"``.
        loss_fn: ``(model, batch) -> scalar loss``; with ``importance_metric="taylor"`` the
            scores are accumulated over ``calibration_data`` by
            :func:`~sparselora.pruning.importance.collect_taylor_importance` (mean of the
            per-batch ``|W ⊙ ∂L_b/∂W|``) instead of read from the current ``.grad``.
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
        scope: str | None = None,
        structured_norm: str = "l2",
        include: Globs = None,
        exclude: Globs = None,
        seed: int = 0,
        calibration_data: Iterable | None = None,
        activation_norms: Mapping[str, torch.Tensor] | None = None,
        loss_fn: imp.LossFn | None = None,
        progress: bool | None = None,
    ) -> None:
        self.model = model
        self.method = check_choice(method, "method", METHODS)
        if not callable(importance_metric):
            check_choice(importance_metric, "importance_metric", METRICS)
        self.importance_metric = importance_metric
        self.structured_norm = check_choice(structured_norm, "structured_norm", STRUCTURED_NORMS)
        self.scope = _resolve_scope(scope, global_pruning)
        if self.scope == "row" and self.method == "structured":
            raise ValueError("scope='row' works with method='unstructured' or 'random'; structured masks "
                             "remove whole rows (use scope='layer' or 'global')")
        self.global_pruning = self.scope == "global"
        self.targets = filter_targets(model_targets(model), include, exclude)
        if not self.targets:
            raise ValueError("the model has no prunable weights (Linear/Conv) after include/exclude")
        self.sparsities = resolve_sparsity(sparsity, self.targets)
        self.seed = seed
        self.calibration_data = calibration_data
        self.activation_norms = activation_norms
        self.loss_fn = loss_fn
        self.progress = progress
        if importance_metric == "wanda" and method != "random" and calibration_data is None and activation_norms is None:
            raise ValueError("importance_metric='wanda' needs calibration_data or activation_norms")
        if loss_fn is not None:
            if not callable(loss_fn):
                raise TypeError(f"loss_fn={loss_fn!r} must be a callable (model, batch) -> scalar loss")
            if importance_metric != "taylor":
                raise ValueError(
                    f"loss_fn is used by importance_metric='taylor' only; got importance_metric={importance_metric!r}"
                )
            if calibration_data is None:
                raise ValueError("loss_fn needs calibration_data= (the batches the loss runs on)")

    def _scores(self) -> dict[str, torch.Tensor] | None:
        if self.method == "random":
            return _random_scores(self.targets, self.seed)
        metric = self.importance_metric
        if metric == "magnitude":
            return None
        if metric == "taylor" and self.loss_fn is not None:
            return imp.collect_taylor_importance(
                self.model, self.calibration_data, self.loss_fn, progress=self.progress
            )
        norms = self.activation_norms
        if metric == "wanda" and norms is None:
            norms = imp.collect_activation_norms(self.model, self.calibration_data, progress=self.progress)
        if callable(metric):
            return imp.compute_layer_importance(self.model, method=metric)
        return imp.compute_layer_importance(self.model, method=metric, activation_norms=norms)

    def generate_masks(self, previous_masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Compute and return ``{parameter name: bool mask}`` for every pruned weight.

        With ``previous_masks``, weights pruned there stay pruned: each group still loses
        exactly ``round(s·n)``, the pruned ones first, the rest chosen by score among the
        weights still kept (unstructured and random methods). A ValueError is raised when
        a group already has more pruned weights than its sparsity allows.
        """
        return masks_from_scores(
            self.targets,
            self.sparsities,
            self._scores(),
            scope=self.scope,
            structured=self.method == "structured",
            structured_norm=self.structured_norm,
            previous_masks=previous_masks,
            progress=self.progress,
        )


def compute_unstructured_mask(
    model: nn.Module,
    sparsity: SparsitySpec,
    importance_metric: Metric = "magnitude",
    global_pruning: bool = False,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Element-wise masks; see :class:`MaskGenerator` for the keyword arguments
    (``scope="row"`` for Wanda's per-output-row groups, ``loss_fn`` for multi-batch Taylor)."""
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
    the ``n`` most important are kept (2:4 is what sparse tensor cores run).

    Ties go lowest index first. Check a mask with
    :func:`~sparselora.pruning.mask_ops.validate_nm_mask`."""
    n, m = check_nm(n, m)
    generator = MaskGenerator(model, 0.0, "unstructured", importance_metric, **kwargs)
    scores = _per_slice(generator.targets, generator._scores(), index=True)
    masks = {}
    for t in split_experts(generator.targets):  # each expert's rows on their own
        # magnitude: |W| read straight from the weight by the op, no copy
        absolute = scores is None
        score = (t.weight.detach() if absolute else scores[t.name]).movedim(t.out_dim, 0)
        if score.numel() % m or score[0].numel() % m:
            raise ValueError(f"{t.name}: input size {score[0].numel()} is not a multiple of m={m}")
        if score.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            score = score.float()  # e.g. integer scores of a custom metric: compared as before
        try:
            keep = ops.nm_prune_mask(score.reshape(score.shape[0], -1), n, m, absolute=absolute)
        except ValueError as exc:
            raise ValueError(f"{t.name}: {exc}") from None
        masks[t.name] = keep.reshape(score.shape).movedim(0, t.out_dim).contiguous()
    return join_experts(generator.targets, masks)


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
    check_choice(method, "method", METHODS)
    check_choice(importance_metric, "importance_metric", ("magnitude",))
    targets = filter_targets(state_dict_targets(state_dict), include, exclude)
    if not targets:
        raise ValueError("state_dict has no prunable weights (floating *weight tensors with >= 2 dims)")
    if method == "unstructured":
        # the streaming engine of checkpoints larger than RAM, fed from memory
        from ..io.checkpoints import StateDictSource
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
        structured_norm=check_choice(structured_norm, "structured_norm", STRUCTURED_NORMS),
        progress=progress,
    )


def sparsity_schedule(
    final_sparsity: float,
    num_steps: int | None = None,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
    *,
    steps: Sequence[int] | None = None,
) -> list[float]:
    """Gradual pruning schedule of Zhu & Gupta (2017), one sparsity per pruning step.

    ``s(t) = s_f + (s_i - s_f) · (1 - (t - t_0) / (t_n - t_0)) ** power``: fast at first,
    slow near the end, exactly ``final_sparsity`` at the last step. Give either
    ``num_steps`` (pruning at evenly spaced steps ``0 .. num_steps - 1``) or ``steps``, the
    training steps at which pruning happens, strictly increasing and possibly uneven
    (``steps=[0, 100, 250, 500]``): the curve is then read at those steps, from
    ``t_0 = steps[0]`` to ``t_n = steps[-1]``. Non-decreasing when
    ``initial_sparsity <= final_sparsity``.
    """
    final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
    initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
    check_number(power, "power", low=0.0, low_open=True)
    if (num_steps is None) == (steps is None):
        raise ValueError("give exactly one of num_steps= (an int >= 1) and steps= (a list of training steps)")
    if num_steps is not None:
        check_positive_int(num_steps, "num_steps")
        points = list(range(num_steps))
    else:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or not steps:
            raise ValueError(f"steps={steps!r} must be a non-empty list of ints")
        if not all(is_int(t) for t in steps):
            raise ValueError(f"steps={list(steps)!r} must hold ints (training step numbers)")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps={list(steps)!r} must be strictly increasing")
        points = list(steps)
    if len(points) == 1:
        return [final_sparsity]
    first, span = points[0], points[-1] - points[0]
    return [
        final_sparsity + (initial_sparsity - final_sparsity) * (1 - (t - first) / span) ** power
        for t in points
    ]


def prune_gradually(
    model: nn.Module,
    schedule: Sequence[SparsitySpec],
    train_fn: Callable[[nn.Module, dict[str, torch.Tensor], int], None] | None = None,
    *,
    allow_regrowth: bool = False,
    **mask_kwargs,
) -> dict[str, torch.Tensor]:
    """The seed's gradual-pruning loop: for each sparsity in ``schedule``, compute masks,
    zero the pruned weights, call ``train_fn(model, masks, step)``, and re-apply the masks
    (training must not regrow pruned weights). Returns the last masks.

    Masks are monotone by default: a weight pruned at one step stays pruned at every later
    step. Each step keeps the previous mask's pruned weights and prunes the rest of its
    exact ``round(s·n)`` count among the weights still kept, by score (so the new mask is
    the old mask AND the new choice, with exact counts). The schedule must then be
    non-decreasing. ``allow_regrowth=True`` computes every step's mask from scratch, so a
    pruned weight may return (from zero). ``mask_kwargs`` go to :class:`MaskGenerator`
    (``importance_metric``, ``scope``, ``calibration_data``, ``loss_fn``, ...).
    """
    from .mask_ops import apply_masks_to_model  # mask_ops does not import this module

    if isinstance(schedule, (str, bytes, Mapping)) or not isinstance(schedule, Sequence):
        raise TypeError(f"schedule must be a list of sparsities (see sparsity_schedule), got {schedule!r}")
    if not schedule:
        raise ValueError("schedule is empty; give at least one sparsity (see sparsity_schedule)")
    check_bool(allow_regrowth, "allow_regrowth")
    if not allow_regrowth:
        for i in range(1, len(schedule)):
            before, after = schedule[i - 1], schedule[i]
            if isinstance(before, (int, float)) and isinstance(after, (int, float)) and after < before:
                raise ValueError(
                    f"schedule[{i}]={after!r} is below schedule[{i - 1}]={before!r}: pruned weights stay "
                    "pruned, so sparsity cannot fall; give a non-decreasing schedule or allow_regrowth=True"
                )
    masks: dict[str, torch.Tensor] = {}
    for step, sparsity in enumerate(schedule):
        generator = MaskGenerator(model, sparsity, "unstructured", **mask_kwargs)
        masks = generator.generate_masks(previous_masks=masks if masks and not allow_regrowth else None)
        apply_masks_to_model(model, masks)
        if train_fn is not None:
            train_fn(model, masks, step)
            apply_masks_to_model(model, masks)
    return masks
