"""Exact selection on Triton: the cut from two summed key histograms (one for bf16 scores,
whose keys have nothing in their low half), then the mask writer (ties pruned lowest flat
index first, as everywhere else). The group's histograms are summed on the device and copied
to the host once per pass."""

import struct
from typing import Sequence

import torch
import triton
import triton.language as tl

from .. import reference
from .._dispatch import register
from .._types import PruneThreshold, masks_under_threshold
from ._common import TRITON_PRIORITY, device_guard, triton_reason
from .histogram import histogram_counts, score_keys

__all__ = ["prune_threshold", "write_prune_mask", "select_prune_mask"]

BLOCK = 1024
_INT_MIN = -(2**31)


@triton.jit
def _write_mask_kernel(
    x_ptr,  # scores
    keep_ptr,  # uint8 mask out: 1 kept, 0 pruned, 2 tied with the cut (settled by _settle_ties_kernel)
    ties_ptr,  # int32[programs] out: scores equal to the cut in each block
    n,  # number of scores
    cut_flipped,  # the cut's key with its top bit flipped: unsigned order as signed int32
    cut,  # the cut's key, as int32 bits
    ABSOLUTE: tl.constexpr,  # keys of |x|
    BLOCK: tl.constexpr,  # scores per program
):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * BLOCK
    at = tl.arange(0, BLOCK)
    valid = at < tl.minimum(n - base, BLOCK).to(tl.int32)
    key = score_keys(tl.load(x_ptr + base + at, mask=valid, other=0.0), ABSOLUTE)
    below = (key ^ -2147483648) < cut_flipped
    tie = valid & (key == cut)
    tl.store(keep_ptr + base + at, tl.where(tie, 2, 1 - below.to(tl.uint8)).to(tl.uint8), mask=valid)
    tl.store(ties_ptr + pid, tl.sum(tie.to(tl.int32), axis=0))


@triton.jit
def _settle_ties_kernel(
    keep_ptr,  # uint8 mask from _write_mask_kernel, settled in place
    ties_ptr,  # int32[programs]: ties in each block
    ties_before_ptr,  # int64[programs]: ties in earlier blocks (exclusive prefix sum)
    n,  # number of scores
    ties_left,  # how many tied scores this tensor may prune, first in flat order
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * BLOCK
    at = tl.arange(0, BLOCK)
    # blocks without ties touch no memory: their loads and stores are masked off
    limit = tl.where(tl.load(ties_ptr + pid) > 0, tl.minimum(n - base, BLOCK), 0).to(tl.int32)
    live = at < limit
    tie = tl.load(keep_ptr + base + at, mask=live, other=0) == 2
    rank = tl.load(ties_before_ptr + pid) + tl.cumsum(tie.to(tl.int64), axis=0) - tie.to(tl.int64)
    tl.store(keep_ptr + base + at, 1 - (rank < ties_left).to(tl.uint8), mask=live & tie)


def _key_of(value: float, absolute: bool) -> int:
    """The cut's key as a signed int32 (same bits as the kernels' keys)."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    key = bits & 0x7FFFFFFF if absolute else (0x80000000 if bits & 0x7FFFFFFF == 0 else bits ^ (0xFFFFFFFF if bits >> 31 else 0x80000000))
    return key - 2**32 if key >= 2**31 else key


def _scores_reason(scores, *_args):
    return triton_reason(*scores)


def _low_half_of_bf16(high_counts: torch.Tensor, high: int, absolute: bool) -> torch.Tensor:
    """The second-pass histogram of bf16 scores, known without reading them again: a bf16
    value's key has 0 in its low 16 bits, or 0xFFFF for a negative value's flipped key."""
    low = torch.zeros(65536, dtype=torch.int64)
    low[0xFFFF if (not absolute and high < 0x8000) else 0] = high_counts[high]
    return low


def _group_histogram(scores: Sequence[torch.Tensor], absolute: bool, high: int) -> torch.Tensor:
    counts = None
    for s in scores:
        counts = histogram_counts(s, absolute, high, into=counts)
    counts = counts.cpu()  # one copy per pass for the whole group
    if int(counts[65536]):
        raise ValueError(f"scores contain {int(counts[65536])} NaN or inf values; scores must be finite")
    return counts[:65536]


@register("prune_threshold", "triton", priority=TRITON_PRIORITY, check=_scores_reason)
def prune_threshold(scores: Sequence[torch.Tensor], k: int, absolute: bool) -> PruneThreshold:
    from .. import streaming_threshold

    total = sum(s.numel() for s in scores)
    first: list[torch.Tensor] = []
    one_pass = bool(scores) and all(s.dtype == torch.bfloat16 for s in scores)

    def histogram(high: int) -> torch.Tensor:
        if high >= 0 and one_pass:
            return _low_half_of_bf16(first[0], high, absolute)
        counts = _group_histogram(scores, absolute, high)
        first.append(counts)
        return counts

    return streaming_threshold(histogram, k, total, absolute=absolute)


def _write_reason(score, *_args):
    return triton_reason(score)


@register("write_prune_mask", "triton", priority=TRITON_PRIORITY, check=_write_reason)
def write_prune_mask(
    score: torch.Tensor, threshold: PruneThreshold, ties_left: int, absolute: bool, packed: bool = False
) -> tuple[torch.Tensor, int]:
    if threshold.value == float("-inf"):
        keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)
        return (reference._pack(keep) if packed else keep), 0
    flat = score.detach().contiguous().reshape(-1)
    n = flat.numel()
    keep = torch.empty(n, dtype=torch.uint8, device=flat.device)
    used = 0
    if n:
        programs = triton.cdiv(n, BLOCK)
        cut = _key_of(threshold.value, absolute)
        ties = torch.empty(programs, dtype=torch.int32, device=flat.device)
        with device_guard(flat):
            # one read of the scores; the ties wait in the mask as 2s, then only their blocks are revisited
            _write_mask_kernel[(programs,)](flat, keep, ties, n, cut ^ _INT_MIN, cut, ABSOLUTE=absolute, BLOCK=BLOCK)
            before = torch.cumsum(ties, 0, dtype=torch.int64) - ties
            _settle_ties_kernel[(programs,)](keep, ties, before, n, ties_left, BLOCK=BLOCK)
        used = min(int(ties.sum()), ties_left)
    mask = keep.view(torch.bool).reshape(score.shape)
    return (reference._pack(mask) if packed else mask), used


@register("select_prune_mask", "triton", priority=TRITON_PRIORITY, check=_scores_reason)
def select_prune_mask(scores: Sequence[torch.Tensor], k: int, absolute: bool) -> list[torch.Tensor]:
    return masks_under_threshold(scores, prune_threshold(scores, k, absolute), write_prune_mask, absolute)
