"""``SparseLora``: sparse LoRA inside ModelZoo's trainer, sparse_to_sparse included.

ModelZoo's own ``Lora`` callback adds a dense ``s·BA`` to the frozen weight, so a model trained
with it computes ``W⊙M + s·BA`` (sparse_to_dense) and merging densifies it. This callback
converts the target ``nn.Linear`` layers itself, with the same matching rule and parameter
names as ModelZoo's ``Lora`` (``<layer>.lora_A`` ``(r, in)``, ``<layer>.lora_B`` ``(out, r)``),
into layers whose forward pass, in ``sparse_to_sparse`` mode, is ``((W + s·B A) ⊙ M) x``.

The mask is the frozen base weight's non-zeros (``M = W ≠ 0``): masks reach ModelZoo as zeros
baked into the checkpoint (``sparselora apply``), exactly as its own ``init_method: from_zeros``
reads them. So the traced step needs nothing but tensor ops, no mask tensors, no names: a
kept weight that is exactly 0 counts as pruned, which changes nothing it computes.
``merge_checkpoint`` folds the adapters of a saved checkpoint into an exactly sparse one.
"""

from __future__ import annotations

import math
from functools import wraps
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lora.config import SPARSITY_MODES as MODES, check_lora_args
from ..rules import check_choice
from .callback import ModelZooCallback

__all__ = ["SparseLora", "ModelZooSparseLoRALinear", "convert_linear_layers", "merged_weight", "merge_state_dict",
           "MODES"]


class ModelZooSparseLoRALinear(nn.Linear):
    """``nn.Linear`` with a LoRA adapter whose delta is masked by the weight's non-zeros.

    Tensor ops only, so it traces on Cerebras (cstorch) as on CPU.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, sparsity_mode: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.scaling, self.sparsity_mode = r, alpha / r, sparsity_mode
        self.lora_A = nn.Parameter(self.weight.new_zeros((r, self.in_features)))
        self.lora_B = nn.Parameter(self.weight.new_zeros((self.out_features, r)))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        """``s·B A``, masked by the weight's non-zeros in sparse_to_sparse mode."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        if self.sparsity_mode == "sparse_to_sparse":
            delta = delta * (self.weight != 0).to(delta.dtype)
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.lora_dropout, nn.Dropout) and self.training:
            # dropout reaches the adapter's input only, as in every LoRA
            return F.linear(x, self.weight, self.bias) + F.linear(self.lora_dropout(x), self.delta())
        return F.linear(x, self.weight + self.delta(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, mode={self.sparsity_mode}")


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  sparsity_mode: str) -> torch.Tensor:
    """The weight a trained layer computes with, in fp32 then cast back: ``W + (s·BA) ⊙ (W≠0)``
    (sparse_to_sparse: exactly as sparse as ``W``) or ``W + s·BA`` (sparse_to_dense)."""
    check_choice(sparsity_mode, "sparsity_mode", MODES)
    delta = scaling * (lora_B.float() @ lora_A.float())
    if sparsity_mode == "sparse_to_sparse":
        delta = delta * (weight != 0)
    return (weight.float() + delta).to(weight.dtype)


def _matches(chain: Sequence[str], targets: Sequence[str] | None) -> bool:
    # ModelZoo's rule: every target class name appears in the module's chain of class names
    return targets is None or all(t in chain for t in targets)


def convert_linear_layers(model: nn.Module, lora_params: Mapping[str, Any], sparsity_mode: str) -> list[str]:
    """Replace the target ``nn.Linear`` layers of ``model`` in place; freeze everything else.

    Returns the names of the converted layers; none converted is a ValueError.
    """
    r, alpha, dropout = _lora_args(lora_params)
    targets = lora_params.get("target_modules")
    converted: list[str] = []

    def visit(module: nn.Module, prefix: str, chain: list[str]) -> None:
        for name, child in list(module.named_children()):
            path = f"{prefix}{name}"
            child_chain = chain + [type(child).__name__]
            if isinstance(child, nn.Linear) and not isinstance(child, ModelZooSparseLoRALinear) \
                    and _matches(child_chain, targets):
                setattr(module, name, ModelZooSparseLoRALinear(child, r, alpha, dropout, sparsity_mode))
                converted.append(path)
            else:
                visit(child, f"{path}.", child_chain)

    visit(model, "", [type(model).__name__])
    if not converted:
        raise ValueError(f"SparseLora: target_modules={targets!r} match no nn.Linear (class names, e.g. "
                         "MultiQueryAttention, or Linear for every linear layer)")
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith((".lora_A", ".lora_B")))
    return converted


