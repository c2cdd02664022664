"""Key histogram on Triton: 65536 bins of order-preserving 32-bit score keys.

One launch covers a whole group of tensors of one dtype: the kernel reads a table of their
places, as element offsets from the first tensor, and sizes (a 2-D grid of blocks × tensors), so a model's worth of weights costs
one launch per pass, not one per tensor. Offsets and counts are 64-bit (more than 2^31
scores work). The bin updates are relaxed atomics: only their sum matters, so no memory
fence is needed.
"""

from typing import Sequence

import torch
import triton
import triton.language as tl

from .._dispatch import register
from .._types import raise_nonfinite
from ._common import TRITON_PRIORITY, device_guard, triton_reason

__all__ = ["key_histogram", "score_keys", "histogram_counts", "TensorTable", "offsets_from"]

BLOCK = 1024
MAX_TENSORS = 65535  # the grid's second dimension: tensors per launch


def offsets_from(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Where each same-dtype tensor starts, in elements from the first one (int64, on their
    device): the first tensor's pointer plus an offset reaches every other, with no integer
    to pointer casts in the kernels."""
    size = tensors[0].element_size()
    first = tensors[0].data_ptr()
    gaps = [t.data_ptr() - first for t in tensors]
    if any(gap % size for gap in gaps):  # torch places elements on multiples of their size
        raise ValueError("tensors of one dtype must start on whole elements of each other")
    return torch.tensor([gap // size for gap in gaps], dtype=torch.int64, device=tensors[0].device)


class TensorTable:
    """Flat views of same-dtype tensors and, on their device, a table of their offsets and sizes."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.flats = [t.detach().contiguous().reshape(-1) for t in tensors]  # kept alive for the kernels
        self.first = self.flats[0]
        self.device = self.first.device
        self.sizes = [f.numel() for f in self.flats]
        self.offsets = offsets_from(self.flats)
        self.numels = torch.tensor(self.sizes, dtype=torch.int64, device=self.device)
        self.blocks = triton.cdiv(max(self.sizes, default=0), BLOCK)  # blocks of the largest tensor

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
def load_block(first_ptr, offsets_ptr, numels_ptr, BLOCK: tl.constexpr):
    """This program's block of its tensor: (scores as fp32, in-range lanes, tensor, block start)."""
    tensor = tl.program_id(1).to(tl.int64)
    base = tl.program_id(0).to(tl.int64) * BLOCK
    x_ptr = first_ptr + tl.load(offsets_ptr + tensor)
    at = tl.arange(0, BLOCK)
    valid = at < tl.maximum(tl.minimum(tl.load(numels_ptr + tensor) - base, BLOCK), 0).to(tl.int32)
    x = tl.load(x_ptr + base + at, mask=valid, other=0.0).to(tl.float32)
    return x, valid, tensor, base


@triton.jit
def _histogram_kernel(
    first_ptr,  # the group's first tensor (same dtype, contiguous)
    offsets_ptr,  # int64[tensors]: where each tensor starts, in elements from the first
    numels_ptr,  # int64[tensors]: each tensor's size
    counts_ptr,  # int64[65537]: 65536 bins, then the count of NaN/inf scores
    high,  # -1: bin the high 16 bits; else bin the low 16 bits of keys whose high half is `high`
    ABSOLUTE: tl.constexpr,  # key of |x| instead of x
    BLOCK: tl.constexpr,  # scores per program
):
    x, valid, _tensor, _base = load_block(first_ptr, offsets_ptr, numels_ptr, BLOCK)
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
                _histogram_kernel[table.grid()](table.first, table.offsets, table.numels, counts, high,
                                                ABSOLUTE=absolute, BLOCK=BLOCK)
    return counts


def _reason(score, absolute, high):
    return triton_reason(score)


@register("key_histogram", "triton", priority=TRITON_PRIORITY, check=_reason)
def key_histogram(score: torch.Tensor, absolute: bool, high: int) -> torch.Tensor:
    counts = histogram_counts([score], absolute, high).cpu()  # one device-to-host copy
    raise_nonfinite(int(counts[65536]))
    return counts[:65536]
