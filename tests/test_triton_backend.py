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


def _run_linear(monkeypatch, backend, x0, w, a0, b0, mask, bias, dy):
    monkeypatch.setenv("SPARSELORA_BACKEND", backend)
    x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
    y = ops.masked_lora_linear(x, w, a, b, 0.5, mask, bias)
    assert ops.last_backend("masked_lora_linear") == backend
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_masked_lora_linear_forward_and_gradients(monkeypatch, dtype, with_weight, with_bias):
    """Error at most 2x that of PyTorch computing the same thing in the same dtype."""
    gen = torch.Generator().manual_seed(4)
    out_f, in_f, r = 23, 37, 5
    w = torch.randn(out_f, in_f, generator=gen).to(dtype) if with_weight else None
    bias = torch.randn(out_f, generator=gen).to(dtype) if with_bias else None
    mask = torch.rand(out_f, in_f, generator=gen) > 0.5
    x0, a0, b0 = (torch.randn(*s, generator=gen).to(dtype) for s in ((2, 9, in_f), (r, in_f), (out_f, r)))
    dy = torch.randn(2, 9, out_f, generator=gen).to(dtype)
    got = _run_linear(monkeypatch, "triton", x0, w, a0, b0, mask, bias, dy)
    ref = _run_linear(monkeypatch, "reference", x0, w, a0, b0, mask, bias, dy)
    double = lambda t: None if t is None else t.double()  # noqa: E731
    exact = _run_linear(monkeypatch, "reference", x0.double(), double(w), a0.double(), b0.double(), mask, double(bias), dy.double())
    for name, g, rf, e in zip(("y", "dx", "dA", "dB"), got, ref, exact):
        err, ref_err = (g.double() - e).abs().max(), (rf.double() - e).abs().max()
        assert g.dtype == dtype and err <= 2 * ref_err + 1e-6 * e.abs().max(), (name, float(err), float(ref_err))


def test_sparse_to_sparse_layer_trains_on_triton(monkeypatch):
    from sparselora.pruning.mask_generator import compute_unstructured_mask
    from sparselora.pruning.sparse_lora import SparseLoRAConfig, apply_sparse_lora, validate_sparsity_preserved

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(20, 18), torch.nn.ReLU(), torch.nn.Linear(18, 6))
    masks = compute_unstructured_mask(model, 0.6)
    model = apply_sparse_lora(model, masks, SparseLoRAConfig(r=4, dropout=0.0, sparsity_mode="sparse_to_sparse"))
    monkeypatch.setenv("SPARSELORA_BACKEND", "triton")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 20)
    losses = []
    for _ in range(5):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert ops.last_backend("masked_lora_linear") == "triton"
    assert losses[-1] < losses[0]
    monkeypatch.setenv("SPARSELORA_BACKEND", "reference")
    assert validate_sparsity_preserved(model, masks, tolerance=0.0)[0]
