"""Importance scores: how much each weight matters. Higher = kept longer.

Every function returns a tensor shaped like the weight it scores. Scores never carry
autograd history.

Data-driven scores come with a calibration helper that streams batches through the model:

* Wanda (Sun et al., 2023): ``|W_ij| · ‖X_j‖₂``, the input-feature norms gathered by
  :func:`collect_activation_norms` (forward hooks; only a running sum of squares per
  feature is kept, never the activations).
* Taylor over several batches: :func:`collect_taylor_importance` averages the per-batch
  first-order saliency ``|W ⊙ ∂L_b/∂W|`` (see there for why not ``|W ⊙ Σ_b ∂L_b/∂W|``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..progress import bar_disabled
from .targets import is_hf_conv1d, model_targets

__all__ = [
    "magnitude_importance",
    "taylor_importance",
    "wanda_importance",
    "collect_activation_norms",
    "collect_taylor_importance",
    "compute_layer_importance",
    "IMPORTANCE_METHODS",
    "run_batch",
]

IMPORTANCE_METHODS = ("magnitude", "taylor", "wanda", "custom")
ImportanceFn = Callable[[nn.Module, str], torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def run_batch(model: nn.Module, batch: Any, **options: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple/list, else ``model(batch)``:
    the one reading of a calibration batch. ``options`` are added as keyword arguments (over
    the dict's own keys)."""
    if isinstance(batch, Mapping):
        return model(**{**batch, **options})
    if isinstance(batch, (tuple, list)):
        return model(*batch, **options)
    return model(batch, **options)


def _weight_of(layer: Union[nn.Module, torch.Tensor], fn: str) -> torch.Tensor:
    if isinstance(layer, torch.Tensor):
        return layer
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{fn}: layer {type(layer).__name__} has no weight tensor; pass a module with "
            "`.weight` (Linear, Conv, ...) or a tensor"
        )
    return weight


def magnitude_importance(layer: Union[nn.Module, torch.Tensor]) -> torch.Tensor:
    """``|W|``: the weight's magnitude (no data needed)."""
    return _weight_of(layer, "magnitude_importance").detach().abs()


def taylor_importance(layer: Union[nn.Module, torch.Tensor]) -> torch.Tensor:
    """``|W · ∂L/∂W|``: first-order Taylor estimate of the loss change when a weight is removed.

    Run a backward pass first; raises ValueError when the weight has no gradient.
    """
    weight = _weight_of(layer, "taylor_importance")
    if weight.grad is None:
        raise ValueError(
            "taylor_importance needs gradients: the layer's weight has .grad=None; "
            "run loss.backward() on calibration data before computing Taylor importance"
        )
    return (weight.detach() * weight.grad.detach()).abs()


