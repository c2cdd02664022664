"""N:M and per-row selection: the cpp kernels (portable and AVX2, any thread count) against
the pure-PyTorch stable-sort reference, bit for bit, and the pruning API on top of them."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparselora import ops
from sparselora.ops import cpp, reference
from sparselora.pruning.mask_generator import compute_nm_mask, compute_unstructured_mask

pytestmark = pytest.mark.skipif(not cpp.available(), reason="the C++ extension is not built")

C = cpp._C
SIMDS = (True, False) if C.simd_enabled() else (False,)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NM = ((2, 4), (1, 4), (4, 8), (3, 7), (0, 2), (2, 2), (5, 16), (7, 100))
G = torch.Generator().manual_seed(4321)


def with_settings(fn, threads: int, simd: bool):
    """Runs fn with the cpp backend's thread count and SIMD choice set."""
    was, orig = C.simd_enabled(), torch.get_num_threads
    torch.get_num_threads = lambda: threads
    try:
        C.set_simd(simd)
        return fn()
    finally:
        torch.get_num_threads = orig
        C.set_simd(was)


def assert_same(ref: torch.Tensor, got: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.bool and got.shape == ref.shape, what
    assert int(got.view(torch.uint8).max()) <= 1 if got.numel() else True, what
    if not torch.equal(ref, got):
        diff = (ref != got).reshape(-1).nonzero().reshape(-1)
        raise AssertionError(f"{what}: {diff.numel()} positions differ, first {diff[:8].tolist()}")


def check_nm(score, n, m, absolute, threads=(1, 3)):
    ref = reference.nm_prune_mask(score, n, m, absolute)
    runs = ref.reshape(-1, m)
    assert bool((runs.sum(1) == n).all())
    for simd in SIMDS:
        for t in threads:
            got = with_settings(lambda: cpp.nm_prune_mask(score, n, m, absolute), t, simd)
            assert_same(ref, got, f"{n}:{m} abs={absolute} simd={simd} threads={t} {score.dtype}")


def check_rows(score, k, absolute, prior=None, threads=(1, 3)):
    ref = reference.row_prune_mask(score, k, absolute, prior)
    assert bool(((~ref).sum(1) == k).all())
    if prior is not None:
        assert not bool((ref & ~prior).any())  # prior's prunes stay pruned
    for simd in SIMDS:
        for t in threads:
            got = with_settings(lambda: cpp.row_prune_mask(score, k, absolute, prior), t, simd)
            assert_same(ref, got, f"k={k} abs={absolute} simd={simd} threads={t} {score.dtype}")


def tied(rows, cols, values, dtype, signed=True):
    """Scores drawn from a few values (signed zeros included): heavy ties."""
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -2.0, 3.0][:values])
    s = pool[torch.randint(0, len(pool), (rows, cols), generator=G)]
    return (s if signed else s.abs()).to(dtype)


def ks(cols):
    return sorted({0, 1, cols // 3, cols // 2, cols - 1, cols} & set(range(cols + 1)))


# --- N:M ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("absolute", [True, False])
def test_nm_random_every_dtype(dtype, n, m, absolute):
    cols = m * 9
    check_nm(torch.randn(37, cols, generator=G).to(dtype), n, m, absolute)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("values", [1, 2, 3, 8])
def test_nm_ties_and_signed_zeros(dtype, n, m, values):
    for absolute in (True, False):
        check_nm(tied(21, m * 5, values, dtype), n, m, absolute)


def test_nm_lower_index_pruned_first():
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, -0.0, 0.0, 5.0]])
    keep = ops.nm_prune_mask(score, 2, 4)
    assert keep.tolist() == [[False, False, True, True, False, False, True, True]]


