"""Mask operations: validate (including the N:M pattern), save/load (.pt, .npz,
.safetensors), statistics, plots, and applying masks to a model."""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

import numpy as np
import torch
import torch.nn as nn

from .. import ops
from ..rules import check_nm, check_number, check_positive_int, check_sparsity
from ..io.atomic import atomic_open
from ..io.mask_files import MASK_FORMATS, as_bool_mask, read_masks, write_masks
from .targets import is_fused_experts, normalise_mask_keys

__all__ = [
    "validate_mask",
    "validate_nm_mask",
    "save_mask",
    "load_mask",
    "compute_sparsity_stats",
    "plot_sparsity_histogram",
    "apply_masks_to_model",
    "as_bool_mask",
    "MASK_FORMATS",
]

PathLike = Union[str, os.PathLike]


def _mask_counts(mask: torch.Tensor) -> dict[str, Any]:
    total = mask.numel()
    kept = int(mask.sum()) if total else 0
    return {
        "sparsity": (total - kept) / total if total else 0.0,
        "num_params": total,
        "num_pruned": total - kept,
        "num_kept": kept,
        "shape": tuple(mask.shape),
    }


def validate_mask(
    mask: torch.Tensor, expected_sparsity: float | None = None, tolerance: float = 0.01
) -> tuple[bool, dict[str, Any]]:
    """Check that ``mask`` is a proper mask and, if given, near ``expected_sparsity``.

    Returns ``(is_valid, stats)``; ``stats`` holds ``sparsity``, ``num_params``,
    ``num_pruned``, ``num_kept``, ``shape``, ``dtype`` and ``error`` (None when valid).
    """
    if not isinstance(mask, (torch.Tensor, np.ndarray)):
        raise TypeError(f"mask is {type(mask).__name__}; expected a torch.Tensor")
    if expected_sparsity is not None:
        check_sparsity(expected_sparsity, "expected_sparsity")
    check_number(tolerance, "tolerance", low=0.0)
    tensor = torch.as_tensor(mask)
    stats: dict[str, Any] = {"dtype": str(tensor.dtype), "shape": tuple(tensor.shape), "error": None}
    try:
        bool_mask = as_bool_mask(tensor)
    except (TypeError, ValueError) as exc:
        stats["error"] = str(exc)
        return False, stats
    if bool_mask.numel() == 0:
        stats["error"] = "mask is empty"
        return False, stats
    stats.update(_mask_counts(bool_mask))
    if expected_sparsity is not None:
        deviation = abs(stats["sparsity"] - expected_sparsity)
        stats["expected_sparsity"] = expected_sparsity
        stats["deviation"] = deviation
        if deviation > tolerance:
            stats["error"] = (
                f"sparsity {stats['sparsity']:.4f} differs from expected {expected_sparsity:.4f} "
                f"by {deviation:.4f} > tolerance {tolerance}"
            )
            return False, stats
    return True, stats


def validate_nm_mask(
    masks: torch.Tensor | Mapping[str, torch.Tensor],
    n: int = 2,
    m: int = 4,
    *,
    out_dim: int | Mapping[str, int] = 0,
) -> None:
    """Check that every mask follows the N:M pattern; raise ValueError on the first breach.

    Along the input dimension of each output row (all dimensions but ``out_dim`` of the
    mask, flattened, as :func:`~sparselora.pruning.mask_generator.compute_nm_mask` reads
    them), every group of ``m`` consecutive weights must keep exactly ``n``. ``masks`` is
    one mask or ``{name: mask}``; ``out_dim`` is the output dimension (1 for transformers'
    ``Conv1D``), one int for all masks or a mapping from name to int (missing names: 0).
    The error names the layer, the row, the group's columns and how many it keeps.
    """
    check_nm(n, m)
    if isinstance(masks, (torch.Tensor, np.ndarray)):
        named: Mapping[str, Any] = {"mask": masks}
    elif isinstance(masks, Mapping) and masks:
        named = masks
    else:
        raise ValueError(f"masks must be a bool tensor or a non-empty dict of name -> mask, got {type(masks).__name__}")
    for name, raw in named.items():
        mask = as_bool_mask(raw, f"masks[{name!r}]")
        dim = out_dim.get(name, 0) if isinstance(out_dim, Mapping) else out_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or not -max(mask.dim(), 1) <= dim < max(mask.dim(), 1):
            raise ValueError(f"out_dim={dim!r} for {name!r} must be a dimension of its {mask.dim()}-D mask")
        if mask.dim() < 2:
            raise ValueError(f"{name!r} is a {mask.dim()}-D mask; N:M masks are for weights with >= 2 dims")
        rows = mask.movedim(dim, 0).reshape(mask.shape[dim], -1)
        if rows.shape[1] % m:
            raise ValueError(
                f"{name!r}: rows have {rows.shape[1]} input weights, not a multiple of m={m}; no {n}:{m} pattern fits"
            )
        kept = rows.reshape(rows.shape[0], -1, m).sum(2)
        wrong = (kept != n).nonzero()
        if len(wrong):
            row, group = (int(v) for v in wrong[0])
            raise ValueError(
                f"{name!r} breaks the {n}:{m} pattern in {len(wrong)} group(s); first: row {row}, input "
                f"columns {group * m}..{group * m + m - 1} keep {int(kept[row, group])} of {m} weights "
                f"(must keep exactly {n})"
            )


