"""pytest-benchmark cases, deselected from the default run.

    python -m pytest benchmarks -m benchmark --benchmark-group-by=group

Each group pits sparselora against its baseline on the same inputs; `benchmarks/op_kernels.py`
prints the full-size ratio table.
"""

from __future__ import annotations

import pytest
import torch

from sparselora import ops

pytestmark = pytest.mark.benchmark

SIDE, LAYERS = 2048, 5  # 21M fp32 weights: big enough to be memory-bound, quick to set up


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(SIDE, SIDE, generator=gen) for _ in range(LAYERS)]


def _kthvalue_masks(weights):
    flat = torch.cat([w.abs().reshape(-1) for w in weights])
    threshold = torch.kthvalue(flat, flat.numel() // 2).values
    return [w.abs() > threshold for w in weights]


@pytest.mark.benchmark(group="global 50% magnitude mask")
def test_mask_sparselora(benchmark, weights):
    k = sum(w.numel() for w in weights) // 2
    masks = benchmark(ops.select_prune_mask, weights, k, absolute=True)
    assert sum(int((~m).sum()) for m in masks) == k


@pytest.mark.benchmark(group="global 50% magnitude mask")
def test_mask_kthvalue_baseline(benchmark, weights):
    benchmark(_kthvalue_masks, weights)


@pytest.mark.benchmark(group="global 50% magnitude mask")
def test_one_read_of_the_weights(benchmark, weights):
    benchmark(lambda: [w.sum() for w in weights])


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def merge_inputs(request):
    dtype = getattr(torch, request.param)
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(SIDE, SIDE, generator=gen).to(dtype), torch.randn(16, SIDE, generator=gen).to(dtype),
            torch.randn(SIDE, 16, generator=gen).to(dtype), torch.rand(SIDE, SIDE, generator=gen) > 0.5)


@pytest.mark.benchmark(group="merge-with-mask")
def test_merge_sparselora(benchmark, merge_inputs):
    W, A, B, M = merge_inputs
    benchmark(ops.merge_lora_, W, A, B, 0.5, M)


@pytest.mark.benchmark(group="merge-with-mask")
def test_merge_addmm_mul_baseline(benchmark, merge_inputs):
    W, A, B, M = merge_inputs
    benchmark(lambda: W.addmm_(B, A, alpha=0.5).mul_(M))


def _step(layer_fn, x):
    y = layer_fn(x)
    y.pow(2).mean().backward()


@pytest.mark.benchmark(group="LoRA linear forward+backward")
def test_masked_lora_linear(benchmark):
    gen = torch.Generator().manual_seed(2)
    W, M = torch.randn(SIDE, SIDE, generator=gen), torch.rand(SIDE, SIDE, generator=gen) > 0.5
    A = torch.randn(16, SIDE, generator=gen).requires_grad_()
    B = torch.randn(SIDE, 16, generator=gen).requires_grad_()
    x = torch.randn(512, SIDE, generator=gen)
    benchmark(_step, lambda t: ops.masked_lora_linear(t, W, A, B, 2.0, M), x)


@pytest.mark.benchmark(group="LoRA linear forward+backward")
def test_dense_lora_linear_baseline(benchmark):
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(SIDE, SIDE, generator=gen)
    A = torch.randn(16, SIDE, generator=gen).requires_grad_()
    B = torch.randn(SIDE, 16, generator=gen).requires_grad_()
    x = torch.randn(512, SIDE, generator=gen)
    benchmark(_step, lambda t: torch.nn.functional.linear(t, W) + 2.0 * (t @ A.t()) @ B.t(), x)


def _sort_prune(key, k):
    keep = torch.ones(key.shape, dtype=torch.bool)
    return keep.scatter_(1, torch.sort(key, dim=1, stable=True).indices[:, :k], False)


@pytest.mark.benchmark(group="2:4 magnitude mask")
def test_nm_mask_sparselora(benchmark, weights):
    masks = benchmark(lambda: [ops.nm_prune_mask(w, 2, 4, absolute=True) for w in weights])
    assert all(int(m.sum()) == m.numel() // 2 for m in masks)


@pytest.mark.benchmark(group="2:4 magnitude mask")
def test_nm_mask_sort_baseline(benchmark, weights):
    benchmark(lambda: [_sort_prune(w.abs().reshape(-1, 4), 2) for w in weights])


@pytest.mark.benchmark(group="row-scope 50% magnitude mask")
def test_row_mask_sparselora(benchmark, weights):
    masks = benchmark(lambda: [ops.row_prune_mask(w, SIDE // 2, absolute=True) for w in weights])
    assert all(int(m.sum()) == m.numel() // 2 for m in masks)


@pytest.mark.benchmark(group="row-scope 50% magnitude mask")
def test_row_mask_sort_baseline(benchmark, weights):
    benchmark(lambda: [_sort_prune(w.abs(), SIDE // 2) for w in weights])
