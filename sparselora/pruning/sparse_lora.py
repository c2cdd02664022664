"""LoRA fine-tuning that keeps a pruned model sparse.

Two modes:

* ``sparse_to_dense`` — the base weight is masked once and frozen; adapters are dense, so
  the trained function is ``W⊙M + s·BA``. Merging writes ``W + s·BA``, multiplied by the
  mask when ``preserve_sparsity_on_merge`` (which changes the function slightly).
* ``sparse_to_sparse`` — the forward pass uses ``(W + s·BA) ⊙ M``: training sees exactly
  the function merging produces, so merged outputs equal pre-merge outputs and sparsity
  is exact at every step.

Conventions follow PEFT: ``scaling = alpha / r``, ``lora_A`` ``(r, in)`` Kaiming-uniform,
``lora_B`` ``(out, r)`` zeros (a fresh adapter changes nothing), dropout on the adapter input.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ._targets import check_sparsity, normalise_mask_keys
from .mask_ops import apply_masks_to_model, as_bool_mask

__all__ = [
    "SparseLoRAConfig",
    "SparseLoRALinear",
    "apply_sparse_lora",
    "merge_all_lora_weights",
    "validate_sparsity_preserved",
    "SPARSITY_MODES",
]

SPARSITY_MODES = ("sparse_to_dense", "sparse_to_sparse")


@dataclass
class SparseLoRAConfig:
    """Settings of sparse LoRA.

    Args:
        r: adapter rank (> 0).
        alpha: LoRA alpha; the adapter output is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter input, in [0, 1).
        target_modules: module class names (``"Linear"``) or name suffixes (``"q_proj"``).
        sparsity_mode: ``"sparse_to_dense"`` or ``"sparse_to_sparse"``.
        initial_sparsity: sparsity of the magnitude masks made when ``apply_sparse_lora``
            is given no masks.
        preserve_sparsity_on_merge: multiply merged weights by the mask.
        maintain_sparsity: keep the adapter delta masked during training; follows the mode
            when None (on for sparse_to_sparse, off for sparse_to_dense).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Sequence[str] = field(default_factory=lambda: ["Linear"])
    sparsity_mode: str = "sparse_to_dense"
    initial_sparsity: float = 0.5
    preserve_sparsity_on_merge: bool = True
    maintain_sparsity: Optional[bool] = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be an int > 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha={self.alpha!r} must be a finite number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be a float in [0, 1)")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules={self.target_modules!r} must be a non-empty list of names")
        self.target_modules = list(self.target_modules)
        if self.sparsity_mode not in SPARSITY_MODES:
            raise ValueError(f"sparsity_mode={self.sparsity_mode!r} is unknown; accepted: {', '.join(SPARSITY_MODES)}")
        self.initial_sparsity = check_sparsity(self.initial_sparsity, "initial_sparsity")
        if not isinstance(self.preserve_sparsity_on_merge, bool):
            raise TypeError(f"preserve_sparsity_on_merge={self.preserve_sparsity_on_merge!r} must be a bool")
        implied = self.sparsity_mode == "sparse_to_sparse"
        if self.maintain_sparsity is None:
            self.maintain_sparsity = implied
        elif self.maintain_sparsity is not implied:
            raise ValueError(
                f"maintain_sparsity={self.maintain_sparsity!r} contradicts sparsity_mode={self.sparsity_mode!r}; "
                "sparse_to_sparse keeps the adapter delta masked during training, sparse_to_dense does not "
                "(leave maintain_sparsity=None to follow the mode)"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class SparseLoRALinear(nn.Module):
    """A Linear layer with a LoRA adapter and an optional keep-mask on its weight.

    The base ``weight`` and ``bias`` are the wrapped layer's own parameters, frozen, so
    parameter names (and mask keys) stay those of the original model; the adapter adds
    ``lora_A`` and ``lora_B``.
    """

    def __init__(self, base: nn.Linear, mask: torch.Tensor | None, config: SparseLoRAConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.r = config.r
        self.sparsity_mode = config.sparsity_mode
        self.preserve_sparsity_on_merge = config.preserve_sparsity_on_merge
        # not persistent: masks travel in their own files, the state dict stays the model's
        self.register_buffer("weight_mask", None if mask is None else mask.to(base.weight.device), persistent=False)

    @property
    def masks_delta(self) -> bool:
        return self.sparsity_mode == "sparse_to_sparse" and self.weight_mask is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_active = self.training and isinstance(self.lora_dropout, nn.Dropout)
        if self.masks_delta:
            if not dropout_active:
                return ops.masked_lora_linear(
                    x, self.weight, self.lora_A, self.lora_B, self.scaling, self.weight_mask, self.bias
                )
            base = F.linear(x, self.weight, self.bias)
            return base + ops.masked_lora_linear(
                self.lora_dropout(x), None, self.lora_A, self.lora_B, self.scaling, self.weight_mask
            )
        base = F.linear(x, self.weight, self.bias)
        return base + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight this layer computes with (outside dropout), as a new tensor."""
        if self.masks_delta:
            return ops.masked_lora_weight(self.weight, self.lora_A, self.lora_B, self.scaling, self.weight_mask)
        merged = self.weight.detach().clone()
        return ops.merge_lora_(merged, self.lora_A, self.lora_B, self.scaling, None)

    @torch.no_grad()
    def merge(self, preserve_sparsity: bool | None = None) -> nn.Linear:
        """Fold the adapter into the base weight (in place) and return a plain ``nn.Linear``.

        ``preserve_sparsity`` (default: the config's ``preserve_sparsity_on_merge``) masks
        the merged weight. sparse_to_sparse layers always merge masked: that is the
        function they were trained as.
        """
        if preserve_sparsity is None:
            preserve_sparsity = self.preserve_sparsity_on_merge
        if self.masks_delta and not preserve_sparsity:
            warnings.warn(
                "sparse_to_sparse layers merge as (W + s·BA) ⊙ M regardless of preserve_sparsity=False",
                UserWarning,
                stacklevel=3,
            )
            preserve_sparsity = True
        mask = self.weight_mask if preserve_sparsity else None
        ops.merge_lora_(self.weight.data, self.lora_A, self.lora_B, self.scaling, mask)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        sparsity = (
            f", sparsity={1 - self.weight_mask.float().mean().item():.2%}" if self.weight_mask is not None else ""
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, mode={self.sparsity_mode}{sparsity}"
        )


def _matches_target(name: str, module: nn.Module, targets: Sequence[str]) -> tuple[bool, bool]:
    """(matched, matched by name): class-name match or PEFT-style name-suffix match."""
    by_name = any(name == t or name.endswith("." + t) for t in targets)
    return by_name or type(module).__name__ in targets, by_name


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_sparse_lora(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    config: SparseLoRAConfig | None = None,
) -> nn.Module:
    """Add sparse LoRA adapters to ``model``'s target Linear layers and return the model.

    ``masks`` (``{parameter name: bool}``, module names accepted; None: magnitude masks at
    ``config.initial_sparsity``) are applied to the base weights, every base parameter is
    frozen, and each targeted Linear becomes a :class:`SparseLoRALinear`. Only adapters
    train. Layers named ``lm_head`` or tied to an embedding are skipped unless named
    explicitly. Everything is checked before the model changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = SparseLoRAConfig() if config is None else config
    if not isinstance(config, SparseLoRAConfig):
        raise TypeError(f"config must be a SparseLoRAConfig, got {type(config).__name__}")
    if any(isinstance(m, SparseLoRALinear) for m in model.modules()):
        raise ValueError("model already has sparse LoRA adapters; merge them first (merge_all_lora_weights)")
    if masks is None:
        from .mask_generator import compute_unstructured_mask

        masks = compute_unstructured_mask(model, config.initial_sparsity, progress=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    masks = {n: as_bool_mask(m, f"masks[{n!r}]") for n, m in normalise_mask_keys(masks, params).items()}

    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        matched, by_name = _matches_target(name, module, config.target_modules)
        if not matched:
            continue
        if not isinstance(module, nn.Linear):
            if by_name:
                raise TypeError(f"target module {name!r} is a {type(module).__name__}; sparse LoRA wraps nn.Linear")
            continue
        if not by_name and (name.split(".")[-1] == "lm_head" or id(module.weight) in tied):
            continue
        chosen.append((name, module))
    if not chosen:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"target_modules={config.target_modules} match no Linear layer; give class names "
            f"(model has: {', '.join(kinds)}) or module-name suffixes"
        )

    apply_masks_to_model(model, masks)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in chosen:
        wrapper = SparseLoRALinear(module, masks.get(f"{name}.weight" if name else "weight"), config)
        if name:
            _set_submodule(model, name, wrapper)
        else:
            model = wrapper
    return model


def merge_all_lora_weights(model: nn.Module, preserve_sparsity: bool | None = None) -> nn.Module:
    """Fold every adapter into its base weight and return a model of plain modules.

    ``preserve_sparsity`` (default: each layer's ``preserve_sparsity_on_merge``) masks the
    merged weights so the pruned entries stay exactly zero.
    """
    if isinstance(model, SparseLoRALinear):
        return model.merge(preserve_sparsity)
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)]
    if not wrapped:
        raise ValueError("model has no sparse LoRA layers to merge (apply_sparse_lora first)")
    for name, module in wrapped:
        _set_submodule(model, name, module.merge(preserve_sparsity))
    return model


@torch.no_grad()
def validate_sparsity_preserved(
    model: nn.Module, original_masks: Mapping[str, torch.Tensor], tolerance: float = 1e-6
) -> tuple[bool, dict[str, Any]]:
    """Check that every weight pruned by ``original_masks`` is still (near) zero.

    For layers still carrying adapters, the weight checked is the one the layer computes
    with. A pruned entry violates when ``|w| > tolerance`` (NaN counts). Returns
    ``(is_valid, report)``; ``report['global']`` holds ``total_violations``,
    ``total_pruned``, ``violation_rate`` and ``layers_with_violations``, and
    ``report['per_layer']`` the same per weight.
    """
    if not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be a number >= 0")
    params = dict(model.named_parameters(remove_duplicate=False))
    masks = normalise_mask_keys(original_masks, params, "original_masks")
    modules = dict(model.named_modules())
    per_layer: dict[str, dict[str, Any]] = {}
    for name, raw_mask in masks.items():
        mask = as_bool_mask(raw_mask, f"original_masks[{name!r}]").to(params[name].device)
        owner = modules.get(name.rpartition(".")[0])
        if isinstance(owner, SparseLoRALinear) and name.endswith(".weight"):
            weight = owner.effective_weight()
        else:
            weight = params[name].detach()
        pruned_values = weight[~mask]
        bad = ~(pruned_values.abs() <= tolerance)
        count, pruned = int(bad.sum()), int(pruned_values.numel())
        per_layer[name] = {
            "violations": count,
            "num_pruned": pruned,
            "violation_rate": count / pruned if pruned else 0.0,
            "max_abs_pruned": float(pruned_values.abs().max()) if pruned else 0.0,
        }
    total = sum(v["violations"] for v in per_layer.values())
    pruned = sum(v["num_pruned"] for v in per_layer.values())
    report = {
        "global": {
            "total_violations": total,
            "total_pruned": pruned,
            "violation_rate": total / pruned if pruned else 0.0,
            "num_layers": len(per_layer),
            "layers_with_violations": [n for n, v in per_layer.items() if v["violations"]],
        },
        "per_layer": per_layer,
    }
    return total == 0, report
