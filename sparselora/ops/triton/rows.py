"""N:M and per-row selection on Triton, exact and equal to the stable-sort reference.

N:M: each run of ``m`` scores (padded to a power of two) ranks its members against one
another; a score's place in the stable ascending order is the number of lower scores plus
the equal ones at a lower index, and the ``m - n`` first places are pruned.

Rows: one program per row finds the k-th lowest key by bisection over the 32-bit keys
(32 counting passes over the row, which stays in cache), then one pass prunes the keys
below it and the first tied keys in index order. Weights that ``prior`` already prunes
count as lower than every score.
"""

import torch
import triton
import triton.language as tl

from .._dispatch import register
from .._types import raise_nonfinite
from ..reference import check_prior_rows
from ._common import TRITON_PRIORITY, device_guard, keep_bytes, triton_reason
from .histogram import score_keys

__all__ = ["nm_prune_mask", "row_prune_mask"]

NM_SCORES = 2048  # run-by-run comparisons per program: BLOCK * M_PAD * M_PAD
ROW_BLOCK = 1024  # scores of a row per step


@triton.jit
def _ordered(x, ABSOLUTE: tl.constexpr):
    """int32 keys whose signed order is the scores' order; INT_MIN is below every finite score."""
    key = score_keys(x, ABSOLUTE)
    if ABSOLUTE:
        return key  # |x|'s bits: already non-negative and ordered
    return key ^ -2147483648  # unsigned order as signed: -inf lands at INT_MIN + 2^23 - 1


