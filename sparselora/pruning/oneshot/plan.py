"""The one-shot plan and the table of per-method rules.

A method is one entry of the table, a :class:`MethodRule`: what it gathers from each pruned
weight's calibration inputs (nothing, the input-feature norms, or the full Hessian), how it
scores the weights and how it updates them (zero the weights a score mask drops, or
SparseGPT's reconstruction of the weights it keeps), which comparison groups (scopes) it
takes, and so whether it needs calibration data. The engine (:mod:`.engine`) reads only the
table; a new method is one :func:`register_method` call with its functions:

* ``magnitude``: gathers nothing; scores ``|W|``; :func:`mask_and_zero`; scopes layer (default), row.
* ``wanda``: gathers the feature norms; scores ``|W_ij|·‖X_j‖₂``; :func:`mask_and_zero`; scopes
  row (default, as in its paper), layer.
* ``sparsegpt``: gathers the Hessian; scores inside its update (``w²/[H⁻¹]²_jj``, which changes
  as the kept weights are rebuilt); :func:`obs_update`; no scope (column blocks of its own).

:class:`PruningPlan` states what to do to every decoder block and refuses what the table
does not accept; :func:`make_plan` builds it from the arguments of
:func:`~sparselora.pruning.oneshot.model.prune_model`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ... import ops
from ...rules import check_bool, check_choice, check_nm, check_positive_int, check_sparsity
from .owl import OWL_LAMBDA, OWL_THRESHOLD, check_lambda, check_threshold
from .reconstruct import Reconstruction, as_reconstruction
from .sparsegpt import GramAccumulator, check_damp, sparsegpt_prune_

__all__ = [
    "Gathers",
    "WeightToPrune",
    "MethodRule",
    "PruningPlan",
    "make_plan",
    "magnitude_update",
    "register_method",
    "unregister_method",
    "method_rule",
    "method_names",
    "magnitude_score",
    "wanda_score",
    "mask_and_zero",
    "obs_update",
]

Globs = Union[str, Sequence[str], None]


class Gathers(enum.Enum):
    """What a method needs from the calibration inputs ``X`` of each weight it prunes."""

    NOTHING = "nothing"  # data-free: no statistics pass over the block
    FEATURE_NORMS = "feature norms"  # ‖X_j‖₂ per input feature (the diagonal of XᵀX)
    HESSIAN = "hessian"  # the full XᵀX, SparseGPT's H = 2XXᵀ up to scale

    @property
    def full(self) -> bool:
        """Whether the whole ``XᵀX`` is kept, not only its diagonal."""
        return self is Gathers.HESSIAN


@dataclass
class WeightToPrune:
    """One weight handed to a method's update: pruned in place, its keep-mask returned."""

    name: str  # the parameter's name (for messages)
    weight: torch.Tensor  # the parameter's data, in its own layout
    out_dim: int  # 0: (out, in) as nn.Linear; 1: (in, out) as transformers' Conv1D
    stats: Optional[GramAccumulator]  # what the method gathered (None when it gathers nothing)
    sparsity: Optional[float]  # this block's sparsity (None with N:M)
    plan: "PruningPlan"

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as an ``(out, in)`` view: rows are output features."""
        return self.weight.t() if self.out_dim == 1 else self.weight

    def in_layout(self, keep: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` keep-mask in the weight's own layout."""
        return keep.t().contiguous() if self.out_dim == 1 else keep


ScoreFn = Callable[[torch.Tensor, Optional[GramAccumulator]], torch.Tensor]
UpdateFn = Callable[[WeightToPrune, Optional[ScoreFn]], torch.Tensor]


@dataclass(frozen=True)
class MethodRule:
    """How one one-shot method prunes a weight: one entry of the method table.

    ``score(matrix, stats)`` gives a fresh float32 ``(out, in)`` score of an ``(out, in)``
    weight view (higher is kept; it may be modified by the caller), or is None where the
    update chooses its own mask. ``update(weight, score)`` prunes a :class:`WeightToPrune`
    in place and returns its keep-mask in the weight's layout. ``scopes`` are the comparison
    groups the method takes (``"layer"``, ``"row"``; empty: it chooses its own) and
    ``default_scope`` the one used when none is given.
    """

    gathers: Gathers
    score: Optional[ScoreFn]
    update: UpdateFn
    scopes: tuple[str, ...] = ()
    default_scope: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.gathers, Gathers):
            raise TypeError(f"gathers={self.gathers!r} must be a Gathers member")
        if not callable(self.update) or (self.score is not None and not callable(self.score)):
            raise TypeError("update must be callable, and score callable or None")
        for scope in self.scopes:
            check_choice(scope, "scopes", _SCOPES)
        if self.scopes:
            check_choice(self.default_scope, "default_scope", self.scopes)
        elif self.default_scope is not None:
            raise ValueError(f"default_scope={self.default_scope!r} without scopes; a method without scopes "
                             "chooses its own groups")

    @property
    def needs_data(self) -> bool:
        """Whether the method reads calibration inputs."""
        return self.gathers is not Gathers.NOTHING


