"""Adversarial inputs for the exact select of the cpp backend (bool masks) against the reference:
scales, ties, signed zeros, denormals, sampler-aligned patterns, chunk and tensor boundaries,
thread counts and the portable kernels."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparselora import ops
from sparselora.ops import cpp, reference

C = cpp._C
HAS_SIMD = C.simd_enabled()


def run_cpp(scores, k, absolute, threads, simd, monkeypatch=None):
    was = C.simd_enabled()
    orig = torch.get_num_threads
    torch.get_num_threads = lambda: threads
    try:
        C.set_simd(simd)
        return cpp.select_prune_mask(scores, k, absolute)
    finally:
        torch.get_num_threads = orig
        C.set_simd(was)


def _via_ops(backend, scores, k, absolute):
    """select_prune_mask through the dispatcher with ``backend`` forced."""
    os.environ["SPARSELORA_BACKEND"] = backend
    try:
        masks = ops.select_prune_mask(scores, k, absolute=absolute)
        assert ops.last_backend("select_prune_mask") == backend
        return masks
    finally:
        del os.environ["SPARSELORA_BACKEND"]


def check(scores, k, absolute, threads=(1, 2, 3, 4), simds=None, via_ops=False):
    if simds is None:
        simds = (True, False) if HAS_SIMD else (False,)
    ref = reference.select_prune_mask(scores, k, absolute)
    pruned = sum(int((~m).sum()) for m in ref)
    assert pruned == k
    for simd in simds:
        for t in threads:
            got = run_cpp(scores, k, absolute, t, simd)
            assert len(got) == len(ref)
            for i, (a, b) in enumerate(zip(ref, got)):
                assert a.shape == b.shape and b.dtype == torch.bool
                if not torch.equal(a, b):
                    diff = (a != b).reshape(-1).nonzero().reshape(-1)
                    raise AssertionError(
                        f"tensor {i} differs (simd={simd}, threads={t}, k={k}, abs={absolute}): "
                        f"{diff.numel()} positions, first {diff[:8].tolist()}; "
                        f"pruned cpp={sum(int((~m).sum()) for m in got)}"
                    )
                # the bytes must be 0/1 (no leftover bucket bytes)
                assert int(b.view(torch.uint8).max()) <= 1 if b.numel() else True
    if via_ops:
        got, ref2 = (_via_ops(backend, scores, k, absolute) for backend in ("cpp", "reference"))
        for a, b in zip(ref2, got):
            assert torch.equal(a, b)


def ks(total):
    return sorted({1, 2, total // 3, total // 2, total - 2, total - 1, total})


G = torch.Generator().manual_seed(1234)


def rnd(n, dtype=torch.float32, scale=1.0):
    return (torch.randn(n, generator=G) * scale).to(dtype)


# --- scales ---------------------------------------------------------------------------


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_very_different_scales(absolute, dtype):
    tiny_scale = 1e-30 if dtype != torch.float16 else 1e-6
    huge_scale = 1e30 if dtype != torch.float16 else 1e3
    scores = [rnd(50_000, dtype, tiny_scale), rnd(90_001, dtype, huge_scale), rnd(30_000, dtype)]
    total = sum(s.numel() for s in scores)
    for k in [1, 50_000, 50_001, 49_999, 80_000, total - 1, total]:
        check(scores, k, absolute, threads=(1, 3), via_ops=(k == 50_000))


@pytest.mark.parametrize("absolute", [True, False])
def test_many_small_plus_one_large(absolute):
    scores = [rnd(int(n)) for n in torch.randint(0, 40, (3000,), generator=G)] + [rnd(1_000_003)]
    scores += [rnd(3) for _ in range(50)]
    total = sum(s.numel() for s in scores)
    for k in [1, 7, total // 2, total - 5, total]:
        check(scores, k, absolute, threads=(1, 4))


@pytest.mark.parametrize("total", [65537, 65540, 65552, 65553, 70001, 131073])
@pytest.mark.parametrize("absolute", [True, False])
def test_just_above_sample_whole(total, absolute):
    s = rnd(total)
    for k in ks(total):
        check([s], k, absolute, threads=(1, 3))
    # split in two tensors with a boundary at an odd spot
    check([s[:12345], s[12345:]], total // 2, absolute, threads=(2, 3))


@pytest.mark.parametrize("total", [65520, 65530, 65535, 65536, 1000, 17, 31])
def test_sample_whole_not_multiple_of_16(total):
    s = rnd(total)
    for k in ks(total):
        check([s], k, True, threads=(1, 2))


# --- buckets with several keys and ties ----------------------------------------------


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("width", [2, 5, 40, 300, 5000])
def test_cut_bucket_several_keys_and_ties(absolute, width):
    n = 400_000
    base = torch.tensor(1.0).view(torch.int32).item()
    # a few distinct neighbouring floats, each repeated many times, plus a spread
    idx = torch.randint(0, width, (n,), generator=G)
    bits = (base + idx).to(torch.int32)
    s = bits.view(torch.float32).clone()
    spread = torch.rand(n, generator=G) < 0.3
    s[spread] = torch.rand(int(spread.sum()), generator=G) * 4
    if not absolute:
        s[torch.rand(n, generator=G) < 0.2] *= -1
    for k in [n // 3, n // 2, 2 * n // 3, n - 1]:
        check([s[:150_000], s[150_000:]], k, absolute, threads=(1, 2, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("absolute", [True, False])
def test_half_heavy_ties(dtype, absolute):
    n = 500_003
    s = torch.randint(-6, 7, (n,), generator=G).to(dtype) * 0.125
    s2 = (torch.randn(200_000, generator=G) * 0.01).to(dtype)
    for k in [1, n // 7, n // 2, n - 1, n + 100_000]:
        check([s, s2], k, absolute, threads=(1, 3, 4))


@pytest.mark.parametrize("absolute", [True, False])
def test_two_distinct_values(absolute):
    n = 300_000
    s = torch.where(torch.rand(n, generator=G) < 0.5, torch.tensor(1.0), torch.tensor(2.0))
    for k in [1, 10, 149_000, 150_000, 151_000, n - 1, n]:
        check([s], k, absolute, threads=(1, 3, 4))


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("value", [0.0, -0.0, -3.5, 1e-45])
def test_all_equal(absolute, value):
    s = torch.full((200_001,), value)
    for k in [1, 100_000, 200_000, 200_001]:
        check([s, s[:70_000].clone()], k, absolute, threads=(1, 3))


@pytest.mark.parametrize("absolute", [True, False])
def test_signed_zeros(absolute):
    n = 400_000
    s = torch.where(torch.rand(n, generator=G) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    mix = torch.rand(n, generator=G) < 0.2
    s[mix] = torch.randn(int(mix.sum()), generator=G)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = s.to(dtype)
        nneg = int((x < 0).sum())
        for k in [nneg, nneg + 1, nneg + 100_000, n // 2, n - 1]:
            check([x], k, absolute, threads=(1, 3))


@pytest.mark.parametrize("absolute", [True, False])
def test_denormals(absolute):
    n = 300_000
    bits = torch.randint(0, 0x00800000, (n,), generator=G).to(torch.int32)
    bits[torch.rand(n, generator=G) < 0.5] |= torch.tensor(0x80000000 - 2**32, dtype=torch.int32)
    s = bits.view(torch.float32).clone()
    for k in [1, n // 4, n // 2, n - 1]:
        check([s], k, absolute, threads=(1, 3))
    # fp16 / bf16 subnormals
    h = torch.randint(0, 0x400, (n,), generator=G).to(torch.int16)
    h[torch.rand(n, generator=G) < 0.5] |= torch.tensor(-0x8000, dtype=torch.int16)
    for dt in (torch.float16, torch.bfloat16):
        x = h.view(dt).clone()
        for k in [1, n // 2, n - 1]:
            check([x], k, absolute, threads=(1, 3))


@pytest.mark.parametrize("absolute", [True, False])
def test_negative_scores(absolute):
    s = -torch.rand(300_000, generator=G) - 1.0
    for k in ks(300_000):
        check([s], k, absolute, threads=(1, 3))


# --- ordered and periodic inputs -------------------------------------------------------


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sorted(order, dtype):
    n = 1_000_000
    s = torch.randn(n, generator=G).sort(descending=order == "desc").values.to(dtype)
    # (k=1 on a descending fp32 input takes torch.kthvalue in the reference ~40 s)
    for k in ([1] if order == "asc" else []) + [n // 2, n - 1]:
        check([s], k, False, threads=(1, 3))
        check([s], k, True, threads=(2,))


@pytest.mark.parametrize("total", [70_000, 300_007, 2_000_000])
def test_periodic_aligned_with_stride(total):
    m = max(65536, total >> 7)
    runs = (m + 15) // 16
    stride = total / runs
    pos = torch.arange(total, dtype=torch.float64)
    phase = torch.remainder(pos, stride)
    s = torch.where(phase < 16, torch.tensor(100.0, dtype=torch.float64), torch.rand(total, generator=G, dtype=torch.float64))
    s = s.float()
    for k in [1, total // 2, total - runs * 16 - 1, total - runs * 16, total - 1]:
        if 1 <= k <= total:
            check([s], k, True, threads=(1, 3))
    # sample values all tiny, rest large
    s2 = torch.where(phase < 16, torch.tensor(-5.0, dtype=torch.float64), torch.rand(total, generator=G, dtype=torch.float64)).float()
    for k in [1, total // 2, total - 1]:
        check([s2], k, False, threads=(1, 3))


def test_non_contiguous():
    base = torch.randn(1000, 700, generator=G)
    scores = [base.t(), base[::3, ::2], torch.randn(400, 300, generator=G).to(torch.bfloat16).t()]
    total = sum(s.numel() for s in scores)
    for k in [1, total // 2, total - 1]:
        check(scores, k, True, threads=(1, 3), via_ops=True)
        check(scores, k, False, threads=(2,))


def test_mixed_dtypes_many_tensors_threads():
    scores = []
    for i in range(40):
        n = int(torch.randint(0, 70_000, (1,), generator=G))
        dt = [torch.float32, torch.float16, torch.bfloat16][i % 3]
        scores.append((torch.randn(n, generator=G) * (10.0 ** (i % 7 - 3))).to(dt))
    total = sum(s.numel() for s in scores)
    for k in [1, total // 5, total // 2, total - 1, total]:
        for absolute in (True, False):
            check(scores, k, absolute, threads=(1, 2, 3, 4, 7))


def test_nonfinite_large():
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            s = torch.randn(300_000, generator=G).to(dt)
            s[123_456] = bad
            for absolute in (True, False):
                for simd in ((True, False) if HAS_SIMD else (False,)):
                    with pytest.raises(ValueError):
                        run_cpp([s], 150_000, absolute, 3, simd)
                    with pytest.raises(ValueError):
                        run_cpp([s], 1, absolute, 1, simd)


# --- tie quotas across workers ------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 5, 8])
def test_ties_spread_over_workers(threads):
    # 7 chunks of 32768 + tail: ties everywhere, the cut inside the ties
    n = 7 * 32768 + 1001
    s = torch.zeros(n)
    s[::97] = 1.0
    s[5::13] = -1.0
    for k in [int((s < 0).sum()) + 1, n // 2, n - int((s > 0).sum()) - 1]:
        check([s[:100_000], s[100_000:]], k, False, threads=(threads,))
    # several keys in the pivot bucket with ties spread
    t = torch.randint(0, 4, (n,), generator=G).float() * 1e-7 + 1.0
    for k in [n // 3, n // 2]:
        check([t], k, True, threads=(threads,))


# --- hypothesis --------------------------------------------------------------------------


@settings(max_examples=int(os.environ.get("HYP_SMALL", "100")), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    sizes=st.lists(st.integers(0, 60_000), min_size=1, max_size=6),
    big=st.integers(0, 400_000),
    nvals=st.integers(1, 200),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    absolute=st.booleans(),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
    threads=st.integers(1, 4),
    mode=st.sampled_from(["pool", "normal", "scaled", "sorted"]),
)
def test_hypothesis(sizes, big, nvals, dtype, absolute, frac, seed, threads, mode):
    g = torch.Generator().manual_seed(seed)
    sizes = sizes + [big]
    total = sum(sizes)
    if total == 0:
        return
    if mode == "pool":
        pool = torch.randn(nvals, generator=g)
        flat = pool[torch.randint(0, nvals, (total,), generator=g)]
    elif mode == "normal":
        flat = torch.randn(total, generator=g)
    elif mode == "scaled":
        flat = torch.randn(total, generator=g) * torch.exp(torch.randn(total, generator=g) * 8).clamp(max=1e30)
    else:
        flat = torch.randn(total, generator=g).sort().values
    if dtype == torch.float16:
        flat = flat.clamp(-60000, 60000)
    flat = flat.to(dtype)
    scores = list(torch.split(flat, sizes))
    scores = [s.clone() for s in scores]
    k = min(total, max(0, int(round(frac * total))))
    check(scores, k, absolute, threads=(threads,))


# --- fallbacks after the pass has written the masks --------------------------------------


def sampled_positions(total):
    m = max(65536, total >> 7)
    runs = (m + 15) // 16
    starts = torch.tensor([int(r * total / runs) for r in range(runs)])
    return (starts[:, None] + torch.arange(16)).reshape(-1).clamp(max=total - 1)


@pytest.mark.parametrize("dense_ties", [True, False])
@pytest.mark.parametrize("absolute", [True, False])
def test_bracket_miss_with_partial_ties(dense_ties, absolute):
    total = 600_011
    if dense_ties:
        s = torch.randint(0, 4, (total,), generator=G).float()
    else:
        s = torch.rand(total, generator=G) + 2.0
        s[torch.randint(0, total, (3000,), generator=G)] = 2.5  # rare ties
    s[sampled_positions(total)] = 1000.0
    for k in [total // 3, total // 2, int((s < 2.5).sum()) + 700]:
        check([s[:200_000], s[200_000:]], k, absolute, threads=(1, 3))


@pytest.mark.parametrize("absolute", [True, False])
def test_full_bucket_of_distinct_keys(absolute):
    # the cut at the lower edge of a big cluster of two adjacent floats: the bracket reaches
    # into the spread values below it, so the whole cluster lands in one bucket
    total = 2_000_000
    n_below = 1_000_000
    below = torch.rand(n_below, generator=G) * 0.9
    one = torch.tensor(1.0)
    nxt = torch.nextafter(one, torch.tensor(2.0))
    cluster = torch.where(torch.rand(200_000, generator=G) < 0.005, one, nxt)
    above = torch.rand(total - n_below - 200_000, generator=G) + 5.0
    s = torch.cat([below, cluster, above])[torch.randperm(total, generator=G)]
    for k in [n_below + 1, n_below + 50, n_below + 500, n_below + 99_000, n_below + 150_000]:
        check([s], k, absolute, threads=(1, 3))


# --- structure: runs across many tiny tensors, chunk-boundary sizes -----------------------


@pytest.mark.parametrize("absolute", [True, False])
def test_runs_cross_many_tiny_tensors(absolute):
    # 1-element and empty tensors interleaved between two bulk tensors, so that runs of 16
    # sampled neighbours cross many tensors
    scores = [torch.randint(-6, 7, (40_000,), generator=G).float()]
    for i in range(6000):
        scores.append(torch.empty(0) if i % 5 == 0 else torch.tensor([float((i * 7919) % 13) - 6.0]))
    scores.append(torch.randint(-6, 7, (40_000,), generator=G).float())
    scores = [s.clone() for s in scores]
    total = sum(s.numel() for s in scores)
    for k in [1, total // 2, total - 1]:
        check(scores, k, absolute, threads=(1, 3), simds=(True,) if HAS_SIMD else (False,))


@pytest.mark.parametrize("absolute", [True, False])
def test_chunk_boundary_sizes(absolute):
    sizes = [32768 - 1, 32768, 32768 + 1, 2 * 32768 + 31, 4096 * 3 + 7, 33, 32]
    flat = torch.randint(-20, 20, (sum(sizes),), generator=G).float() * 0.5
    scores = [s.clone() for s in torch.split(flat, sizes)]
    fp16 = [s.half() for s in scores]
    bf16 = [s.bfloat16() for s in scores]
    total = sum(sizes)
    for k in [1, 32768, total // 2, total - 32768, total - 1]:
        for group in (scores, fp16, bf16, [scores[0], fp16[1], bf16[2], scores[3], fp16[4], bf16[5], scores[6]]):
            check(group, k, absolute, threads=(1, 2, 3, 4))


def test_real_set_num_threads():
    s = torch.randint(-3, 4, (400_001,), generator=G).float()
    before = torch.get_num_threads()
    ref = reference.select_prune_mask([s], 200_000, False)
    try:
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            got = cpp.select_prune_mask([s], 200_000, False)
            assert torch.equal(got[0], ref[0])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("absolute", [True, False])
def test_threshold_and_packed_writer_large(absolute):
    # find_cut shares the new bracket()
    for data in (torch.randn(700_000, generator=G), torch.randint(-3, 4, (700_000,), generator=G).bfloat16()):
        for k in [1, 350_000, 699_999, 700_000]:
            r = reference.prune_threshold([data, data[:5000]], k, absolute)
            c = cpp.prune_threshold([data, data[:5000]], k, absolute)
            assert r == c
            for packed in (False, True):
                rm, ru = reference.write_prune_mask(data, r, r.ties, absolute, packed)
                cm, cu = cpp.write_prune_mask(data, c, c.ties, absolute, packed)
                assert ru == cu and torch.equal(rm, cm)


@settings(max_examples=int(os.environ.get("HYP_LARGE", "150")), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n_tensors=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    total=st.integers(65_537, 900_000),
    threads=st.integers(1, 4),
    absolute=st.booleans(),
    simd=st.booleans(),
    kind=st.sampled_from(["pool", "cluster", "scales", "zeros", "ulps"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    kfrac=st.floats(0, 1),
)
def test_hypothesis_large(n_tensors, seed, total, threads, absolute, simd, kind, dtype, kfrac):
    g = torch.Generator().manual_seed(seed)
    if kind == "pool":
        pool = torch.randn(int(torch.randint(2, 50, (1,), generator=g)), generator=g)
        flat = pool[torch.randint(0, pool.numel(), (total,), generator=g)]
    elif kind == "cluster":
        flat = torch.randn(total, generator=g)
        c = torch.rand(total, generator=g) < 0.4
        flat[c] = 0.3 + torch.randint(0, 5, (int(c.sum()),), generator=g).float() * 1e-7
    elif kind == "scales":
        flat = torch.randn(total, generator=g) * (10.0 ** torch.randint(-8, 8, (total,), generator=g).float())
    elif kind == "zeros":
        flat = torch.where(torch.rand(total, generator=g) < 0.5, -0.0, 0.0)
        c = torch.rand(total, generator=g) < 0.1
        flat[c] = torch.randn(int(c.sum()), generator=g)
    else:
        base = int(torch.tensor(0.7).view(torch.int32))
        flat = (base + torch.randint(-300, 300, (total,), generator=g).int()).view(torch.float32)
        flat[torch.rand(total, generator=g) < 0.5] *= -1
    if dtype == torch.float16:
        flat = flat.clamp(-60000, 60000)
    flat = flat.to(dtype)
    cuts = sorted(torch.randint(0, total + 1, (n_tensors - 1,), generator=g).tolist())
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    scores = [s.clone() for s in torch.split(flat, sizes)]
    k = min(total, max(1, int(kfrac * total)))
    if not (HAS_SIMD or not simd):
        return
    check(scores, k, absolute, threads=(threads,), simds=(simd,))


def test_concurrent_python_threads():
    import threading

    data = [torch.randint(-5, 6, (300_000,), generator=G).float() * 0.25, torch.randn(500_000, generator=G).bfloat16()]
    ref = reference.select_prune_mask(data, 400_000, True)
    errors = []

    def work():
        try:
            for _ in range(5):
                got = cpp.select_prune_mask(data, 400_000, True)
                if not all(torch.equal(a, b) for a, b in zip(ref, got)):
                    errors.append("mismatch")
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_few_million(dtype):
    n = 3_000_017
    s = (torch.randn(n, generator=G) * 0.02).to(dtype)
    s[: n // 10] = 0.0  # a block of exact zeros (ties at |x| = 0)
    small = torch.randn(70_000, generator=G).to(dtype)
    for k in [n // 10 - 5, n // 10 + 5, n // 2, n + 69_999]:
        check([small, s], k, True, threads=(1, 4))
    check([s, small], n // 2, False, threads=(3,))