def save_mask(
    masks: Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Mapping[str, Any] | None = None,
    format: str | None = None,
    packed: bool = False,
) -> None:
    """Save ``masks`` with JSON ``metadata`` as .pt, .npz or .safetensors.

    The format comes from ``format`` or the file extension. ``packed=True`` (safetensors
    only) stores 8 mask elements per byte, 8x smaller (see ``sparselora.io.packed_masks``).
    The write is atomic: on any error the previous file at ``path`` is left as it was.
    """
    write_masks(masks, path, metadata, format, packed)


def load_mask(
    path: PathLike, format: str | None = None, device: Union[str, torch.device] = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load masks saved by :func:`save_mask`; returns ``(masks, metadata)``.

    Reading is safe: ``torch.load(weights_only=True)``, ``np.load(allow_pickle=False)``.
    A truncated or corrupted file raises ValueError naming the file and format. Packed
    mask files (a file, a directory of shards or their index) are unpacked to bool.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device ({exc}); e.g. 'cpu' or 'cuda:0'") from None
    masks, metadata = read_masks(path, format)
    return {name: mask.to(device) for name, mask in masks.items()}, metadata


def compute_sparsity_stats(masks: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Per-layer and global sparsity of ``masks``.

    Returns ``{"global": {...}, "per_layer": {name: {...}}}``; global holds ``sparsity``
    (pruned fraction over all weights), ``total_params``, ``total_pruned``, ``total_kept``,
    ``num_layers`` and the mean/std/min/max of the per-layer sparsities. The entry of a
    fused-experts mask (``mlp.experts.gate_up_proj``) also lists ``per_expert`` sparsities.
    """
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty dict of name -> mask")
    per_layer = {}
    for name, m in masks.items():
        mask = as_bool_mask(m, f"masks[{name!r}]")
        per_layer[name] = _mask_counts(mask)
        if is_fused_experts(name, mask.shape):  # one matrix per expert: each one's sparsity
            kept = mask.reshape(mask.shape[0], -1).sum(1).tolist()
            per_layer[name]["per_expert"] = [1 - k / mask[0].numel() for k in kept] if mask[0].numel() else []
    total = sum(s["num_params"] for s in per_layer.values())
    pruned = sum(s["num_pruned"] for s in per_layer.values())
    layer_sparsity = np.array([s["sparsity"] for s in per_layer.values()], dtype=np.float64)
    return {
        "global": {
            "sparsity": pruned / total if total else 0.0,
            "total_params": total,
            "total_pruned": pruned,
            "total_kept": total - pruned,
            "num_layers": len(per_layer),
            "mean_layer_sparsity": float(layer_sparsity.mean()),
            "std_layer_sparsity": float(layer_sparsity.std()),
            "min_layer_sparsity": float(layer_sparsity.min()),
            "max_layer_sparsity": float(layer_sparsity.max()),
        },
        "per_layer": per_layer,
    }


def plot_sparsity_histogram(
    masks: Mapping[str, torch.Tensor],
    save_path: PathLike | None = None,
    bins: int = 20,
    title: str | None = None,
):
    """Histogram of per-layer sparsity, with the global sparsity marked.

    Works headless (no pyplot, no display). Returns the matplotlib Figure; writes a PNG
    atomically when ``save_path`` is given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_positive_int(bins, "bins")
    stats = compute_sparsity_stats(masks)
    # a fused-experts mask counts as its experts' matrices
    values = [v for s in stats["per_layer"].values() for v in s.get("per_expert", [s["sparsity"]])]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(values, bins=bins, range=(0.0, 1.0), color="#4C72B0", edgecolor="white")
    glob = stats["global"]["sparsity"]
    ax.axvline(glob, color="#C44E52", linestyle="--", label=f"global {glob:.1%}")
    ax.set_xlabel("layer sparsity (fraction pruned)")
    ax.set_ylabel("number of layers")
    ax.set_title(title or f"Sparsity of {len(values)} masks")
    ax.legend()
    fig.tight_layout()
    if save_path is not None:
        with atomic_open(save_path) as handle:
            fig.savefig(handle, format="png")
    return fig


def apply_masks_to_model(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights of ``model`` in place and return it.

    Keys are parameter names (module names are accepted). Every mask is checked before
    any weight changes, so a bad mask leaves the model untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters(remove_duplicate=False))
    resolved = normalise_mask_keys(masks, params)
    checked = {name: as_bool_mask(m, f"masks[{name!r}]") for name, m in resolved.items()}
    for name, mask in checked.items():
        ops.apply_mask_(params[name].data, mask.to(params[name].device))
    return model
