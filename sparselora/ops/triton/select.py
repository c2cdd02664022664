"""Exact selection on Triton: the cut from two key histograms of the whole group (one for
bf16 scores, whose keys have nothing in their low half), copied to the host once per pass;
then one launch writes every mask of the group, holding the scores tied with the cut as 2s,
and one more settles them, lowest flat index first in group order, touching only the
blocks that hold ties. Each kernel reads a table of where the tensors start, so the launches
do not grow with the number of tensors."""

from typing import Sequence

import torch
import triton
import triton.language as tl

from .._dispatch import register
from .._types import PruneThreshold, masks_under_threshold, raise_nonfinite
from ..keys import key_of, streaming_cut
from ..masks import pack_bits
from ._common import TRITON_PRIORITY, device_guard, triton_reason
from .histogram import BLOCK, MAX_TENSORS, TensorTable, histogram_counts, load_block, offsets_from, score_keys

__all__ = ["prune_threshold", "write_prune_mask", "select_prune_mask"]

_INT_MIN = -(2**31)


@triton.jit
def _write_mask_kernel(
    first_ptr,  # the group's first score tensor (same dtype, contiguous)
    offsets_ptr,  # int64[tensors]: where each score tensor starts, in elements from the first
    numels_ptr,  # int64[tensors]: each tensor's size
    first_keep_ptr,  # the first uint8 mask: 1 kept, 0 pruned, 2 tied with the cut
    keep_offsets_ptr,  # int64[tensors]: where each mask starts, in bytes from the first
    ties_ptr,  # int32[tensors, blocks] out: scores equal to the cut in each block
    blocks,  # blocks of the largest tensor (the grid's first dimension)
    cut_flipped,  # the cut's key with its top bit flipped: unsigned order as signed int32
    cut,  # the cut's key, as int32 bits
    ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    x, valid, tensor, base = load_block(first_ptr, offsets_ptr, numels_ptr, BLOCK)
    key = score_keys(x, ABSOLUTE)
    below = (key ^ -2147483648) < cut_flipped
    tie = valid & (key == cut)
    keep_ptr = first_keep_ptr + tl.load(keep_offsets_ptr + tensor)
    at = tl.arange(0, BLOCK)
    tl.store(keep_ptr + base + at, tl.where(tie, 2, 1 - below.to(tl.uint8)).to(tl.uint8), mask=valid)
    tl.store(ties_ptr + tensor * blocks + tl.program_id(0).to(tl.int64), tl.sum(tie.to(tl.int32), axis=0))


@triton.jit
def _settle_ties_kernel(
    numels_ptr,  # int64[tensors]: each tensor's size
    first_keep_ptr,  # the masks from _write_mask_kernel, settled in place: the first one
    keep_offsets_ptr,  # int64[tensors]: where each mask starts, in bytes from the first
    ties_ptr,  # int32[tensors, blocks]: ties in each block
    ties_before_ptr,  # int64[tensors, blocks]: ties in earlier blocks of the group, tensor by tensor
    blocks,  # blocks of the largest tensor
    ties_left,  # how many tied scores the group may prune, first in flat order
    BLOCK: tl.constexpr,
):
    tensor = tl.program_id(1).to(tl.int64)
    base = tl.program_id(0).to(tl.int64) * BLOCK
    slot = tensor * blocks + tl.program_id(0).to(tl.int64)
    at = tl.arange(0, BLOCK)
    # blocks without ties touch no memory: their loads and stores are masked off
    size = tl.maximum(tl.minimum(tl.load(numels_ptr + tensor) - base, BLOCK), 0)
    live = at < tl.where(tl.load(ties_ptr + slot) > 0, size, 0).to(tl.int32)
    keep_ptr = first_keep_ptr + tl.load(keep_offsets_ptr + tensor)
    tie = tl.load(keep_ptr + base + at, mask=live, other=0) == 2
    rank = tl.load(ties_before_ptr + slot) + tl.cumsum(tie.to(tl.int64), axis=0) - tie.to(tl.int64)
    tl.store(keep_ptr + base + at, 1 - (rank < ties_left).to(tl.uint8), mask=live & tie)


def _kernel_key(value: float, absolute: bool) -> int:
    """The key of ``value`` as the kernels hold it: its uint32 bits in a signed int32."""
    key = key_of(value, absolute)
    return key - 2**32 if key >= 2**31 else key


def _scores_reason(scores, *_args):
    return triton_reason(*scores)


def _group_histogram(scores: Sequence[torch.Tensor], absolute: bool, high: int) -> torch.Tensor:
    """The group's 65536-bin key histogram on the host (one copy per pass for the whole
    group); NaN/inf scores are refused."""
    counts = histogram_counts(scores, absolute, high).cpu()
    raise_nonfinite(int(counts[65536]))
    return counts[:65536]


@register("prune_threshold", "triton", priority=TRITON_PRIORITY, check=_scores_reason)
def prune_threshold(scores: Sequence[torch.Tensor], k: int, absolute: bool) -> PruneThreshold:
    # bf16 keys have nothing in their low half: one histogram pass finds the cut
    bf16 = bool(scores) and all(s.dtype == torch.bfloat16 for s in scores)
    return streaming_cut(lambda high: _group_histogram(scores, absolute, high), k, absolute, bf16=bf16)


def _write_reason(score, *_args):
    return triton_reason(score)


def _write_masks(scores: Sequence[torch.Tensor], threshold: PruneThreshold, ties_left: int,
                 absolute: bool) -> tuple[list[torch.Tensor], int]:
    """Keep-masks of same-dtype ``scores`` in one launch (and one to settle the ties); the
    first ``ties_left`` tied scores in group order are pruned. Returns (masks, ties used)."""
    table = TensorTable(scores)
    keeps = [torch.empty(n, dtype=torch.uint8, device=table.device) for n in table.sizes]
    used = 0
    if table.blocks:
        cut = _kernel_key(threshold.value, absolute)
        keep_offsets = offsets_from(keeps)
        ties = torch.zeros(len(keeps), table.blocks, dtype=torch.int32, device=table.device)
        with device_guard(ties):
            # one read of the scores; the ties wait in the masks as 2s, then only their blocks are revisited
            _write_mask_kernel[table.grid()](table.first, table.offsets, table.numels, keeps[0], keep_offsets, ties,
                                             table.blocks, cut ^ _INT_MIN, cut, ABSOLUTE=absolute, BLOCK=BLOCK)
            before = torch.cumsum(ties.reshape(-1), 0, dtype=torch.int64) - ties.reshape(-1)
            _settle_ties_kernel[table.grid()](table.numels, keeps[0], keep_offsets, ties, before, table.blocks, ties_left,
                                              BLOCK=BLOCK)
        used = min(int(ties.sum()), ties_left)
    return [k.view(torch.bool).reshape(s.shape) for k, s in zip(keeps, scores)], used


@register("write_prune_mask", "triton", priority=TRITON_PRIORITY, check=_write_reason)
def write_prune_mask(
    score: torch.Tensor, threshold: PruneThreshold, ties_left: int, absolute: bool, packed: bool = False
) -> tuple[torch.Tensor, int]:
    if threshold.value == float("-inf"):
        keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)
        return (pack_bits(keep.cpu()) if packed else keep), 0
    (mask,), used = _write_masks([score], threshold, ties_left, absolute)
    # packed bytes are for mask files: on the CPU, as every backend returns them
    return (pack_bits(mask.cpu()) if packed else mask), used


@register("select_prune_mask", "triton", priority=TRITON_PRIORITY, check=_scores_reason)
def select_prune_mask(
    scores: Sequence[torch.Tensor], k: int, absolute: bool, pruned: torch.Tensor | None = None
) -> list[torch.Tensor]:
    # ``pruned`` is left as given: the op counts what a backend's own pass did not
    threshold = prune_threshold(scores, k, absolute)
    if threshold.value == float("-inf") or len({s.dtype for s in scores}) > 1 or len(scores) > MAX_TENSORS:
        return masks_under_threshold(scores, threshold, write_prune_mask, absolute)
    return _write_masks(scores, threshold, threshold.ties, absolute)[0]
