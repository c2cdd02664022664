"""Key histogram on Triton: 65536 bins of order-preserving 32-bit score keys.

One launch covers a whole group of tensors of one dtype: the kernel reads a table of their
addresses and sizes (a 2-D grid of blocks × tensors), so a model's worth of weights costs
one launch per pass, not one per tensor. Offsets and counts are 64-bit (more than 2^31
scores work). The bin updates are relaxed atomics: only their sum matters, so no memory
fence is needed.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .._dispatch import register
from ._common import TRITON_PRIORITY, device_guard, triton_reason

__all__ = ["key_histogram", "score_keys", "histogram_counts", "TensorTable", "TL_DTYPES"]

BLOCK = 1024
MAX_TENSORS = 65535  # the grid's second dimension: tensors per launch
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


class TensorTable:
    """Flat views of same-dtype tensors and, on their device, a table of their addresses and sizes."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.flats = [t.detach().contiguous().reshape(-1) for t in tensors]  # kept alive for the kernels
        device = self.flats[0].device
        self.sizes = [f.numel() for f in self.flats]
        self.addresses = torch.tensor([f.data_ptr() for f in self.flats], dtype=torch.int64, device=device)
        self.numels = torch.tensor(self.sizes, dtype=torch.int64, device=device)
        self.blocks = triton.cdiv(max(self.sizes, default=0), BLOCK)  # blocks of the largest tensor
        self.dtype = TL_DTYPES[self.flats[0].dtype]
        self.device = device

    def grid(self) -> tuple[int, int]:
        return (self.blocks, len(self.flats))


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
def load_block(addresses_ptr, numels_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of its tensor: (scores as fp32, in-range lanes, tensor, block start)."""
    tensor = tl.program_id(1).to(tl.int64)
    base = tl.program_id(0).to(tl.int64) * BLOCK
    x_ptr = tl.load(addresses_ptr + tensor).to(tl.pointer_type(DTYPE))
    at = tl.arange(0, BLOCK)
    valid = at < tl.maximum(tl.minimum(tl.load(numels_ptr + tensor) - base, BLOCK), 0).to(tl.int32)
    x = tl.load(x_ptr + base + at, mask=valid, other=0.0).to(tl.float32)
    return x, valid, tensor, base


@triton.jit
def _histogram_kernel(
    addresses_ptr,  # int64[tensors]: each tensor's address (same dtype, contiguous)
    numels_ptr,  # int64[tensors]: each tensor's size
    counts_ptr,  # int64[65537]: 65536 bins, then the count of NaN/inf scores
    high,  # -1: bin the high 16 bits; else bin the low 16 bits of keys whose high half is `high`
    DTYPE: tl.constexpr,  # the tensors' element type
    ABSOLUTE: tl.constexpr,  # key of |x| instead of x
    BLOCK: tl.constexpr,  # scores per program
):
    x, valid, _tensor, _base = load_block(addresses_ptr, numels_ptr, DTYPE, BLOCK)
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


def histogram_counts(scores: Sequence[torch.Tensor], absolute: bool, high: int) -> torch.Tensor:
    """The 65536 bins and the NaN/inf count (int64, on the scores' device) of a group of
    tensors, one launch per dtype among them."""
    counts = torch.zeros(65537, dtype=torch.int64, device=scores[0].device if scores else "cpu")
    for dtype in dict.fromkeys(s.dtype for s in scores):
        same = [s for s in scores if s.dtype == dtype]
        for start in range(0, len(same), MAX_TENSORS):
            table = TensorTable(same[start : start + MAX_TENSORS])
            if not table.blocks:
                continue
            with device_guard(counts):
                _histogram_kernel[table.grid()](table.addresses, table.numels, counts, high, DTYPE=table.dtype,
                                                ABSOLUTE=absolute, BLOCK=BLOCK)
    return counts


def _reason(score, absolute, high):
    return triton_reason(score)


@register("key_histogram", "triton", priority=TRITON_PRIORITY, check=_reason)
def key_histogram(score: torch.Tensor, absolute: bool, high: int) -> torch.Tensor:
    counts = histogram_counts([score], absolute, high).cpu()  # one device-to-host copy
    if int(counts[65536]):
        raise ValueError(f"scores contain {int(counts[65536])} NaN or inf values; scores must be finite")
    return counts[:65536]