def test_nm_large_block_and_non_contiguous():
    score = torch.randn(1024, 4096 // 2 * 2, generator=G)
    check_nm(score, 2, 4, True, threads=(2, 4))
    check_nm(score.t(), 2, 4, False, threads=(2,))  # a transposed view
    check_nm(score[:, ::2], 4, 8, True, threads=(2,))


def test_nm_rejects_nonfinite_and_bad_arguments():
    score = torch.randn(4, 8, generator=G)
    for bad in (float("nan"), float("inf"), float("-inf")):
        s = score.clone()
        s[2, 3] = bad
        for backend in ("cpp", "reference"):
            with pytest.raises(ValueError, match="1 NaN or inf"):
                forced(backend, ops.nm_prune_mask, s, 2, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        ops.nm_prune_mask(score, 2, 3)
    with pytest.raises(ValueError, match="0 < n < m"):
        ops.nm_prune_mask(score, 5, 4)
    with pytest.raises(ValueError, match="2-D"):
        ops.nm_prune_mask(score.reshape(-1), 2, 4)
    with pytest.raises(TypeError):
        ops.nm_prune_mask(score.int(), 2, 4)


def forced(backend, fn, *args, **kwargs):
    os.environ["SPARSELORA_BACKEND"] = backend
    try:
        return fn(*args, **kwargs)
    finally:
        del os.environ["SPARSELORA_BACKEND"]


# --- rows --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 64), (5, 1000), (9, 4099), (2, 0), (0, 5)])
@pytest.mark.parametrize("absolute", [True, False])
def test_rows_random_every_dtype(dtype, shape, absolute):
    score = torch.randn(*shape, generator=G).to(dtype)
    for k in ks(shape[1]):
        check_rows(score, k, absolute)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values", [1, 2, 3, 8])
def test_rows_ties_all_equal_and_signed_zeros(dtype, values):
    score = tied(13, 300, values, dtype)
    for absolute in (True, False):
        for k in ks(300):
            check_rows(score, k, absolute)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_extreme_scales(dtype):
    info = torch.finfo(dtype)
    score = torch.randn(8, 2000, generator=G).to(dtype)
    score[0] = info.max
    score[1, ::3] = info.tiny
    score[2] = torch.linspace(-1, 1, 2000).to(dtype) * info.max
    score[3, :1000] = info.smallest_normal / 4  # subnormal (0 where the dtype flushes)
    score[4] = -0.0
    for absolute in (True, False):
        for k in ks(2000):
            check_rows(score, k, absolute)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [1.0, 0.9, 0.5, 0.0])
def test_rows_with_prior(dtype, density):
    score = torch.randn(11, 513, generator=G).to(dtype)
    prior = torch.rand(11, 513, generator=G) < density
    prior[0] = True
    already = int((~prior).sum(1).max())
    for absolute in (True, False):
        for k in sorted({already, already + 1, 300, 513} & set(range(already, 514))):
            check_rows(score, k, absolute, prior)


def test_rows_prior_errors_and_nonfinite_under_prior():
    score = torch.randn(4, 10, generator=G)
    prior = torch.ones(4, 10, dtype=torch.bool)
    prior[2, :6] = False
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError, match="prunes 6 weights of row 2, more than k=5"):
            forced(backend, ops.row_prune_mask, score, 5, prior=prior)
    s = score.clone()
    s[2, 0] = float("nan")  # pruned by prior: ignored
    for backend in ("cpp", "reference"):
        got = forced(backend, ops.row_prune_mask, s, 6, prior=prior)
        assert torch.equal(got, reference.row_prune_mask(score, 6, False, prior))
    s[1, 1] = float("inf")
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError, match="1 NaN or inf"):
            forced(backend, ops.row_prune_mask, s, 6, prior=prior)
        with pytest.raises(ValueError, match="2 NaN or inf"):
            forced(backend, ops.row_prune_mask, s, 0)  # k=0 still rejects them


