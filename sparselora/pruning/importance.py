"""Importance scores: how much each weight matters. Higher = kept longer.

Every function returns a tensor shaped like the weight it scores. Scores never carry
autograd history.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping, Union

import torch
import torch.nn as nn

from ._targets import _is_hf_conv1d, model_targets

__all__ = [
    "magnitude_importance",
    "taylor_importance",
    "wanda_importance",
    "collect_activation_norms",
    "compute_layer_importance",
    "IMPORTANCE_METHODS",
]

IMPORTANCE_METHODS = ("magnitude", "taylor", "wanda", "custom")
ImportanceFn = Callable[[nn.Module, str], torch.Tensor]


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
    model: nn.Module, batches: Iterable, module_names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Run calibration ``batches`` through ``model`` and return, per Linear module name, the
    L2 norm of each input feature over every calibration token.

    A batch is passed as ``model(**batch)`` when it is a dict, ``model(*batch)`` when a
    tuple/list, else ``model(batch)``.
    """
    wanted = set(module_names) if module_names is not None else None
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sq = (x * x).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq

        return hook

    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or _is_hf_conv1d(module)
        if is_linear and (wanted is None or name in wanted):
            hooks.append(module.register_forward_hook(make_hook(name)))
    if not hooks:
        raise ValueError("collect_activation_norms found no Linear module to calibrate")
    was_training = model.training
    model.eval()
    try:
        count = 0
        for batch in batches:
            count += 1
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
        if count == 0:
            raise ValueError("batches is empty; give at least one calibration batch")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: s.sqrt() for name, s in sums.items()}


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
        if method == "magnitude":
            score = magnitude_importance(module)
        elif method == "taylor":
            score = taylor_importance(module)
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
