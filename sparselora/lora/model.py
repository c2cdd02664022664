"""Sparse LoRA on a model: apply adapters, merge them, check sparsity, broadcast masks.

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
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import ops
from ..io.mask_files import as_bool_mask
from ..pruning.targets import is_fused_experts, normalise_mask_keys, refuse_peft_model
from ..pruning.mask_generator import compute_unstructured_mask
from ..pruning.mask_ops import apply_masks_to_model
from .config import SparseLoRAConfig
from .layer import SparseLoRALinear, is_conv1d, merge_change_from

__all__ = [
    "apply_sparse_lora",
    "merge_all_lora_weights",
    "validate_sparsity_preserved",
    "merge_report",
    "broadcast_masks",
    "sparse_lora_layers",
    "trainable_parameters",
    "print_trainable_parameters",
]

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
    """Add sparse LoRA adapters to ``model``'s target layers and return the model.

    ``masks`` (``{parameter name: bool}``, module names accepted; None: magnitude masks at
    ``config.initial_sparsity``) are applied to the base weights, every base parameter is
    frozen, and each targeted ``nn.Linear`` or transformers ``Conv1D`` becomes a
    :class:`SparseLoRALinear`. Only adapters train. Layers named ``lm_head`` or tied to an
    embedding are skipped unless named explicitly. Everything is checked before the model
    changes. A model wrapped by PEFT is refused (see :func:`from_peft_adapter`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = SparseLoRAConfig() if config is None else config
    if not isinstance(config, SparseLoRAConfig):
        raise TypeError(f"config must be a SparseLoRAConfig, got {type(config).__name__}")
    if any(isinstance(m, SparseLoRALinear) for m in model.modules()):
        raise ValueError("model already has sparse LoRA adapters; merge them first (merge_all_lora_weights)")
    refuse_peft_model(model, "apply_sparse_lora")
    if masks is None:
        masks = compute_unstructured_mask(model, config.initial_sparsity, progress=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    masks = {n: as_bool_mask(m, f"masks[{n!r}]") for n, m in normalise_mask_keys(masks, params).items()}

    chosen = _chosen_layers(model, config.target_modules)
    apply_masks_to_model(model, masks)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in chosen:
        mask = masks.get(f"{name}.weight" if name else "weight")
        wrapper = SparseLoRALinear(module, mask, config, adapter_dtype=config.adapter_dtype)
        if name:
            _set_submodule(model, name, wrapper)
        else:
            model = wrapper
    return model


def _refuse_fused_experts(model: nn.Module, targets: Sequence[str]) -> None:
    """A target naming a mixture-of-experts block's fused experts (a module ``experts`` or one
    of its 3-D weights) is refused by name: they cannot be adapted yet, and skipping them
    silently would train something else than asked."""
    for name, module in model.named_modules():
        named = [f"{name}.{p}" for p, w in module.named_parameters(recurse=False) if is_fused_experts(f"{name}.{p}", w.shape)]
        if not named:
            continue
        asked = _matches_target(name, module, targets)[0] or any(_matches_target(n, module, targets)[1] for n in named)
        if asked:
            raise ValueError(
                f"target_modules={list(targets)} names the fused experts {name!r} of a mixture-of-experts block "
                f"({', '.join(n.rsplit('.', 1)[-1] for n in named)}: one 3-D weight for all experts); sparse LoRA "
                "cannot adapt fused experts yet. They stay frozen and keep their masks; adapt the attention and "
                "dense projections (the default target_modules)."
            )


def _chosen_layers(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Module]]:
    _refuse_fused_experts(model, targets)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        matched, by_name = _matches_target(name, module, targets)
        if not matched:
            continue
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            if by_name:
                raise TypeError(
                    f"target module {name!r} is a {type(module).__name__}; sparse LoRA wraps nn.Linear "
                    "and transformers' Conv1D"
                )
            continue
        if not by_name and (name.split(".")[-1] == "lm_head" or id(module.weight) in tied):
            continue
        chosen.append((name, module))
    if not chosen:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"target_modules={list(targets)} match no Linear or Conv1D layer; give class names "
            f"(model has: {', '.join(kinds)}) or module-name suffixes"
        )
    return chosen