def test_rows_non_contiguous_and_bad_arguments():
    score = torch.randn(300, 200, generator=G)
    for view in (score.t(), score[::3, 1::2]):
        for k in ks(view.shape[1]):
            check_rows(view, k, True, threads=(2,))
    with pytest.raises(ValueError, match="k=201"):
        ops.row_prune_mask(score, 201)
    with pytest.raises(ValueError, match="prior must be"):
        ops.row_prune_mask(score, 3, prior=torch.ones(300, 200))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(0, 9),
    cols=st.integers(0, 700),
    values=st.sampled_from([0, 1, 2, 5, 8]),
    dtype=st.sampled_from(DTYPES),
    absolute=st.booleans(),
    frac=st.floats(0, 1),
    prior_density=st.sampled_from([None, 1.0, 0.8, 0.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rows_hypothesis(rows, cols, values, dtype, absolute, frac, prior_density, seed):
    gen = torch.Generator().manual_seed(seed)
    if values:
        pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -2.0, 3.0][:values])
        score = pool[torch.randint(0, values, (rows, cols), generator=gen)].to(dtype)
    else:
        scale = 10.0 ** int(torch.randint(-20, 20, (1,), generator=gen))
        top = torch.finfo(dtype).max  # clamped: large scales saturate (ties) instead of overflowing
        score = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * scale).clamp(-top, top).to(dtype)
    prior = None if prior_density is None else torch.rand(rows, cols, generator=gen) < prior_density
    floor = int((~prior).sum(1).max()) if prior is not None and rows and cols else 0
    k = floor + int(frac * (cols - floor))
    check_rows(score, k, absolute, prior, threads=(1, 2))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 9),
    nm=st.sampled_from(NM),
    runs=st.integers(0, 40),
    values=st.sampled_from([0, 1, 2, 5]),
    dtype=st.sampled_from(DTYPES),
    absolute=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_hypothesis(rows, nm, runs, values, dtype, absolute, seed):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    if values:
        pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0][:values])
        score = pool[torch.randint(0, values, (rows, runs * m), generator=gen)].to(dtype)
    else:
        score = torch.randn(rows, runs * m, generator=gen).to(dtype)
    check_nm(score, n, m, absolute, threads=(1, 2))


# --- the pruning API on top ----------------------------------------------------------------


def sort_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """compute_nm_mask's former pure-torch computation."""
    runs = score.reshape(-1, m).float()
    keep = torch.ones_like(runs, dtype=torch.bool)
    keep.scatter_(1, torch.sort(runs, dim=1, stable=True).indices[:, : m - n], False)
    return keep.reshape(score.shape)


def sort_rows(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The former row-scope computation: a stable sort of every row."""
    k = ops.prune_count(score.shape[1], sparsity)
    keep = torch.ones(score.shape, dtype=torch.bool)
    keep.scatter_(1, torch.sort(score.float(), dim=1, stable=True).indices[:, :k], False)
    return keep


def tied_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(56, 24), torch.nn.Linear(24, 8), torch.nn.Linear(8, 40))
    with torch.no_grad():
        for layer in net:  # rounded: many equal magnitudes, and signed zeros
            layer.weight.copy_((layer.weight * 8).round() / 8)
    return net.to(dtype)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_nm_mask_unchanged(n, m, dtype):
    net = tied_model(dtype)
    masks = compute_nm_mask(net, n, m, progress=False)
    for i, layer in enumerate(net):
        assert torch.equal(masks[f"{i}.weight"], sort_nm(layer.weight.detach().abs(), n, m))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_scope_unchanged(sparsity, dtype):
    net = tied_model(dtype)
    masks = compute_unstructured_mask(net, sparsity, scope="row", progress=False)
    for i, layer in enumerate(net):
        assert torch.equal(masks[f"{i}.weight"], sort_rows(layer.weight.detach().abs(), sparsity))


def test_row_scope_error_messages_name_the_tensor():
    net = tied_model()
    with torch.no_grad():
        net[1].weight[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"scores of '1.weight' contain 1 NaN or inf values"):
        compute_unstructured_mask(net, 0.5, scope="row", progress=False)
    with pytest.raises(ValueError, match=r"1.weight: scores contain 1 NaN"):
        compute_nm_mask(net, 2, 4, progress=False)