_SCOPES = ("layer", "row")


# ---------------------------------------------------------------- the built-in scores and updates


def magnitude_score(matrix: torch.Tensor, _stats: Optional[GramAccumulator]) -> torch.Tensor:
    """``|W|`` in one fresh fp32 buffer, built in place."""
    score = matrix.float() if matrix.dtype != torch.float32 else matrix.clone()
    return score.abs_()


def wanda_score(matrix: torch.Tensor, stats: Optional[GramAccumulator]) -> torch.Tensor:
    """Wanda's ``|W_ij|·‖X_j‖₂`` (also OWL's outlier scores), in one fresh fp32 buffer."""
    return magnitude_score(matrix, stats).mul_(stats.feature_norms().to(matrix.device).unsqueeze(0))


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


def _keep_and_zero(weight: WeightToPrune, values: torch.Tensor, scope: str) -> torch.Tensor:
    """Keep the top ``values`` (N:M, or per row / per layer), zero the other weights, return the
    keep-mask in the weight's layout."""
    if weight.plan.nm:
        keep = _nm_mask(values, *weight.plan.nm, name=weight.name)
    else:
        keep = _row_or_layer_mask(values, weight.sparsity, scope)
    del values
    keep = weight.in_layout(keep)
    ops.apply_mask_(weight.weight, keep)
    return keep


def mask_and_zero(weight: WeightToPrune, score: Optional[ScoreFn]) -> torch.Tensor:
    """The update of score-mask methods: keep the top scores (N:M, per row or per layer, as
    the plan says) and zero the other weights; the kept ones are left as they are."""
    if score is None:
        raise ValueError(f"{weight.plan.method}: mask_and_zero needs a score function")
    return _keep_and_zero(weight, score(weight.matrix, weight.stats), weight.plan.scope)


def magnitude_update(weight: WeightToPrune) -> torch.Tensor:
    """Prune ``weight`` by magnitude under the plan's pattern (N:M, or its scope; per layer for a
    method without scopes): for a weight the calibration data never reached (an expert no
    calibration token was routed to)."""
    return _keep_and_zero(weight, magnitude_score(weight.matrix, None), weight.plan.scope or "layer")


def obs_update(weight: WeightToPrune, _score: Optional[ScoreFn]) -> torch.Tensor:
    """SparseGPT's update: it chooses the mask column block by column block from its own
    scores and rebuilds the kept weights (:func:`~.sparsegpt.sparsegpt_prune_`)."""
    matrix = weight.matrix
    work = matrix.contiguous()
    n, m = weight.plan.nm if weight.plan.nm else (None, None)
    keep = sparsegpt_prune_(work, weight.stats.hessian(), weight.sparsity, n=n, m=m,
                            block_size=weight.plan.block_size, damp=weight.plan.damp)
    matrix.copy_(work)
    return weight.in_layout(keep)


# ---------------------------------------------------------------- the table

_BUILT_IN = {
    "magnitude": MethodRule(Gathers.NOTHING, magnitude_score, mask_and_zero, scopes=("layer", "row"),
                            default_scope="layer"),
    # rows by default, as in the Wanda paper
    "wanda": MethodRule(Gathers.FEATURE_NORMS, wanda_score, mask_and_zero, scopes=("layer", "row"),
                        default_scope="row"),
    # groups of its own: column blocks of block_size, runs of m columns for N:M
    "sparsegpt": MethodRule(Gathers.HESSIAN, None, obs_update),
}
_METHODS: dict[str, MethodRule] = dict(_BUILT_IN)


def method_names() -> tuple[str, ...]:
    """The names of the one-shot methods, built-in first, then those registered."""
    return tuple(_METHODS)


def method_rule(method: object, arg: str = "method") -> MethodRule:
    """The table entry of ``method`` (an unknown name is refused with the accepted ones)."""
    return _METHODS[check_choice(method, arg, method_names())]


