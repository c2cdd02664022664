"""Order-preserving integer keys of float scores, and the exact cut found from their histograms.

This is the one host-side codec: the reference backend, the Triton launchers, the ops'
public functions and the streaming masks all use it. (The C++ kernels and the bodies of the
Triton kernels compute the same keys in their own languages; tests/ops/test_ops_keys.py holds
the kernels' histograms to :func:`order_keys`.)

A key is a 32-bit unsigned integer (held in an int64 tensor or a Python int) made from a
score's fp32 bits, so that integer order is score order:

* ``absolute=False``: a negative score's key is its bits inverted, any other score's is its
  bits with the sign bit set; -0 and +0 share the key ``0x80000000``.
* ``absolute=True``: the key of ``|x|``, the bits without the sign bit (-0 and +0 give 0).

fp16 and bf16 scores are exact in fp32; fp64 scores are rounded to fp32 first (nearest even),
so two fp64 scores may share a key. ±inf get the extreme keys of the finite order. NaN has no
order: every op refuses NaN scores before it relies on keys; the codec maps a NaN by its bits,
beyond +inf when its sign bit is clear and below -inf when it is set (above inf with
``absolute=True``).

The cut of a group that never sits in memory at once comes from two 65536-bin histograms of
its keys (:func:`streaming_cut`): the high 16 bits, then the low 16 bits inside the bucket
holding the k-th key. Histograms of disjoint inputs add, so files and ranks combine by
summation. bf16 keys carry nothing in their low half, so their second histogram is known
from the first.
"""

from __future__ import annotations

import struct
from typing import Callable, Sequence

import torch

from ._types import PruneThreshold

__all__ = ["order_keys", "key_of", "value_of", "streaming_cut", "tie_count", "tie_quotas"]

_SIGN = 0x80000000
_MAGNITUDE = 0x7FFFFFFF
_BINS = 65536


def order_keys(score: torch.Tensor, absolute: bool) -> torch.Tensor:
    """The keys of ``score``'s values, flattened: uint32 values in an int64 tensor on its device."""
    bits = score.detach().float().reshape(-1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if absolute:
        return bits & _MAGNITUDE
    flipped = torch.where(bits >= _SIGN, (~bits) & 0xFFFFFFFF, bits | _SIGN)
    return torch.where((bits & _MAGNITUDE) == 0, torch.full_like(bits, _SIGN), flipped)


def key_of(value: float, absolute: bool) -> int:
    """The key of one score (rounded to fp32 first, as :func:`order_keys` does)."""
    return int(order_keys(torch.tensor([value], dtype=torch.float64), absolute)[0])


def value_of(key: int, absolute: bool) -> float:
    """The fp32 score (as a Python float) whose key is ``key``: the inverse of :func:`key_of`
    (-0 comes back as +0, and an absolute key as the magnitude)."""
    if not absolute:
        key = key & _MAGNITUDE if key & _SIGN else (~key) & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", key))[0]


def _locate(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin holding the rank-th smallest key (1-based), count of keys in earlier bins)."""
    cumulative = torch.cumsum(counts, 0)
    bin_index = int(torch.searchsorted(cumulative, torch.tensor([rank], dtype=cumulative.dtype)).item())
    return bin_index, int(cumulative[bin_index - 1]) if bin_index else 0


def _bf16_low_counts(high_counts: torch.Tensor, high: int, absolute: bool) -> torch.Tensor:
    """The low-half histogram of bucket ``high`` for bf16 scores, from the high-half one: a
    bf16 value's fp32 bits end in 16 zeros, so its key's low half is 0, or 0xFFFF for a
    negative value's inverted bits."""
    low = torch.zeros(_BINS, dtype=torch.int64)
    low[0xFFFF if (not absolute and high < 0x8000) else 0] = high_counts[high]
    return low


def streaming_cut(
    histogram: Callable[[int], torch.Tensor], k: int, absolute: bool, *, bf16: bool = False
) -> PruneThreshold:
    """The exact cut pruning the ``k`` lowest keys of a group, from its key histograms.

    ``histogram(-1)`` returns the 65536-bin int64 histogram of the high 16 bits of every
    key of the group; ``histogram(h)`` that of the low 16 bits of the keys whose high half
    is ``h``. ``bf16=True`` (every score is bf16): the second histogram is derived from the
    first and ``histogram`` is called once. With ``k=0`` it is still called once, so a
    caller that checks the scores there (NaN, inf) checks them whatever ``k`` is.
    """
    high_counts = histogram(-1)
    if k == 0:
        return PruneThreshold(float("-inf"), 0)
    high, before = _locate(high_counts, k)
    low_counts = _bf16_low_counts(high_counts, high, absolute) if bf16 else histogram(high)
    low, before_low = _locate(low_counts, k - before)
    return PruneThreshold(value_of((high << 16) | low, absolute), k - before - before_low)


def tie_count(histogram: Callable[[int], torch.Tensor], threshold: PruneThreshold, absolute: bool) -> int:
    """How many scores equal the cut ``threshold.value``, read from the low-half histogram
    (``histogram(h)``, as in :func:`streaming_cut`) of the bucket holding its key."""
    key = key_of(threshold.value, absolute)
    return int(histogram(key >> 16)[key & 0xFFFF])


def tie_quotas(tied: Sequence[int], ties: int) -> list[int]:
    """How many of its scores equal to the cut each place may prune, given ``tied`` (the tied
    scores at each place, in the group's order) and ``ties`` (the cut's count): the ties go
    to the earliest places first, as one walk of the whole group would prune them."""
    quotas, remaining = [], ties
    for count in tied:
        quota = min(int(count), remaining)
        quotas.append(quota)
        remaining -= quota
    return quotas