def sparse_lora_layers(model: nn.Module) -> list[tuple[str, SparseLoRALinear]]:
    """``(name, layer)`` of every :class:`SparseLoRALinear` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)]


def merge_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """What a masked merge would drop, per sparse LoRA layer, without merging.

    ``dropped_update`` is the share of the adapter's update ``s·BA`` (by Frobenius norm) that
    falls on pruned weights; ``relative_change`` is that dropped part relative to the
    layer's trained weight ``W + s·BA``. A sparse_to_dense layer merged with
    ``preserve_sparsity`` loses exactly this part (its function changes); a
    sparse_to_sparse layer never trained it (its merge is exact).
    """
    layers = sparse_lora_layers(model)
    if not layers:
        raise ValueError("model has no sparse LoRA layers (apply_sparse_lora first)")
    return {name: layer.merge_change() for name, layer in layers}


def merge_all_lora_weights(
    model: nn.Module,
    preserve_sparsity: bool | None = None,
    *,
    safe_merge: bool = False,
    warn_above: float = 0.1,
) -> nn.Module:
    """Fold every adapter into its base weight and return a model of plain modules.

    ``preserve_sparsity`` (default: each layer's ``preserve_sparsity_on_merge``) masks the
    merged weights so the pruned entries stay exactly zero. A masked merge of
    sparse_to_dense layers drops the part of the trained update that falls on pruned
    weights; when that part exceeds ``warn_above`` of some layer's update (see
    :func:`merge_report`) a warning says how much. ``safe_merge=True`` first checks every
    adapter and merged weight for NaN/inf and raises, naming the layer, before any weight
    changes.
    """
    if isinstance(model, SparseLoRALinear):
        layers = [("", model)]
    else:
        layers = sparse_lora_layers(model)
    if not layers:
        raise ValueError("model has no sparse LoRA layers to merge (apply_sparse_lora first)")
    # the report's norms come from the merge's own pass (or the safe_merge check's): no extra read
    norms = {name: torch.empty(3, dtype=torch.float64, device=layer.weight.device)
             for name, layer in layers if _drops_update(layer, preserve_sparsity)}
    if safe_merge:
        for name, layer in layers:
            _check_finite_merge(name, layer, norms)
    merged = {name: layer.merge(preserve_sparsity, norms=None if safe_merge else norms.get(name))
              for name, layer in layers}
    _warn_dropped_updates({name: merge_change_from(n)["dropped_update"] for name, n in norms.items()}, warn_above)
    if isinstance(model, SparseLoRALinear):
        return merged[""]
    for name, plain in merged.items():
        _set_submodule(model, name, plain)
    return model


def _drops_update(layer: SparseLoRALinear, preserve_sparsity: bool | None) -> bool:
    """Whether merging ``layer`` masks a trained dense update (sparse_to_dense, masked merge)."""
    masked = layer.preserve_sparsity_on_merge if preserve_sparsity is None else preserve_sparsity
    return bool(masked) and not layer.masks_delta and layer.packed_mask is not None


def _check_finite_merge(name: str, layer: SparseLoRALinear, norms: dict[str, torch.Tensor]) -> None:
    """safe_merge: refuse NaN/inf in the adapters or the merged weight, before anything changes.
    The merged weight is judged by its squared norm (one read); only a non-finite norm, which a
    huge finite weight could also give, is confirmed element by element."""
    where = name or "<model>"
    for what, t in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"safe_merge: {what} of layer {where!r} holds NaN or inf; nothing was merged")
    found = layer.update_norms()
    if name in norms:
        norms[name].copy_(found)
    if not math.isfinite(float(found[2])) and not bool(torch.isfinite(layer.effective_weight()).all()):
        raise ValueError(f"safe_merge: merged weight of layer {where!r} holds NaN or inf; nothing was merged")


def _warn_dropped_updates(losses: dict[str, float], warn_above: float) -> None:
    big = [(loss, name) for name, loss in losses.items() if loss > warn_above]
    if big:
        worst, where = max(big)
        warnings.warn(
            f"merging with preserve_sparsity dropped the part of the trained sparse_to_dense update that falls on "
            f"pruned weights: more than {warn_above:.0%} of the update in {len(big)} of {len(losses)} layers "
            f"(worst {worst:.0%}, {where!r}), so the merged model computes a different function from the trained "
            "one. Train with sparsity_mode='sparse_to_sparse' for an exact sparse merge, or merge with "
            "preserve_sparsity=False to keep the trained function (dense). merge_report(model) gives every layer "
            "before a merge.",
            UserWarning,
            stacklevel=3,
        )


def broadcast_masks(model: nn.Module, src: int = 0, group: Any = None) -> nn.Module:
    """Give every rank ``src``'s masks, once, before training.

    DDP copies rank ``src``'s parameters to the other ranks when it wraps the model, but the
    masks are no buffers (so that they are not broadcast on every step): ranks that computed
    masks from different weights would silently train different functions. Call this on
    every rank after :func:`apply_sparse_lora` and before wrapping with DDP (whose initial
    broadcast then gives every rank ``src``'s base weights) when masks may differ across
    ranks. Sends the packed bits (1/8 of a bool mask) and zeroes the newly pruned base
    weights. Needs an initialised ``torch.distributed`` group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("broadcast_masks needs torch.distributed initialised (init_process_group)")
    backend = dist.get_backend(group)
    for name, layer in sparse_lora_layers(model):
        bits = layer.packed_mask
        if bits is None:
            continue
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        payload = bits.to(device).clone()
        dist.broadcast(payload, src=src, group=group)
        layer.set_mask(payload)
        ops.apply_mask_(layer.weight.data, layer.packed_mask)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, float]:
    """``{"trainable": n, "total": n, "percent": p}`` over the model's (unique) parameters."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the trainable-parameter summary (as PEFT's ``print_trainable_parameters``)."""
    c = trainable_parameters(model)
    print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || trainable%: {c['percent']:.4f}")


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
        if isinstance(owner, SparseLoRALinear) and name.rpartition(".")[2] == "weight":
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

