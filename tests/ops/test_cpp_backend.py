"""The cpp backend against the reference: masks bit for bit, merges within rounding,
gradients of the sparse_to_sparse layer, packed masks, thread counts, fork safety."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselora import ops
from sparselora.ops import cpp

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (7,), (1023,), (4097,), (33, 65), (3, 1, 5)]


def test_extension_is_built():
    assert cpp.available(), cpp.unavailable_reason()


def on(backend, monkeypatch, fn, *args, **kwargs):
    monkeypatch.setenv("SPARSELORA_BACKEND", backend)
    try:
        return fn(*args, **kwargs)
    finally:
        monkeypatch.delenv("SPARSELORA_BACKEND")


def both(monkeypatch, op, *args, **kwargs):
    ref = on("reference", monkeypatch, getattr(ops, op), *args, **kwargs)
    assert ops.last_backend(op) == "reference"
    out = on("cpp", monkeypatch, getattr(ops, op), *args, **kwargs)
    assert ops.last_backend(op) == "cpp"
    return ref, out


def tie_heavy(shape, kind, gen):
    if kind == "normal":
        return torch.randn(shape, generator=gen)
    if kind == "integers":
        return torch.randint(-3, 4, shape, generator=gen).float()
    if kind == "all-equal":
        return torch.full(shape, -0.5)
    if kind == "signed-zeros":  # -0.0 and +0.0 must tie
        return torch.where(torch.rand(shape, generator=gen) < 0.5, -0.0, 0.0) + (torch.rand(shape, generator=gen) < 0.3).float()
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "integers", "all-equal", "signed-zeros"])
@pytest.mark.parametrize("absolute", [True, False])
def test_select_matches_reference(monkeypatch, dtype, shape, kind, absolute):
    gen = torch.Generator().manual_seed(hash((shape, kind)) % 2**31)
    score = tie_heavy(shape, kind, gen).to(dtype)
    n = score.numel()
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        ref, out = both(monkeypatch, "select_prune_mask", [score], k, absolute=absolute)
        assert torch.equal(ref[0], out[0]), (k, kind)
        assert int((~out[0]).sum()) == k
        t_ref, t_out = both(monkeypatch, "prune_threshold", [score], k, absolute=absolute)
        assert t_ref == t_out


@pytest.mark.parametrize("absolute", [True, False])
def test_many_tensors_mixed_dtypes_and_empty(monkeypatch, absolute):
    gen = torch.Generator().manual_seed(3)
    scores = [
        torch.randint(-4, 5, (17, 3), generator=gen).to(torch.bfloat16),
        torch.empty(0),
        torch.randn(1000, generator=gen).round(decimals=1).half(),
        torch.randint(-4, 5, (5, 5, 5), generator=gen).float(),
    ]
    total = sum(s.numel() for s in scores)
    for k in (0, 1, 100, total // 2, total - 3, total):
        ref, out = both(monkeypatch, "select_prune_mask", scores, k, absolute=absolute)
        for a, b in zip(ref, out):
            assert torch.equal(a, b)
        # the two-step path (threshold, then the writer tensor by tensor) agrees too
        threshold = on("cpp", monkeypatch, ops.prune_threshold, scores, k, absolute=absolute)
        ties = threshold.ties
        for s, want in zip(scores, ref):
            mask, used = on("cpp", monkeypatch, ops.write_prune_mask, s, threshold, ties, absolute=absolute)
            ties -= used
            assert torch.equal(mask, want)
        assert ties == 0


@pytest.mark.parametrize(
    "kind, dtype, absolute",
    [
        ("normal", torch.float32, True),
        ("normal", torch.float32, False),
        ("normal", torch.bfloat16, True),
        ("normal", torch.float16, False),
        ("all-equal", torch.float32, True),
        ("bracket-miss", torch.float32, True),
    ],
    ids=[
        "sampled bracket, cut bucket resolved exactly",
        "signed scores",
        "bf16: the cut bucket is one key, settled by the tie quota",
        "fp16 converted block by block",
        "heavy ties",
        "unrepresentative sample (radix fallback)",
    ],
)
def test_large_inputs_take_every_path(monkeypatch, kind, dtype, absolute):
    n = 300_007
    gen = torch.Generator().manual_seed(5)
    if kind == "normal":
        score = torch.randn(n, generator=gen).to(dtype)
    elif kind == "all-equal":
        score = torch.ones(n, dtype=dtype)
    else:
        # every position the sample reads (runs of 16 neighbours) is large; the true median is small
        score = torch.rand(n, generator=gen).to(dtype)
        runs, total = 65536 // 16, n + 999
        starts = torch.tensor([int(r * total / runs) for r in range(runs)])
        score[(starts[:, None] + torch.arange(16)).reshape(-1).clamp(max=n - 1)] = 1000.0
    for k in (1, n // 2, n - 1):
        ref, out = both(monkeypatch, "select_prune_mask", [score, score[:999]], k, absolute=absolute)
        assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
        for threads in (1, 3):  # the tie quota follows each worker's run of chunks
            monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
            again = on("cpp", monkeypatch, ops.select_prune_mask, [score, score[:999]], k, absolute=absolute)
            assert torch.equal(ref[0], again[0]) and torch.equal(ref[1], again[1])
        monkeypatch.undo()
        was = cpp._C.simd_enabled()
        try:  # the portable twins of the pass and the sweep
            cpp._C.set_simd(False)
            portable = on("cpp", monkeypatch, ops.select_prune_mask, [score, score[:999]], k, absolute=absolute)
        finally:
            cpp._C.set_simd(was)
        assert torch.equal(ref[0], portable[0]) and torch.equal(ref[1], portable[1])


def test_more_than_2_31_elements_in_total():
    # one 8M-element buffer listed 300 times: 2.5e9 scores, counts must not overflow int32
    copies, base = 300, torch.randn(8 * 2**20, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    total = copies * base.numel()
    assert total > 2**31
    k = total // 3 + 7
    value, ties, nonfinite = cpp._C.find_cut([base.data_ptr()] * copies, [base.numel()] * copies, [2] * copies, k, True, 2)
    keys = base.float().abs()
    expected = torch.kthvalue(keys, -(-k // copies)).values.item()
    assert nonfinite == 0 and value == expected
    assert ties == k - copies * int((keys < expected).sum())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_scores_are_rejected(monkeypatch, bad):
    score = torch.randn(100)
    score[57] = bad
    for backend in ("reference", "cpp"):
        with pytest.raises(ValueError, match="NaN or inf"):
            on(backend, monkeypatch, ops.select_prune_mask, [score], 10, absolute=True)
        with pytest.raises(ValueError, match="NaN or inf"):
            on(backend, monkeypatch, ops.prune_threshold, [score], 0)


def test_non_contiguous_inputs(monkeypatch):
    score = torch.randint(0, 5, (37, 41)).float().t()
    assert not score.is_contiguous()
    ref, out = both(monkeypatch, "select_prune_mask", [score], 700, absolute=True)
    assert torch.equal(ref[0], out[0])
    weight = torch.randn(41, 37).t()
    mask = torch.rand(37, 41) > 0.5
    # in place on a non-contiguous weight: the cpp backend says why it cannot
    with pytest.raises(ops.BackendUnavailableError, match="not contiguous"):
        on("cpp", monkeypatch, ops.apply_mask_, weight, mask)
    ops.apply_mask_(weight, mask)  # automatic choice falls back to the reference
    assert ops.last_backend("apply_mask_") == "reference" and torch.equal(weight[~mask], torch.zeros(int((~mask).sum())))


def test_float64_is_refused_with_a_reason(monkeypatch):
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        on("cpp", monkeypatch, ops.select_prune_mask, [torch.randn(10, dtype=torch.float64)], 3)


def test_results_do_not_depend_on_thread_count(monkeypatch):
    score = torch.randint(0, 50, (400_000,)).float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.select_prune_mask([score], 123_457, absolute=True)[0]
        torch.set_num_threads(2)
        two = ops.select_prune_mask([score], 123_457, absolute=True)[0]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    values=st.integers(1, 8),
    sparsity=st.floats(0, 1),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_cpp_equals_reference(n, values, sparsity, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    score = (torch.randint(0, values, (n,), generator=gen).float() - values / 2).to(dtype)
    k = ops.prune_count(n, sparsity)
    from sparselora.ops import reference

    want = reference.select_prune_mask([score], k, True)[0]
    got = cpp.select_prune_mask([score], k, True)[0]
    assert torch.equal(got, want) and int((~got).sum()) == k


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1023, 4097])
def test_packed_masks_round_trip_and_apply(n):
    mask = torch.rand(n) > 0.4
    packed = cpp.pack_mask(mask)
    assert torch.equal(packed, torch.from_numpy(np.packbits(mask.numpy(), bitorder="little")))
    assert torch.equal(cpp.unpack_mask(packed, (n,)), mask)
    for dtype in DTYPES:
        w = torch.randn(n).to(dtype)
        expected = w.clone().masked_fill_(~mask, 0)
        assert torch.equal(cpp.apply_packed_mask_(w, packed), expected)


def exact_merge(weight, lora_A, lora_B, scaling, mask):
    merged = weight.double() + scaling * (lora_B.double() @ lora_A.double())
    return merged if mask is None else merged.masked_fill(~mask, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,r", [((1, 1), 1), ((7, 13), 3), ((33, 1023), 16), ((130, 67), 5)])
@pytest.mark.parametrize("masked", [True, False])
def test_merge_matches_reference(monkeypatch, dtype, shape, r, masked):
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(shape, generator=gen).to(dtype)
    lora_A = torch.randn(r, shape[1], generator=gen).to(dtype)
    lora_B = torch.randn(shape[0], r, generator=gen).to(dtype)
    mask = torch.rand(shape, generator=gen) > 0.5 if masked else None
    exact = exact_merge(weight, lora_A, lora_B, 0.75, mask)
    ref = on("reference", monkeypatch, ops.merge_lora_, weight.clone(), lora_A, lora_B, 0.75, mask)
    out = on("cpp", monkeypatch, ops.merge_lora_, weight.clone(), lora_A, lora_B, 0.75, mask)
    assert ops.last_backend("merge_lora_") == "cpp" and out.dtype == dtype
    # at most 2x the error of the reference in the same dtype (plus one ulp of slack)
    err, ref_err = (out.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err <= 2 * ref_err + torch.finfo(dtype).eps * exact.abs().max(), (err, ref_err)
    if mask is not None:
        assert torch.equal(out[~mask], torch.zeros(int((~mask).sum()), dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_masked_lora_linear_forward_and_gradients(monkeypatch, dtype, with_weight, with_bias):
    gen = torch.Generator().manual_seed(8)
    out_f, in_f, r = 23, 37, 4
    weight = torch.randn(out_f, in_f, generator=gen).to(dtype) if with_weight else None
    bias = torch.randn(out_f, generator=gen).to(dtype) if with_bias else None
    mask = torch.rand(out_f, in_f, generator=gen) > 0.6
    x0 = torch.randn(2, 5, in_f, generator=gen).to(dtype)
    a0 = torch.randn(r, in_f, generator=gen).to(dtype)
    b0 = torch.randn(out_f, r, generator=gen).to(dtype)
    dy = torch.randn(2, 5, out_f, generator=gen).to(dtype)

    def run(backend):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        y = on(backend, monkeypatch, ops.masked_lora_linear, x, weight, a, b, 0.5, mask, bias)
        assert ops.last_backend("masked_lora_linear") == backend
        y.backward(dy)
        return y.detach(), x.grad, a.grad, b.grad

    def exact():
        x, a, b = (t.double().requires_grad_() for t in (x0, a0, b0))
        w = (0.0 if weight is None else weight.double()) + 0.5 * b @ a
        y = torch.nn.functional.linear(x, w.masked_fill(~mask, 0), None if bias is None else bias.double())
        y.backward(dy.double())
        return y.detach(), x.grad, a.grad, b.grad

    for got, ref, want in zip(run("cpp"), run("reference"), exact()):
        err, ref_err = (got.double() - want).abs().max(), (ref.double() - want).abs().max()
        assert err <= 2 * ref_err + 1e-5 * want.abs().max(), (err, ref_err)


def test_stacked_square_layers_share_a_workspace_safely(monkeypatch):
    """Square layers reuse one buffer for W_eff and for G = dYᵀX; a chain of them must still
    give the reference's outputs and gradients."""
    cpp.release_workspaces()  # earlier tests may have left buffers of other shapes
    gen = torch.Generator().manual_seed(11)
    side, r, layers = 32, 4, 3
    weights = [torch.randn(side, side, generator=gen) for _ in range(layers)]
    masks = [torch.rand(side, side, generator=gen) > 0.5 for _ in range(layers)]
    a0 = [torch.randn(r, side, generator=gen) for _ in range(layers)]
    b0 = [torch.randn(side, r, generator=gen) for _ in range(layers)]
    x0 = torch.randn(7, side, generator=gen)

    def run(backend):
        x = x0.clone().requires_grad_()
        a = [t.clone().requires_grad_() for t in a0]
        b = [t.clone().requires_grad_() for t in b0]
        h = x
        for i in range(layers):
            h = on(backend, monkeypatch, ops.masked_lora_linear, h, weights[i], a[i], b[i], 0.5, masks[i], None)
        h.pow(2).sum().backward()
        return [h.detach(), x.grad, *(t.grad for t in a), *(t.grad for t in b)]

    for got, want in zip(run("cpp"), run("reference")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert cpp.release_workspaces() == side * side * 4  # one fp32 buffer served every layer
    assert cpp.release_workspaces() == 0


def _child_selects(queue):
    torch.set_num_threads(1)  # torch's own OpenMP pool cannot run in a forked child
    n = 200_000
    score = torch.randn(n)
    out = torch.empty(n, dtype=torch.bool)
    cpp._C.select_masks([score.data_ptr()], [n], [0], 1000, True, [out.data_ptr()], 0, 2, 0)  # 2 worker threads, no counts
    queue.put(int(n - out.numpy().sum()))


def test_kernels_work_in_a_forked_child():
    ops.select_prune_mask([torch.randn(200_000)], 10, absolute=True)  # threads used in the parent
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_selects, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and queue.get(timeout=5) == 1000


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_kernels_give_identical_results(dtype):
    """The AVX2/FMA (and AVX-512) kernels and their portable twins agree bit for bit."""
    gen = torch.Generator().manual_seed(9)
    scores = [torch.randint(-9, 9, (70_001,), generator=gen).to(dtype), torch.randn(4099, generator=gen).to(dtype)]
    weight = torch.randn(37, 131, generator=gen).to(dtype)
    weight[3, 5], weight[9, 70] = float("nan"), float("inf")  # kept or pruned: the same bits everywhere
    lora_A, lora_B = torch.randn(16, 131, generator=gen).to(dtype), torch.randn(37, 16, generator=gen).to(dtype)
    mask = torch.rand(37, 131, generator=gen) > 0.5
    results = []
    for level in simd_levels():
        masks = cpp.select_prune_mask(scores, 30_000, False)
        threshold = cpp.prune_threshold(scores, 30_000, False)
        masks.append(cpp.write_prune_mask(scores[0], threshold, threshold.ties, False, packed=True)[0])
        merged = [cpp.merge_lora_(weight.clone(), lora_A, lora_B, 0.5, m) for m in (mask, ops.masks.pack_bits(mask), None)]
        results.append((level, masks, merged))
    (_, m1, w1), *others = results
    for level, m2, w2 in others:
        assert all(torch.equal(a, b) for a, b in zip(m1, m2)), level
        assert all(torch.equal(same_width_ints(a), same_width_ints(b)) for a, b in zip(w1, w2)), level


def same_width_ints(t):
    """The tensor's bits as integers: NaN payloads compare too."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def simd_levels():
    """Each kernel level the CPU has (portable first), the extension set to it in turn."""
    best = cpp._C.simd_level()
    try:
        for level in range(best, -1, -1):
            assert cpp._C.set_simd_level(level) == level
            yield level
    finally:
        cpp._C.set_simd_level(best)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,r", [((4, 64), 1), ((37, 131), 16), ((130, 67), 5)])
def test_merge_norms_match_reference_at_every_level(dtype, shape, r):
    """The merge report's squared norms, from the merge's own pass and from a norms-only pass,
    against the float64 reference; the merged weight is untouched by asking for them."""
    gen = torch.Generator().manual_seed(10)
    weight = torch.randn(shape, generator=gen).to(dtype)
    lora_A, lora_B = torch.randn(r, shape[1], generator=gen).to(dtype), torch.randn(shape[0], r, generator=gen).to(dtype)
    mask = torch.rand(shape, generator=gen) > 0.3
    want = ops.reference.lora_update_norms(weight, lora_A, lora_B, 0.75, mask)
    assert float(want[0]) > 0 and float(want[0]) < float(want[1])
    plain = cpp.merge_lora_(weight.clone(), lora_A, lora_B, 0.75, mask)
    for level in simd_levels():
        for keep in (mask, ops.masks.pack_bits(mask)):
            norms = torch.full((3,), -1.0, dtype=torch.float64)
            merged = ops.merge_lora_(weight.clone(), lora_A, lora_B, 0.75, keep, norms=norms)
            assert ops.last_backend("merge_lora_") == "cpp"
            assert torch.equal(merged, plain), level
            only = ops.lora_update_norms(weight, lora_A, lora_B, 0.75, keep)
            for got in (norms, only):
                assert torch.allclose(got, want, rtol=1e-5), (level, got, want)
        unmasked = ops.lora_update_norms(weight, lora_A, lora_B, 0.75)
        assert float(unmasked[0]) == 0.0 and torch.allclose(unmasked[1:], want[1:], rtol=1e-5)


@pytest.mark.parametrize("kind", ["normal", "integers", "all-equal", "signed-zeros"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_select_counts_what_it_prunes(monkeypatch, kind, backend):
    """The pruned counts the selection gives from its own pass equal each mask's, at every kernel
    level, for the fused path (one key at the cut, several keys, ties) and its fallbacks."""
    gen = torch.Generator().manual_seed(11)
    group = [tie_heavy((300, 129), kind, gen), tie_heavy((7,), kind, gen).to(torch.bfloat16),
             tie_heavy((2000,), kind, gen)]
    total = sum(g.numel() for g in group)
    for level in simd_levels():
        for k in (1, total // 3, total - 5):
            pruned = torch.full((3,), -7, dtype=torch.int64)
            masks = on(backend, monkeypatch, ops.select_prune_mask, group, k, absolute=True, pruned=pruned)
            assert ops.last_backend("select_prune_mask") == backend
            want = torch.tensor([m.numel() - int(m.count_nonzero()) for m in masks])
            assert torch.equal(pruned, want), (level, k, pruned, want)
            assert int(pruned.sum()) == k


def test_norms_argument_is_checked():
    w, a, b = torch.zeros(4, 8), torch.zeros(2, 8), torch.zeros(4, 2)
    for bad in (torch.zeros(3), torch.zeros(4, dtype=torch.float64), [0.0, 0.0, 0.0]):
        with pytest.raises(TypeError, match="norms must be a float64 tensor of shape"):
            ops.merge_lora_(w, a, b, 1.0, norms=bad)
    with pytest.raises(TypeError, match=r"pruned must be an int64 tensor of shape \(1,\)"):
        ops.select_prune_mask([w], 3, pruned=torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absolute", [True, False])
def test_key_histogram_and_streaming_threshold_match_reference(monkeypatch, dtype, absolute):
    gen = torch.Generator().manual_seed(10)
    scores = [torch.randn(40_001, generator=gen).to(dtype), torch.randint(-2, 3, (999,), generator=gen).to(dtype)]
    high = int(ops.keys.order_keys(scores[0][:1], absolute)[0]) >> 16
    for h in (-1, high):
        for s in scores:
            ref, out = both(monkeypatch, "key_histogram", s, absolute=absolute, high=h)
            assert torch.equal(ref, out)
    total = sum(s.numel() for s in scores)
    for k in (0, 1, 777, total // 2, total):
        summed = lambda h: sum(ops.key_histogram(s, absolute=absolute, high=h) for s in scores)  # noqa: E731
        assert ops.streaming_threshold(summed, k, total, absolute=absolute) == ops.prune_threshold(scores, k, absolute=absolute)


@pytest.mark.parametrize("n", [1, 7, 8, 1023, 70_001])
def test_packed_mask_writer_matches_reference(monkeypatch, n):
    score = torch.randint(-5, 6, (n,), generator=torch.Generator().manual_seed(n)).float()
    for k in sorted({0, 1, n // 2, n}):
        threshold = ops.prune_threshold([score], k, absolute=True)
        ref, out = both(monkeypatch, "write_prune_mask", score, threshold, threshold.ties, absolute=True, packed=True)
        assert ref[1] == out[1] and torch.equal(ref[0], out[0])
        bools, _ = ops.write_prune_mask(score, threshold, threshold.ties, absolute=True)
        assert torch.equal(out[0], cpp.pack_mask(bools))