def register_method(name: str, rule: MethodRule) -> None:
    """Add a one-shot method to the table; ``prune_model`` and ``prune_checkpoint`` then take
    ``method=name``. Under ``torch.distributed`` every rank registers it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a non-empty string")
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already in the table; unregister it first")
    if not isinstance(rule, MethodRule):
        raise TypeError(f"rule must be a MethodRule, got {type(rule).__name__}")
    _METHODS[name] = rule


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (the built-in ones stay)."""
    if name in _BUILT_IN:
        raise ValueError(f"method {name!r} is built in; it stays in the table")
    check_choice(name, "name", tuple(n for n in _METHODS if n not in _BUILT_IN))
    del _METHODS[name]


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PruningPlan:
    """What to do to each decoder block.

    ``method`` names a table entry. ``sparsity`` is the fraction pruned from every weight
    (the mean over blocks with ``owl=True``), or ``nm = (n, m)`` keeps ``n`` in every run of
    ``m`` input weights: exactly one of the two. ``scope`` is the comparison group of the
    score-mask methods (``"row"`` or ``"layer"``; None: the method's default); a method
    without scopes (SparseGPT) takes none. ``owl`` spreads the sparsity over the blocks
    from their outlier ratios (OWL: ``owl_threshold`` is the paper's M, ``owl_lambda`` the
    spread λ). ``block_size`` and ``damp`` are SparseGPT's column block and dampening.
    ``include`` / ``exclude``: globs over parameter or module names narrowing the weights.
    ``reconstruct``: after each block is pruned, train its kept weights back towards the
    dense block's outputs (True, a :class:`~.reconstruct.Reconstruction` or a dict of its
    fields; None or False: off). ``all_experts``: in mixture-of-experts blocks, gather every
    expert's statistics on every calibration token, not only on those routed to it (each
    block's expert statistics then cost experts / top-k times more; the block's own outputs
    are unchanged).
    """

    method: str
    sparsity: Optional[float] = None
    nm: Optional[tuple[int, int]] = None
    scope: Optional[str] = None
    owl: bool = False
    owl_threshold: float = OWL_THRESHOLD
    owl_lambda: float = OWL_LAMBDA
    block_size: int = 128
    damp: float = 0.01
    include: Globs = None
    exclude: Globs = None
    reconstruct: Union[Reconstruction, bool, dict, None] = None
    all_experts: bool = False

    def __post_init__(self) -> None:
        rule = method_rule(self.method)
        object.__setattr__(self, "reconstruct", as_reconstruction(self.reconstruct))
        if (self.sparsity is None) == (self.nm is None):
            raise ValueError("give exactly one of sparsity= and nm=(n, m)")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        check_bool(self.owl, "owl")
        check_bool(self.all_experts, "all_experts")
        if self.nm is not None:
            if not isinstance(self.nm, (tuple, list)) or len(self.nm) != 2:
                raise TypeError(f"nm={self.nm!r} must be a pair (n, m), e.g. (2, 4)")
            object.__setattr__(self, "nm", check_nm(*self.nm, arg="nm"))
            if self.owl:
                raise ValueError("owl=True allocates unstructured sparsity per block; it does not apply to nm=")
        check_threshold(self.owl_threshold, "owl_threshold")
        check_lambda(self.owl_lambda, "owl_lambda")
        check_positive_int(self.block_size, "block_size")
        check_damp(self.damp)
        if rule.scopes:
            scope = rule.default_scope if self.scope is None else self.scope
            object.__setattr__(self, "scope", check_choice(scope, "scope", rule.scopes))
        elif self.scope is not None:
            scoped = [name for name in method_names() if _METHODS[name].scopes]
            raise ValueError(f"method={self.method!r} chooses its own groups and takes no scope=; scope= is for "
                             f"{', '.join(scoped)}")

    @property
    def rule(self) -> MethodRule:
        """The method's entry in the table."""
        return method_rule(self.method)

    @property
    def needs_data(self) -> bool:
        """Whether calibration batches are needed (by the method, by OWL's outlier ratios or by
        the reconstruction)."""
        return self.rule.needs_data or self.owl or self.reconstruct is not None


_PLAN_OPTIONS = frozenset(f.name for f in fields(PruningPlan)) - {"method", "sparsity"}


def make_plan(method: str, sparsity: Optional[float], *, nm: Optional[tuple[int, int]] = None,
              **options: Any) -> PruningPlan:
    """The plan of a one-shot call's arguments: ``nm`` replaces ``sparsity`` (whose default is
    then dropped); ``options`` are the other fields of :class:`PruningPlan`."""
    unknown = sorted(set(options) - _PLAN_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected keyword argument {', '.join(map(repr, unknown))}; the plan takes "
                        f"{', '.join(sorted(_PLAN_OPTIONS))}")
    return PruningPlan(method=method, sparsity=None if nm is not None else sparsity, nm=nm, **options)
