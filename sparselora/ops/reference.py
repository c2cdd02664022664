"""Pure-PyTorch implementations of every op: always available, and the oracle in tests.

Written for clarity over speed: each follows the op's definition directly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import register
from .keys import order_keys
from .masks import as_bool_keep, pack_bits
from ._types import PruneThreshold, masks_under_threshold, raise_nonfinite

__all__ = [
    "prune_threshold",
    "write_prune_mask",
    "select_prune_mask",
    "apply_mask_",
    "merge_lora_",
    "lora_update_norms",
    "masked_lora_weight",
    "masked_lora_linear",
    "masked_lora_input_grad",
    "masked_lora_adapter_grad",
    "masked_copy",
    "nm_prune_mask",
    "row_prune_mask",
    "linear_through",
    "adapter_grads",
]

REFERENCE_PRIORITY = 0


def _compare_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    # fp16/bf16/fp32 values are all exact in fp32; fp64 needs fp64.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _values(score: torch.Tensor, absolute: bool, dtype: torch.dtype) -> torch.Tensor:
    """The values compared: ``score`` (or ``|score|``) in ``dtype``, exact for every score dtype."""
    value = score.detach().to(dtype)
    return value.abs() if absolute else value


@register("prune_threshold", "reference", priority=REFERENCE_PRIORITY)
def prune_threshold(scores: Sequence[torch.Tensor], k: int, absolute: bool) -> PruneThreshold:
    dtype = _compare_dtype(scores)
    flat = torch.cat([_values(s.cpu(), absolute, dtype).reshape(-1) for s in scores])
    raise_nonfinite(int((~torch.isfinite(flat)).sum()))
    if k == 0:
        return PruneThreshold(float("-inf"), 0)
    value = torch.kthvalue(flat, k).values
    below = int((flat < value).sum())
    return PruneThreshold(float(value), k - below)


@register("write_prune_mask", "reference", priority=REFERENCE_PRIORITY)
def write_prune_mask(
    score: torch.Tensor, threshold: PruneThreshold, ties_left: int, absolute: bool, packed: bool = False
) -> tuple[torch.Tensor, int]:
    key = _values(score, absolute, _compare_dtype([score])).reshape(-1)
    pruned = key < threshold.value
    used = 0
    if ties_left > 0:
        tied = key == threshold.value
        # the first `ties_left` tied elements in flat order are pruned
        take = tied & (torch.cumsum(tied, 0) <= ties_left)
        used = int(take.sum())
        pruned |= take
    keep = (~pruned).view(score.shape)
    # packed bytes are for mask files: on the CPU whatever the score's device
    return (pack_bits(keep.cpu()) if packed else keep), used


@register("select_prune_mask", "reference", priority=REFERENCE_PRIORITY)
def select_prune_mask(
    scores: Sequence[torch.Tensor], k: int, absolute: bool, pruned: torch.Tensor | None = None
) -> list[torch.Tensor]:
    # ``pruned`` is left as given: the op counts what a backend's own pass did not
    return masks_under_threshold(scores, prune_threshold(scores, k, absolute), write_prune_mask, absolute)


@register("apply_mask_", "reference", priority=REFERENCE_PRIORITY)
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # masked_fill, not mul: a pruned NaN/inf must become 0, not NaN
    return weight.masked_fill_(~as_bool_keep(mask, weight.shape), 0)


@register("masked_copy", "reference", priority=REFERENCE_PRIORITY)
def masked_copy(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return tensor.masked_fill(~as_bool_keep(mask, tensor.shape), 0)


def _accumulate_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _merged(weight, lora_A, lora_B, scaling, mask, acc: torch.dtype) -> torch.Tensor:
    """``(W + scaling·B@A) ⊙ M`` in ``acc`` (W None: the delta alone; M None: no mask)."""
    merged = scaling * (lora_B.to(acc) @ lora_A.to(acc))
    if weight is not None:
        merged = merged + weight.to(acc)
    return merged if mask is None else merged.masked_fill(~as_bool_keep(mask, merged.shape), 0)


def _update_norms(weight, lora_A, lora_B, scaling, mask) -> torch.Tensor:
    """[‖(s·BA) ⊙ ¬M‖², ‖s·BA‖², ‖W + s·BA‖²] in float64."""
    delta = scaling * (lora_B.double() @ lora_A.double())
    dropped = delta.masked_fill(as_bool_keep(mask, delta.shape), 0) if mask is not None else torch.zeros(())
    merged = delta + weight.double()
    return torch.stack([dropped.square().sum(), delta.square().sum(), merged.square().sum()]).to(torch.float64)


@register("merge_lora_", "reference", priority=REFERENCE_PRIORITY)
def merge_lora_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    if norms is not None:
        norms.copy_(_update_norms(weight, lora_A, lora_B, scaling, mask))
    return weight.copy_(_merged(weight, lora_A, lora_B, scaling, mask, _accumulate_dtype(weight)))


@register("lora_update_norms", "reference", priority=REFERENCE_PRIORITY)
def lora_update_norms(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, mask: torch.Tensor | None
) -> torch.Tensor:
    return _update_norms(weight, lora_A, lora_B, scaling, mask).to(weight.device)


@register("masked_lora_weight", "reference", priority=REFERENCE_PRIORITY)
def masked_lora_weight(
    weight: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor,
) -> torch.Tensor:
    like = lora_A if weight is None else weight
    return _merged(weight, lora_A, lora_B, scaling, mask, _accumulate_dtype(like)).to(like.dtype)


def _effective(weight, lora_A, lora_B, scaling, mask, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """The effective weight in the stored orientation ((in, out) when ``transposed``)."""
    if transposed:  # (W_t + s·(BA)ᵀ) ⊙ M_t = (W_t + s·Aᵀ Bᵀ) ⊙ M_t
        lora_A, lora_B = lora_B.t(), lora_A.t()
    like = weight if weight is not None else torch.empty(0, dtype=dtype)
    return _merged(weight, lora_A, lora_B, scaling, mask, _accumulate_dtype(like)).to(dtype)


@register("masked_lora_linear", "reference", priority=REFERENCE_PRIORITY)
def masked_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    transposed: bool = False,
) -> torch.Tensor:
    return linear_through(x, _effective(weight, lora_A, lora_B, scaling, mask, transposed, x.dtype), bias, transposed)


def linear_through(x: torch.Tensor, w_eff: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """``x`` through an effective weight in its stored orientation ((in, out) when ``transposed``)."""
    if transposed:
        y = x @ w_eff
        return y if bias is None else y + bias
    return F.linear(x, w_eff, bias)


@register("masked_lora_input_grad", "reference", priority=REFERENCE_PRIORITY)
def masked_lora_input_grad(dy, weight, lora_A, lora_B, scaling, mask, transposed):
    w_eff = _effective(weight, lora_A, lora_B, scaling, mask, transposed, dy.dtype)
    return dy @ (w_eff.t() if transposed else w_eff)


@register("masked_lora_adapter_grad", "reference", priority=REFERENCE_PRIORITY)
def masked_lora_adapter_grad(dy, x, lora_A, lora_B, scaling, mask, transposed, weight_grad):
    return adapter_grads(dy, x, lora_A, lora_B, scaling, mask, transposed, weight_grad, apply_mask_)


def adapter_grads(dy, x, lora_A, lora_B, scaling, mask, transposed: bool, weight_grad: bool, mask_in_place):
    """(dA, dB, the masked weight gradient or an empty tensor), masking the fresh ``dYᵀX``
    with ``mask_in_place(g, mask)``: the one formula every backend's GEMMs follow."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    g = x2.t() @ dy2 if transposed else dy2.t() @ x2  # the stored weight's gradient, then masked
    mask_in_place(g, mask)
    g_lin = g.t() if transposed else g
    d_b = (scaling * (g_lin @ lora_A.to(g.dtype).t())).to(lora_B.dtype)
    d_a = (scaling * (lora_B.to(g.dtype).t() @ g_lin)).to(lora_A.dtype)
    return d_a, d_b, (g if weight_grad else g.new_empty(0))