def wanda_importance(layer: Union[nn.Module, torch.Tensor], activation_norm: torch.Tensor) -> torch.Tensor:
    """Wanda score ``|W_ij| · ‖X_j‖₂``: magnitude weighted by the L2 norm of input feature j.

    ``activation_norm`` has one entry per input feature (see :func:`collect_activation_norms`).
    Works for Linear-shaped weights ``(out, in)``.
    """
    weight = _weight_of(layer, "wanda_importance").detach()
    if weight.dim() != 2:
        raise ValueError(f"wanda_importance takes a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    norm = torch.as_tensor(activation_norm, device=weight.device).reshape(-1)
    if norm.numel() != weight.shape[1]:
        raise ValueError(
            f"activation_norm has {norm.numel()} entries; the weight has {weight.shape[1]} input features"
        )
    return weight.abs().float() * norm.float().unsqueeze(0)


@torch.no_grad()
def collect_activation_norms(
    model: nn.Module,
    batches: Iterable,
    module_names: Iterable[str] | None = None,
    *,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Run calibration ``batches`` through ``model`` and return, per Linear module name, the
    L2 norm of each input feature over every calibration token (Wanda's ``‖X_j‖₂``).

    Forward hooks on the Linear layers (and transformers' ``Conv1D``) add each batch's
    per-feature sum of squares to a running fp32 total, so memory is one vector per layer
    whatever the number of batches. The model runs in eval mode (restored afterwards).
    A batch is passed as ``model(**batch)`` when it is a dict, ``model(*batch)`` when a
    tuple/list, else ``model(batch)``. ``module_names`` limits the hooked layers; a name
    that is not a Linear module of ``model`` is an error. ``progress`` shows a bar over
    the batches (None: only on a terminal).
    """
    linear = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or is_hf_conv1d(module)
    }
    if module_names is not None:
        module_names = list(module_names)
        unknown = [n for n in module_names if n not in linear]
        if unknown:
            sample = ", ".join(list(linear)[:3]) or "none"
            raise ValueError(
                f"module_names {unknown} are not Linear modules of the model (Linear modules: {sample}, ...)"
            )
        linear = {n: linear[n] for n in module_names}
    if not linear:
        raise ValueError("collect_activation_norms found no Linear module to calibrate")
    sums: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sq = (x * x).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq

        return hook

    hooks = [module.register_forward_hook(make_hook(name)) for name, module in linear.items()]
    was_training = model.training
    model.eval()
    try:
        count = 0
        for batch in tqdm(batches, desc="activation norms", unit="batch", disable=bar_disabled(progress)):
            count += 1
            run_batch(model, batch)
        if count == 0:
            raise ValueError("batches is empty; give at least one calibration batch")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: s.sqrt() for name, s in sums.items()}


def collect_taylor_importance(
    model: nn.Module,
    batches: Iterable,
    loss_fn: LossFn,
    *,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance of every prunable weight, accumulated over ``batches``.

    For each batch ``b`` the loss ``L_b = loss_fn(model, b)`` (a scalar tensor) is
    differentiated with respect to the target weights, and the score is the mean over
    batches of ``|W ⊙ ∂L_b/∂W|``: the estimated loss change of removing each weight, per
    batch, averaged. The absolute value is taken per batch, before averaging, so that a
    weight whose gradient changes sign between batches still scores as important (summing
    the gradients first would let them cancel).

    Gradients are taken with :func:`torch.autograd.grad`, so ``.grad`` fields are left
    untouched; weights that do not require grad are enabled for the call and restored.
    The model runs in whatever mode it is in (call ``model.eval()`` to turn dropout off).
    Returns ``{parameter name: fp32 score}`` for the default targets (as
    :func:`compute_layer_importance`), ready for the mask generator.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} must be a callable (model, batch) -> scalar loss tensor")
    targets = model_targets(model)
    if not targets:
        raise ValueError("the model has no prunable weights (Linear/Conv) to score")
    weights = [t.weight for t in targets]
    frozen = [w for w in weights if not w.requires_grad]
    totals = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    count = 0
    try:
        for w in frozen:
            w.requires_grad_(True)
        for batch in tqdm(batches, desc="taylor importance", unit="batch", disable=bar_disabled(progress)):
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(
                    f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}"
                )
            if not bool(torch.isfinite(loss)):
                raise ValueError(f"loss_fn returned a non-finite loss ({float(loss)}) on batch {count}")
            # allow_unused: a weight the loss does not reach scores 0 for this batch
            grads = torch.autograd.grad(loss.reshape(()), weights, allow_unused=True)
            with torch.no_grad():
                for total, w, g in zip(totals, weights, grads):
                    if g is not None:
                        total.add_((w.detach().float() * g.float()).abs())
            count += 1
    finally:
        for w in frozen:
            w.requires_grad_(False)
    if count == 0:
        raise ValueError("batches is empty; give at least one calibration batch")
    return {t.name: total.div_(count) for t, total in zip(targets, totals)}


def compute_layer_importance(
    model: nn.Module,
    method: Union[str, ImportanceFn] = "magnitude",
    custom_fn: ImportanceFn | None = None,
    activation_norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Importance of every prunable weight of ``model``, keyed by parameter name.

    ``method`` is ``"magnitude"``, ``"taylor"``, ``"wanda"`` (needs ``activation_norms``),
    a callable ``(module, name) -> Tensor``, or ``"custom"`` with ``custom_fn``; ``"custom"``
    without a function falls back to magnitude with a warning.
    """
    if callable(method):
        custom_fn, method = method, "custom"
    if method not in IMPORTANCE_METHODS:
        raise ValueError(
            f"method={method!r} is unknown; accepted: {', '.join(IMPORTANCE_METHODS)} or a callable"
        )
    if method == "custom" and custom_fn is None:
        warnings.warn(
            "compute_layer_importance(method='custom') got no custom_fn; falling back to magnitude",
            UserWarning,
            stacklevel=2,
        )
        method = "magnitude"
    if method == "wanda" and activation_norms is None:
        raise ValueError("method='wanda' needs activation_norms (see collect_activation_norms)")

    modules = dict(model.named_modules())
    scores: dict[str, torch.Tensor] = {}
    for target in model_targets(model):
        module = modules[target.module_name]
        # a fused-experts weight is no module's .weight: its scores come from the tensor itself
        layer = target.weight if target.experts else module
        if method == "magnitude":
            score = magnitude_importance(layer)
        elif method == "taylor":
            score = taylor_importance(layer)
        elif method == "wanda" and target.experts:
            raise ValueError(
                f"{target.name!r} holds the experts of a mixture-of-experts block; Wanda needs each expert's "
                "routed inputs, which collect_activation_norms does not gather: prune with prune_model, score "
                "by magnitude, or leave the experts out (exclude=['*experts*'])"
            )
        elif method == "wanda":
            if target.module_name not in activation_norms:
                raise ValueError(f"activation_norms has no entry for module {target.module_name!r}")
            norm = activation_norms[target.module_name]
            if target.out_dim == 1:  # transformers' Conv1D keeps (in, out)
                score = wanda_importance(module.weight.t(), norm).t()
            else:
                score = wanda_importance(module, norm)
        else:
            score = custom_fn(module, target.module_name)
            if not isinstance(score, torch.Tensor) or tuple(score.shape) != tuple(target.weight.shape):
                raise ValueError(
                    f"custom importance for {target.module_name!r} must return a tensor of shape "
                    f"{tuple(target.weight.shape)}, got {getattr(score, 'shape', type(score).__name__)}"
                )
            score = score.detach()
        if score.numel() and not bool(torch.isfinite(score).all()):
            raise ValueError(
                f"importance method={method!r} gave NaN or inf scores for {target.name!r}; "
                "scores must be finite"
            )
        scores[target.name] = score
    return scores
