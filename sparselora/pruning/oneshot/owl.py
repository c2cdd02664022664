"""OWL (Yin et al., 2024): non-uniform sparsity across decoder blocks from their outliers.

A block's outlier ratio is the share of its Wanda scores ``|W_ij|·‖X_j‖₂`` (over all its
pruned weights together) above ``threshold`` times their mean. Blocks with more outliers
matter more, so they are pruned less: the ratios are mapped linearly onto a spread of
``2·lam`` and centred so that the sparsities average exactly the target.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...rules import check_number, check_sparsity

__all__ = ["outlier_ratio", "owl_sparsities", "OWL_THRESHOLD", "OWL_LAMBDA", "check_threshold", "check_lambda"]

OWL_THRESHOLD = 5.0  # the paper's M
OWL_LAMBDA = 0.08  # the paper's λ: block sparsities spread over at most 2λ


def check_threshold(threshold: object, arg: str = "threshold") -> float:
    """OWL's outlier threshold M, a number > 0."""
    return check_number(threshold, arg, low=0.0, low_open=True, wanted="a number > 0 (the paper's M = 5)")


def check_lambda(lam: object, arg: str = "lam") -> float:
    """OWL's spread λ, a number in [0, 0.5]: block sparsities lie within ±λ of the target."""
    return check_number(lam, arg, low=0.0, high=0.5, wanted="a number in [0, 0.5] (the paper uses 0.08)")


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float = OWL_THRESHOLD) -> float:
    """Share of the ``scores`` (all tensors together) above ``threshold`` × their mean."""
    threshold = check_threshold(threshold)
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    if count == 0:
        raise ValueError("outlier_ratio needs at least one score")
    cut = threshold * total / count
    return sum(int((s.double() > cut).sum()) for s in scores) / count


def owl_sparsities(ratios: Sequence[float], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Per-block sparsities around ``target`` from the blocks' outlier ``ratios``.

    The block with the most outliers gets ``target - (2·lam - c)`` and the one with the
    fewest ``target + c`` (``c`` centres them), so the spread is ``2·lam`` and the mean is
    exactly ``target``. Equal ratios give ``target`` everywhere. A sparsity that would leave
    [0, 1] is an error naming the block: lower ``lam``.
    """
    if not ratios:
        raise ValueError("owl_sparsities needs at least one block ratio")
    target = check_sparsity(target, "target")
    lam = check_lambda(lam)
    values = torch.tensor([float(r) for r in ratios], dtype=torch.float64)
    low, high = float(values.min()), float(values.max())
    if high == low:
        return [float(target)] * len(ratios)
    # density rises with the outlier ratio; sparsity is its complement, centred on the target
    density = (values - low) / (high - low) * (2 * lam)
    sparsity = target - (density - density.mean())
    result = [float(s) for s in sparsity]
    for block, s in enumerate(result):
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"OWL gives block {block} sparsity {s:.4f}, outside [0, 1]; lower lam={lam} "
                             f"or move the target {target} away from 0 and 1")
    return result
