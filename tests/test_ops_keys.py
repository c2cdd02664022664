"""The one host-side key codec (ops.keys): keys sort like the scores, invert back to them,
and the exact cut from two histograms equals the k-th smallest score."""

from __future__ import annotations

import pytest
import torch

from sparselora.ops import keys
from sparselora.ops._types import PruneThreshold

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def awkward_scores(dtype: torch.dtype) -> torch.Tensor:
    """Signed zeros, the smallest subnormals, ±inf, the extremes and random values of ``dtype``."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max, float("inf"), float("-inf"),
                            1.0, -1.0], dtype=torch.float64)
    smallest = torch.tensor([info.tiny * info.eps], dtype=torch.float64)  # a subnormal
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(500, generator=gen, dtype=torch.float64) * torch.logspace(-6, 6, 500, dtype=torch.float64)
    return torch.cat([special, smallest, -smallest, noise]).to(dtype)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_sort_like_the_scores(dtype, absolute):
    scores = awkward_scores(dtype)
    order_of = scores.abs() if absolute else scores
    key = keys.order_keys(scores, absolute)
    # fp64 is rounded to fp32 first: compare with the fp32 order, where keys may tie
    reference = order_of.float()
    by_key = torch.sort(key, stable=True).indices
    assert torch.equal(reference[by_key], torch.sort(reference, stable=True).values)
    equal_keys = key.unsqueeze(0) == key.unsqueeze(1)
    assert torch.equal(equal_keys, reference.unsqueeze(0) == reference.unsqueeze(1))


@pytest.mark.parametrize("absolute", [False, True])
def test_value_of_inverts_key_of(absolute):
    for value in awkward_scores(torch.float32).tolist():
        back = keys.value_of(keys.key_of(value, absolute), absolute)
        assert back == (abs(value) if absolute else value)


def test_signed_zeros_share_one_key():
    assert keys.key_of(0.0, False) == keys.key_of(-0.0, False) == 0x80000000
    assert keys.key_of(-0.0, True) == 0


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_streaming_cut_is_the_kth_smallest_score(dtype, absolute):
    scores = awkward_scores(dtype)
    scores = scores[torch.isfinite(scores)]
    key = keys.order_keys(scores, absolute)

    def histogram(high: int) -> torch.Tensor:
        if high < 0:
            return torch.bincount(key >> 16, minlength=65536)
        return torch.bincount(key[(key >> 16) == high] & 0xFFFF, minlength=65536)

    ranked = torch.sort((scores.abs() if absolute else scores).float()).values
    for k in (1, 2, 17, scores.numel() // 2, scores.numel()):
        cut = keys.streaming_cut(histogram, k, absolute, bf16=dtype == torch.bfloat16)
        assert cut.value == float(ranked[k - 1])
        assert cut.ties == int((ranked[:k] == ranked[k - 1]).sum())
        assert keys.tie_count(histogram, cut, absolute) == int((ranked == ranked[k - 1]).sum())
    assert keys.streaming_cut(histogram, 0, absolute) == PruneThreshold(float("-inf"), 0)


def test_tie_quotas_go_to_the_earliest_places():
    assert keys.tie_quotas([3, 0, 5, 2], 6) == [3, 0, 3, 0]
    assert keys.tie_quotas([1, 1], 0) == [0, 0]