def _lora_args(lora_params: Mapping[str, Any]) -> tuple[int, float, float]:
    """(r, alpha, dropout) of ``lora_params``: r is required, alpha and dropout default as in
    ModelZoo's ``Lora`` callback."""
    if not isinstance(lora_params, Mapping):
        raise TypeError(f"lora_params must be a dict, got {type(lora_params).__name__}")
    unknown = sorted(set(lora_params) - {"r", "alpha", "dropout", "target_modules", "fan_in_fan_out", "merge_weights"})
    if unknown:
        raise ValueError(f"lora_params has unknown keys {unknown}; accepted: r, alpha, dropout, target_modules")
    return check_lora_args(lora_params.get("r"), lora_params.get("alpha", 1), lora_params.get("dropout", 0.0))


def _check_lora_params(lora_params: Mapping[str, Any]) -> dict[str, Any]:
    _lora_args(lora_params)
    if lora_params.get("fan_in_fan_out") or lora_params.get("merge_weights"):
        raise ValueError("SparseLora supports fan_in_fan_out=False and merge_weights=False (merging densifies)")
    return dict(lora_params)


class SparseLora(ModelZooCallback):
    """ModelZoo callback: sparse LoRA on the model's target Linear layers.

    YAML: ``- SparseLora: {lora_params: {r, alpha, dropout, target_modules}, sparsity_mode:
    sparse_to_sparse}``; ``target_modules`` follow ModelZoo's ``Lora`` (class names, all of
    which must enclose the layer; omitted: every ``nn.Linear``).
    """

    def __init__(self, lora_params: dict, sparsity_mode: str = "sparse_to_sparse") -> None:
        check_choice(sparsity_mode, "sparsity_mode", MODES)
        self.lora_params = _check_lora_params(lora_params)
        self.sparsity_mode = sparsity_mode
        self.converted: list[str] = []

    def convert(self, model: nn.Module) -> nn.Module:
        self.converted = convert_linear_layers(model, self.lora_params, self.sparsity_mode)
        return model

    def pre_setup(self, trainer) -> None:
        # the model is built later, from a function: wrap it, as ModelZoo's Lora callback does
        holder = trainer.callbacks["model"]
        model = holder.model
        if isinstance(model, nn.Module):
            def model_fn():
                return self.convert(model)
        else:
            @wraps(model)
            def model_fn():
                return self.convert(model())
        holder.model = model_fn


def merge_state_dict(state: Mapping[str, torch.Tensor], lora_params: Mapping[str, Any],
                     sparsity_mode: str) -> dict[str, torch.Tensor]:
    """A model state dict with every ``<layer>.lora_A`` / ``lora_B`` pair folded into
    ``<layer>.weight`` (see :func:`merged_weight`) and the adapter entries dropped."""
    r, alpha, _ = _lora_args(lora_params)
    merged = dict(state)
    layers = [k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")]
    for layer in layers:
        weight_key, b_key = f"{layer}.weight", f"{layer}.lora_B"
        if weight_key not in state or b_key not in state:
            raise ValueError(f"checkpoint has {layer}.lora_A but not {weight_key} and {b_key}")
        merged[weight_key] = merged_weight(state[weight_key], state[f"{layer}.lora_A"], state[b_key], alpha / r,
                                           sparsity_mode)
        del merged[f"{layer}.lora_A"], merged[b_key]
    if not layers:
        raise ValueError("checkpoint holds no lora_A / lora_B adapters to merge")
    return merged
