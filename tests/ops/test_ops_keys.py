"""The one host-side key codec (ops.keys): keys sort like the scores, invert back to them,
and the exact cut from two histograms equals the k-th smallest score."""

from __future__ import annotations

import pytest
import torch

from sparselora.ops import PruneThreshold, cpp, keys, reference

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


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit float dtype but the NaNs."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[~torch.isnan(values)]


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_value_sorts_like_the_scores(dtype, absolute):
    scores = every_value(dtype)
    key = keys.order_keys(scores, absolute)
    order_of = (scores.abs() if absolute else scores).float()
    assert torch.equal(order_of[torch.sort(key, stable=True).indices], torch.sort(order_of, stable=True).values)
    # one key per value: only -0 and +0 (and |x| and -|x| for absolute keys) share one
    assert torch.unique(key).numel() == torch.unique(order_of).numel()
    for value in scores[::997].tolist():  # the scalar codec is the tensor one, and inverts it
        key_of = keys.key_of(value, absolute)
        assert key_of == int(keys.order_keys(torch.tensor([value], dtype=dtype), absolute)[0])
        assert keys.value_of(key_of, absolute) == (abs(value) if absolute else value) + 0.0  # -0 comes back +0


def test_fp64_values_are_keyed_after_rounding_to_fp32():
    values = [1.0 + 2.0**-30, -(1.0 + 2.0**-30), 1e-300, 3.0e38]
    for value in values:
        for absolute in (False, True):
            assert keys.key_of(value, absolute) == keys.key_of(float(torch.tensor(value).float()), absolute)
    assert keys.key_of(1e300, False) == keys.key_of(float("inf"), False)  # beyond fp32: inf, as .float() gives


def test_nan_lies_beyond_inf_by_its_sign():
    nan, neg_nan = float("nan"), -float("nan")
    assert keys.key_of(nan, False) > keys.key_of(float("inf"), False)
    assert keys.key_of(neg_nan, False) < keys.key_of(float("-inf"), False)
    assert keys.key_of(neg_nan, True) > keys.key_of(float("inf"), True)
    assert keys.value_of(keys.key_of(nan, False), False) != keys.value_of(keys.key_of(nan, False), False)
    # the ops never key a NaN: they refuse it first
    with pytest.raises(ValueError, match="1 NaN or inf"):
        reference.key_histogram(torch.tensor([1.0, nan]), False, -1)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cpp_kernel_keys_are_the_codec_keys(dtype, absolute):
    scores = awkward_scores(dtype)
    scores = scores[torch.isfinite(scores)]
    key = keys.order_keys(scores, absolute)
    assert torch.equal(cpp.key_histogram(scores, absolute, -1), torch.bincount(key >> 16, minlength=65536))
    high = int(key[3]) >> 16
    assert torch.equal(cpp.key_histogram(scores, absolute, high),
                       torch.bincount(key[(key >> 16) == high] & 0xFFFF, minlength=65536))
