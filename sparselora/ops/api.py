"""The ops' public functions: each checks its arguments, then calls the op.

The tensor ops are PyTorch custom operators (``torch.ops.sparselora.*``,
:mod:`sparselora.ops.library`): they carry a fake implementation and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through them, and their CPU and CUDA kernels hand the
call to a backend chosen by :mod:`sparselora.ops._dispatch` (C++ for CPU tensors, Triton for
CUDA tensors when built, the pure-PyTorch reference otherwise). ``prune_threshold``,
``write_prune_mask`` and ``streaming_threshold`` return host values (a cut, tie counts) and stay
plain functions over the same dispatcher. The arguments are checked with
:mod:`sparselora.rules`, so a bad value is refused here as everywhere else.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..rules import check_finite, check_int, check_nm, check_sparsity
from . import library
from ._dispatch import resolve
from ._types import PruneThreshold
from .keys import streaming_cut
from .masks import check_keep_mask

__all__ = [
    "prune_count",
    "prune_threshold",
    "write_prune_mask",
    "select_prune_mask",
    "nm_prune_mask",
    "row_prune_mask",
    "key_histogram",
    "streaming_threshold",
    "apply_mask_",
    "merge_lora_",
    "lora_update_norms",
    "masked_lora_weight",
    "masked_lora_linear",
]

_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a group at ``sparsity`` loses: ``round(sparsity*numel)``.

    The same rounding as ``torch.nn.utils.prune`` (Python's round, half to even).
    """
    return int(round(check_sparsity(sparsity) * numel))


def _check_scores(scores: Sequence[torch.Tensor], name: str = "scores") -> None:
    for i, s in enumerate(scores):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name}[{i}] is {type(s).__name__}; expected a torch.Tensor")
        if s.dtype not in _SCORE_DTYPES:
            raise TypeError(
                f"{name}[{i}] has dtype {s.dtype}; accepted: float16, bfloat16, float32, float64"
            )


