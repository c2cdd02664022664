"""Key histogram on Triton: 65536 bins of order-preserving 32-bit score keys, by atomics."""

import torch
import triton
import triton.language as tl

from .._dispatch import register
from ._common import TRITON_PRIORITY, triton_reason

__all__ = ["key_histogram"]

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
    counts_ptr,  # int32[65537]: 65536 bins, then the count of NaN/inf scores
    n,  # number of scores
    high,  # -1: bin the high 16 bits; else bin the low 16 bits of keys whose high half is `high`
    ABSOLUTE: tl.constexpr,  # key of |x| instead of x
    BLOCK: tl.constexpr,  # scores per program
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    nonfinite = valid & ((bits & 0x7F800000) == 0x7F800000)
    key = score_keys(x, ABSOLUTE)
    top = (key >> 16) & 0xFFFF
    if high < 0:
        tl.atomic_add(counts_ptr + top, 1, mask=valid)
    else:
        tl.atomic_add(counts_ptr + (key & 0xFFFF), 1, mask=valid & (top == high))
    tl.atomic_add(counts_ptr + 65536, tl.sum(nonfinite.to(tl.int32), axis=0))


def _reason(score, absolute, high):
    return triton_reason(score)


@register("key_histogram", "triton", priority=TRITON_PRIORITY, check=_reason)
def key_histogram(score: torch.Tensor, absolute: bool, high: int) -> torch.Tensor:
    flat = score.detach().contiguous().reshape(-1)
    if flat.numel() >= 2**31:
        raise ValueError("the Triton histogram counts in int32: pass tensors of fewer than 2^31 scores")
    counts = torch.zeros(65537, dtype=torch.int32, device=flat.device)
    if flat.numel():
        _histogram_kernel[(triton.cdiv(flat.numel(), BLOCK),)](flat, counts, flat.numel(), high, ABSOLUTE=absolute, BLOCK=BLOCK)
    if int(counts[65536]):
        raise ValueError(f"scores contain {int(counts[65536])} NaN or inf values; scores must be finite")
    return counts[:65536].to(torch.int64).cpu()