@register("key_histogram", "reference", priority=REFERENCE_PRIORITY)
def key_histogram(score: torch.Tensor, absolute: bool, high: int) -> torch.Tensor:
    raise_nonfinite(int((~torch.isfinite(score)).sum()))
    keys = order_keys(score.cpu(), absolute)
    if high < 0:
        return torch.bincount(keys >> 16, minlength=65536)
    return torch.bincount(keys[(keys >> 16) == high] & 0xFFFF, minlength=65536)


def _prune_first(key: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the ``k`` first of each row's stable ascending order."""
    keep = torch.ones(key.shape, dtype=torch.bool, device=key.device)
    if k:
        keep.scatter_(1, torch.sort(key, dim=1, stable=True).indices[:, :k], False)
    return keep


@register("nm_prune_mask", "reference", priority=REFERENCE_PRIORITY)
def nm_prune_mask(score: torch.Tensor, n: int, m: int, absolute: bool) -> torch.Tensor:
    key = _values(score, absolute, _compare_dtype([score]))
    raise_nonfinite(int((~torch.isfinite(key)).sum()))
    return _prune_first(key.reshape(-1, m), m - n).view(score.shape)


def check_prior_rows(prior: torch.Tensor, k: int) -> None:
    """ValueError naming the first row where ``prior`` already prunes more than ``k``."""
    already = (~prior).sum(1)
    over = (already > k).nonzero()
    if over.numel():
        row = int(over[0, 0])
        raise ValueError(f"prior already prunes {int(already[row])} weights of row {row}, more than k={k}")


@register("row_prune_mask", "reference", priority=REFERENCE_PRIORITY)
def row_prune_mask(score: torch.Tensor, k: int, absolute: bool, prior: torch.Tensor | None) -> torch.Tensor:
    key = _values(score, absolute, _compare_dtype([score]))
    bad = ~torch.isfinite(key)
    if prior is not None:
        check_prior_rows(prior, k)
        bad &= prior
        # below every finite score: the stable sort puts prior's prunes first
        key = key.masked_fill(~prior, float("-inf"))
    raise_nonfinite(int(bad.sum()))
    return _prune_first(key, k)