@triton.jit
def _nm_kernel(
    x_ptr,  # scores (runs * m), contiguous
    keep_ptr,  # uint8 keep-mask out
    bad_ptr,  # int64[1]: NaN/inf scores seen
    runs, m,  # number of runs, run length
    prune,  # scores pruned per run (m - n)
    M_PAD: tl.constexpr, ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * BLOCK
    run = tl.arange(0, BLOCK)
    j = tl.arange(0, M_PAD)
    inside = (run[:, None] < tl.minimum(runs - first, BLOCK).to(tl.int32)) & (j[None, :] < m)
    at = run[:, None] * m + j[None, :]
    x = tl.load(x_ptr + first * m + at, mask=inside, other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    nonfinite = inside & ((bits & 0x7F800000) == 0x7F800000)
    tl.atomic_add(bad_ptr, tl.sum(tl.sum(nonfinite.to(tl.int32), axis=1), axis=0).to(tl.int64), sem="relaxed")
    key = tl.where(inside, _ordered(x, ABSOLUTE), 2147483647)  # padding sorts last
    mine = key[:, :, None]  # (BLOCK, M_PAD, 1): the score being placed
    other = key[:, None, :]  # (BLOCK, 1, M_PAD): every member of its run
    earlier = (j[None, None, :] < j[None, :, None])
    ahead = (other < mine) | ((other == mine) & earlier)
    place = tl.sum(ahead.to(tl.int32), axis=2)
    tl.store(keep_ptr + first * m + at, (place >= prune).to(tl.uint8), mask=inside)


@triton.jit
def _row_key(x_ptr, prior_ptr, at, inside, ABSOLUTE: tl.constexpr, HAS_PRIOR: tl.constexpr):
    key = _ordered(tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32), ABSOLUTE)
    if HAS_PRIOR:
        live = tl.load(prior_ptr + at, mask=inside, other=1) != 0
        key = tl.where(live, key, -2147483648)  # below every score: pruned first
    return key


@triton.jit
def _row_kernel(
    x_ptr,  # scores (rows, cols), contiguous
    prior_ptr,  # uint8 keep-mask of earlier pruning (ignored unless HAS_PRIOR)
    keep_ptr,  # uint8 keep-mask out
    bad_ptr,  # int64[1]: NaN/inf scores among the weights prior keeps
    cols, k,  # row length, scores pruned per row
    ABSOLUTE: tl.constexpr, HAS_PRIOR: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * cols
    x_row, keep_row = x_ptr + row, keep_ptr + row
    prior_row = prior_ptr + row
    offs = tl.arange(0, BLOCK)
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    for c0 in range(0, cols, BLOCK):
        inside = c0 + offs < cols
        x = tl.load(x_row + c0 + offs, mask=inside, other=0.0).to(tl.float32)
        flagged = inside & ((x.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000)
        if HAS_PRIOR:
            flagged = flagged & (tl.load(prior_row + c0 + offs, mask=inside, other=1) != 0)
        bad += flagged.to(tl.int32)
    tl.atomic_add(bad_ptr, tl.sum(bad, axis=0).to(tl.int64), sem="relaxed")
    # the cut: the lowest key c with at least k keys <= c (bisection on int64 scalars)
    lo = tl.full((), -2147483648, tl.int64)
    hi = tl.full((), 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        mid32 = mid.to(tl.int32)
        count = tl.zeros((BLOCK,), dtype=tl.int32)
        for c0 in range(0, cols, BLOCK):
            inside = c0 + offs < cols
            key = _row_key(x_row, prior_row, c0 + offs, inside, ABSOLUTE, HAS_PRIOR)
            count += (inside & (key <= mid32)).to(tl.int32)
        enough = tl.sum(count, axis=0) >= k
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid + 1)
    cut = lo.to(tl.int32)
    below = tl.zeros((BLOCK,), dtype=tl.int32)
    for c0 in range(0, cols, BLOCK):
        inside = c0 + offs < cols
        key = _row_key(x_row, prior_row, c0 + offs, inside, ABSOLUTE, HAS_PRIOR)
        below += (inside & (key < cut)).to(tl.int32)
    ties_left = k - tl.sum(below, axis=0)
    ties_seen = tl.zeros((), dtype=tl.int32)
    for c0 in range(0, cols, BLOCK):
        inside = c0 + offs < cols
        key = _row_key(x_row, prior_row, c0 + offs, inside, ABSOLUTE, HAS_PRIOR)
        tie = (inside & (key == cut)).to(tl.int32)
        rank = ties_seen + tl.cumsum(tie, axis=0) - tie
        pruned = (key < cut) | ((tie != 0) & (rank < ties_left))
        tl.store(keep_row + c0 + offs, 1 - pruned.to(tl.uint8), mask=inside)
        ties_seen += tl.sum(tie, axis=0)


def nm_block(m_pad: int) -> int:
    """Runs per program for runs padded to ``m_pad``."""
    return max(1, NM_SCORES // (m_pad * m_pad))


def _rows_reason(score, *args):
    prior = args[-1] if args and isinstance(args[-1], torch.Tensor) else None
    return triton_reason(score, prior)


@register("nm_prune_mask", "triton", priority=TRITON_PRIORITY, check=_rows_reason)
def nm_prune_mask(score: torch.Tensor, n: int, m: int, absolute: bool) -> torch.Tensor:
    flat = score.detach().contiguous()
    keep = torch.empty(score.shape, dtype=torch.uint8, device=flat.device)
    bad = torch.zeros(1, dtype=torch.int64, device=flat.device)
    runs = flat.numel() // m if m else 0
    if runs:
        m_pad = triton.next_power_of_2(m)
        block = nm_block(m_pad)
        with device_guard(flat):
            _nm_kernel[(triton.cdiv(runs, block),)](flat, keep, bad, runs, m, m - n, M_PAD=m_pad,
                                                    ABSOLUTE=absolute, BLOCK=block)
    raise_nonfinite(int(bad.item()))
    return keep.view(torch.bool)


@register("row_prune_mask", "triton", priority=TRITON_PRIORITY, check=_rows_reason)
def row_prune_mask(score: torch.Tensor, k: int, absolute: bool, prior: torch.Tensor | None) -> torch.Tensor:
    flat = score.detach().contiguous()
    rows, cols = flat.shape
    live = None
    if prior is not None:
        check_prior_rows(prior, k)
        live = keep_bytes(prior, (rows, cols))
    keep = torch.empty((rows, cols), dtype=torch.uint8, device=flat.device)
    bad = torch.zeros(1, dtype=torch.int64, device=flat.device)
    if rows and cols:
        with device_guard(flat):
            _row_kernel[(rows,)](flat, live if live is not None else keep, keep, bad, cols, k,
                                 ABSOLUTE=absolute, HAS_PRIOR=live is not None, BLOCK=ROW_BLOCK)
    raise_nonfinite(int(bad.item()))
    return keep.view(torch.bool)
