"""Key histogram on Triton: 65536 bins of order-preserving 32-bit score keys.

Offsets and counts are 64-bit (more than 2^31 scores work). The bin updates are relaxed
atomics: only their sum matters, so no memory fence is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import register
from ._common import TRITON_PRIORITY, device_guard, triton_reason

__all__ = ["key_histogram", "score_keys"]

BLOCK = 1024


@triton.jit
def score_keys(x, ABSOLUTE: tl.constexpr):
    """Order-preserving keys (int32 holding uint32 bits) of fp32 values; -0 maps onto +0."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    if ABSOLUTE:
        return magnitude
    flipped = bits ^ ((bits >> 31) | -2147483648)  # negative: ~bits; positive: bits | sign
    return tl.where(magnitude == 0, -2147483648, flipped)


@triton.jit
def _histogram_kernel(
    x_ptr,  # scores, any float dtype, contiguous
    counts_ptr,  # int64[65537]: 65536 bins, then the count of NaN/inf scores
    n,  # number of scores
    high,  # -1: bin the high 16 bits; else bin the low 16 bits of keys whose high half is `high`
    ABSOLUTE: tl.constexpr,  # key of |x| instead of x
    BLOCK: tl.constexpr,  # scores per program
):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    at = tl.arange(0, BLOCK)
    valid = at < tl.minimum(n - base, BLOCK).to(tl.int32)
    x = tl.load(x_ptr + base + at, mask=valid, other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    nonfinite = valid & ((bits & 0x7F800000) == 0x7F800000)
    key = score_keys(x, ABSOLUTE)
    top = (key >> 16) & 0xFFFF
    one = tl.full((BLOCK,), 1, tl.int64)
    if high < 0:
        tl.atomic_add(counts_ptr + top, one, mask=valid, sem="relaxed")
    else:
        tl.atomic_add(counts_ptr + (key & 0xFFFF), one, mask=valid & (top == high), sem="relaxed")
    tl.atomic_add(counts_ptr + 65536, tl.sum(nonfinite.to(tl.int64), axis=0), sem="relaxed")


def histogram_counts(score: torch.Tensor, absolute: bool, high: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """The 65536 bins and the NaN/inf count (int64, on the score's device), added ``into``
    an earlier tensor's counts when given."""
    flat = score.detach().contiguous().reshape(-1)
    counts = torch.zeros(65537, dtype=torch.int64, device=flat.device) if into is None else into
    if flat.numel():
        with device_guard(flat):
            _histogram_kernel[(triton.cdiv(flat.numel(), BLOCK),)](flat, counts, flat.numel(), high,
                                                                 ABSOLUTE=absolute, BLOCK=BLOCK)
    return counts


def _reason(score, absolute, high):
    return triton_reason(score)


@register("key_histogram", "triton", priority=TRITON_PRIORITY, check=_reason)
def key_histogram(score: torch.Tensor, absolute: bool, high: int) -> torch.Tensor:
    counts = histogram_counts(score, absolute, high).cpu()  # one device-to-host copy
    if int(counts[65536]):
        raise ValueError(f"scores contain {int(counts[65536])} NaN or inf values; scores must be finite")
    return counts[:65536]