def _check_group(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    scores = list(scores)
    _check_scores(scores)
    check_int(k, "k", minimum=0, maximum=sum(s.numel() for s in scores))
    return scores


def prune_threshold(scores: Sequence[torch.Tensor], k: int, *, absolute: bool = False) -> PruneThreshold:
    """Exact cut of one comparison group made of ``scores`` so that exactly ``k`` are pruned.

    Raises ValueError when a score is NaN or inf.

    With ``absolute=True`` the key of each element is its magnitude, read straight from
    the tensor (no |W| copy is needed by compiled backends).
    """
    scores = _check_group(scores, k)
    return resolve("prune_threshold", scores, k, absolute)(scores, k, absolute)


def write_prune_mask(
    score: torch.Tensor, threshold: PruneThreshold, ties_left: int, *, absolute: bool = False, packed: bool = False
) -> tuple[torch.Tensor, int]:
    """Keep-mask of one tensor of a group cut at ``threshold``.

    ``ties_left`` is how many tied scores the group still has to prune; returns the mask
    and how many ties this tensor used, so a caller walks the group's tensors in order.
    ``packed=True`` returns the mask as ``ceil(n/8)`` uint8 bytes, least significant bit
    first (the packed mask file layout), without making the bool mask.
    """
    return resolve("write_prune_mask", score, threshold, ties_left, absolute, packed)(
        score, threshold, ties_left, absolute, packed
    )


def select_prune_mask(
    scores: Sequence[torch.Tensor], k: int, *, absolute: bool = False, pruned: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Keep-masks for a comparison group from which exactly the ``k`` lowest scores go.

    Ties at the cut are pruned lowest flat index first, tensors in the order given.
    ``pruned`` (int64, one entry per score tensor, on the scores' device) receives each mask's
    count of pruned weights, from the selection's own pass where the kernel can count there.
    """
    scores = _check_group(scores, k)
    if pruned is not None:
        if not isinstance(pruned, torch.Tensor) or pruned.dtype != torch.int64 or tuple(pruned.shape) != (len(scores),):
            raise TypeError(f"pruned must be an int64 tensor of shape ({len(scores)},); got {_describe(pruned)}")
    masks, counts = library.call(library.select_prune_mask, scores, k, absolute, pruned is not None)
    if pruned is not None:
        pruned.copy_(counts)
    return list(masks)


def _check_rows(score: torch.Tensor) -> None:
    _check_scores([score], "score")
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D (rows, cols), got shape {tuple(score.shape)}")


def nm_prune_mask(score: torch.Tensor, n: int, m: int, *, absolute: bool = False) -> torch.Tensor:
    """N:M keep-mask of a 2-D ``score``: in every run of ``m`` consecutive entries of a row
    the ``n`` highest are kept (``|score|`` with ``absolute=True``).

    Among equal scores the lower index is pruned first (a stable ascending sort). The
    row length must be a multiple of ``m``. Raises ValueError on NaN/inf scores.
    """
    _check_rows(score)
    check_nm(n, m)
    if score.shape[1] % m:
        raise ValueError(f"row length {score.shape[1]} is not a multiple of m={m}")
    return library.call(library.nm_prune_mask, score, n, m, bool(absolute))


def row_prune_mask(
    score: torch.Tensor, k: int, *, absolute: bool = False, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep-mask of a 2-D ``score`` pruning exactly the ``k`` lowest of every row.

    Ties go lowest index first (a stable ascending sort). ``prior`` (a bool keep-mask of
    the same shape): the weights it prunes are pruned first and count towards ``k``; a
    row where it prunes more than ``k`` is a ValueError, and so are NaN/inf scores among
    the weights it keeps.
    """
    _check_rows(score)
    check_int(k, "k", minimum=0, maximum=score.shape[1])
    if prior is not None:
        if not isinstance(prior, torch.Tensor) or prior.dtype != torch.bool or prior.shape != score.shape:
            raise ValueError(f"prior must be a bool tensor of shape {tuple(score.shape)}")
        prior = prior.to(score.device)
    return library.call(library.row_prune_mask, score, k, bool(absolute), prior)


def key_histogram(score: torch.Tensor, *, absolute: bool = False, high: int = -1) -> torch.Tensor:
    """65536-bin int64 histogram of the order-preserving 32-bit keys of ``score``.

    ``high=-1`` counts the high 16 bits of every key; ``high=h`` counts the low 16 bits of
    the keys whose high half is ``h``. Histograms of disjoint inputs add, so shards, files
    and ranks combine by summation. Raises ValueError on NaN/inf scores.
    """
    _check_scores([score], "score")
    check_int(high, "high", minimum=-1, maximum=65535)
    return library.call(library.key_histogram, score, absolute, high)


def streaming_threshold(
    histogram: Callable[[int], torch.Tensor], k: int, total: int, *, absolute: bool = False, bf16: bool = False
) -> PruneThreshold:
    """Exact cut pruning ``k`` of ``total`` scores that are never all in memory.

    ``histogram(high)`` must return the summed :func:`key_histogram` of every score of the
    group (read tensor by tensor, file by file, or all-reduced across ranks); it is called
    twice, so the scores are read twice. ``bf16=True`` (every score is bf16): once, since bf16
    keys have nothing in their low half (:func:`sparselora.ops.keys.streaming_cut`). With
    ``k=0`` it is still called once: NaN/inf are rejected whatever ``k`` is.
    """
    check_int(k, "k", minimum=0, maximum=total)
    return streaming_cut(histogram, k, absolute, bf16=bf16)


def _check_mask_for(weight: torch.Tensor, mask: torch.Tensor, name: str = "mask") -> None:
    check_keep_mask(mask, weight.shape, name)


def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries of ``weight`` in place (NaN and inf included).

    ``mask`` is a bool keep-mask of the weight's shape or its packed bits (uint8,
    ``ceil(n/8)`` bytes, least significant bit first).
    """
    _check_mask_for(weight, mask)
    with torch.no_grad():
        library.call(library.apply_mask_, weight, mask.to(weight.device))
    return weight


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_lora(weight, lora_A, lora_B, scaling) -> None:
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} must be (r, in) and (out, r)"
        )
    if weight is not None and tuple(weight.shape) != (lora_B.shape[0], lora_A.shape[1]):
        raise ValueError(
            f"weight {tuple(weight.shape)} does not match lora_B @ lora_A "
            f"({lora_B.shape[0]}, {lora_A.shape[1]})"
        )
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share one floating dtype "
            "(float32, float16, bfloat16 or float64)"
        )
    if weight is not None and weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight has dtype {weight.dtype}; accepted: float32, float16, bfloat16, float64")
    check_finite(scaling, "scaling")


def _check_compute_dtypes(dtype: torch.dtype, lora_A: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """x, weight and bias in one dtype; adapters in that dtype or in float32 (never a silent cast)."""
    for name, t in tensors.items():
        if t is not None and t.dtype != dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has {dtype}; x, weight and bias must share a dtype "
                "(SparseLoRALinear casts them under torch.autocast)"
            )
    if lora_A.dtype not in (dtype, torch.float32):
        raise TypeError(
            f"the adapters have dtype {lora_A.dtype}; with x in {dtype} they must be {dtype} or float32"
        )


def _check_norms_out(norms: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(norms, torch.Tensor) or norms.dtype != torch.float64 or tuple(norms.shape) != (3,):
        raise TypeError(f"norms must be a float64 tensor of shape (3,); got {_describe(norms)}")
    if norms.device != weight.device:
        raise ValueError(f"norms is on {norms.device}; the weight is on {weight.device}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def merge_lora_(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    *,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place ``W ← (W + scaling·B@A) ⊙ M`` with fp32 accumulation (no mask: dense merge).

    The adapters may be in any floating dtype; ``mask`` is bool or packed bits. ``norms`` (a
    float64 tensor of shape (3,) on the weight's device) receives, from the same pass,
    ``[‖(s·BA) ⊙ ¬M‖², ‖s·BA‖², ‖W + s·BA‖²]`` with W as it was before the merge (see
    :func:`lora_update_norms`).
    """
    _check_lora(weight, lora_A, lora_B, scaling)
    if mask is not None:
        _check_mask_for(weight, mask)
    if norms is not None:
        _check_norms_out(norms, weight)
    with torch.no_grad():
        library.call(library.merge_lora_, weight, lora_A.detach(), lora_B.detach(), float(scaling), mask, norms)
    return weight


def lora_update_norms(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """What a masked merge would drop, as float64 ``[‖(s·BA) ⊙ ¬M‖², ‖s·BA‖², ‖W + s·BA‖²]``
    (the first is 0 without a mask), in one read of the weight and no weight-sized temporary.
    Nothing is written."""
    _check_lora(weight, lora_A, lora_B, scaling)
    if mask is not None:
        _check_mask_for(weight, mask)
    with torch.no_grad():
        return library.call(library.lora_update_norms, weight, lora_A.detach(), lora_B.detach(), float(scaling), mask)


def masked_lora_weight(
    weight: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The effective weight ``(W + scaling·B@A) ⊙ M`` of a sparse_to_sparse layer.

    ``weight=None`` gives the masked delta alone. Differentiable in ``lora_A``/``lora_B``
    (and ``weight``). The result has the weight's dtype (the adapters' without one).
    """
    _check_lora(weight, lora_A, lora_B, scaling)
    check_keep_mask(mask, (lora_B.shape[0], lora_A.shape[1]))
    return library.masked_lora_weight(weight, lora_A, lora_B, float(scaling), mask)


def masked_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """``y = x·((W + scaling·B@A) ⊙ M)ᵀ + b``, differentiable in ``x``, ``lora_A``, ``lora_B``.

    ``x``, ``weight`` and ``bias`` share a dtype; the adapters are in it or in float32.
    ``transposed=True``: ``weight`` and ``mask`` are stored ``(in, out)`` as transformers'
    ``Conv1D`` keeps them (the adapters keep the ``nn.Linear`` convention).
    """
    _check_lora(None, lora_A, lora_B, scaling)
    out_features, in_features = lora_B.shape[0], lora_A.shape[1]
    stored = (in_features, out_features) if transposed else (out_features, in_features)
    if weight is not None and tuple(weight.shape) != stored:
        raise ValueError(f"weight {tuple(weight.shape)} does not match the adapters: expected {stored}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features; the layer takes {in_features}")
    _check_compute_dtypes(x.dtype, lora_A, weight=weight, bias=bias)
    check_keep_mask(mask, stored)
    return library.masked_lora_linear(x, weight, lora_A, lora_B, float(scaling), mask, bias, bool(transposed))
