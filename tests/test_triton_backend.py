"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against the reference:
masks bit for bit, merges within 2x the reference's error."""

from __future__ import annotations

import pytest
import torch

from sparselora import ops
from sparselora.ops import reference
from sparselora.ops import triton as triton_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_triton_backend_is_registered():
    assert triton_backend.available
    assert ops.registered_backends("select_prune_mask")[0] == "triton"


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv("SPARSELORA_BACKEND", "triton")


def test_cpu_tensors_skip_triton_unless_forced():
    ops.select_prune_mask([torch.randn(50)], 10, absolute=True)
    assert ops.last_backend("select_prune_mask") == "cpp"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absolute", [True, False])
def test_key_histogram(forced, dtype, absolute):
    x = (torch.randint(-4, 5, (3001,), generator=torch.Generator().manual_seed(1)) * 0.37).to(dtype)
    x[5] = -0.0
    for high in (-1, int(reference._order_keys(x[:1], absolute)[0]) >> 16):
        got = ops.key_histogram(x, absolute=absolute, high=high)
        assert ops.last_backend("key_histogram") == "triton"
        assert torch.equal(got, reference.key_histogram(x, absolute, high))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absolute", [True, False])
def test_select_matches_reference_with_ties(forced, dtype, absolute):
    gen = torch.Generator().manual_seed(2)
    scores = [(torch.randint(-4, 5, (1023,), generator=gen) * 0.37).to(dtype), torch.randn(7, 3, generator=gen).to(dtype),
              torch.zeros(1, dtype=dtype)]
    n = sum(s.numel() for s in scores)
    for k in (0, 1, n // 3, n - 1, n):
        got = ops.select_prune_mask(scores, k, absolute=absolute)
        assert ops.last_backend("select_prune_mask") == "triton"
        want = reference.select_prune_mask(scores, k, absolute)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), k
        threshold = ops.prune_threshold(scores, k, absolute=absolute)
        assert threshold == reference.prune_threshold(scores, k, absolute)
        packed, _ = ops.write_prune_mask(scores[0], threshold, threshold.ties, absolute=absolute, packed=True)
        assert torch.equal(packed, reference._pack(want[0]))


def test_nonfinite_scores_are_rejected(forced):
    x = torch.randn(100)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.select_prune_mask([x], 10, absolute=True)


def test_float64_is_refused_with_a_reason(forced):
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        ops.select_prune_mask([torch.randn(10, dtype=torch.float64)], 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,r", [((1, 1), 1), ((7, 13), 3), ((33, 65), 16), ((40, 70), 20)])
@pytest.mark.parametrize("masked", [True, False])
def test_merge_matches_reference(monkeypatch, dtype, shape, r, masked):
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(shape, generator=gen).to(dtype)
    A, B = torch.randn(r, shape[1], generator=gen).to(dtype), torch.randn(shape[0], r, generator=gen).to(dtype)
    M = torch.rand(shape, generator=gen) > 0.5 if masked else None
    exact = W.double() + 0.5 * B.double() @ A.double()
    if masked:
        exact = exact.masked_fill(~M, 0)
    monkeypatch.setenv("SPARSELORA_BACKEND", "reference")
    ref = ops.merge_lora_(W.clone(), A, B, 0.5, M)
    monkeypatch.setenv("SPARSELORA_BACKEND", "triton")
    got = ops.merge_lora_(W.clone(), A, B, 0.5, M)
    assert ops.last_backend("merge_lora_") == "triton" and got.dtype == dtype
    err, ref_err = (got.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err <= 2 * ref_err + torch.finfo(dtype).eps * exact.abs().max(), (err, ref_err)
    if masked:
        assert torch.equal(got[~M], torch.zeros(int((~M).sum()), dtype=dtype))
