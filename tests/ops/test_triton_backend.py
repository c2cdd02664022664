"""Triton kernels against the reference: masks bit for bit, merges and LoRA within 2x the
reference's error. Without a GPU they run under TRITON_INTERPRET=1 on CPU tensors (with
the interpreter's small tiles, and again with the GPU's tiles); with one, on CUDA tensors."""

from __future__ import annotations

import pytest
import torch

from sparselora import ops
from sparselora.ops import keys, library, reference
from sparselora.ops.masks import pack_bits
from sparselora.ops import triton as triton_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dev(t):
    return None if t is None else t.to(DEVICE)


@pytest.fixture(params=["interpreter tiles", "GPU tiles"])
def tiles(request, monkeypatch):
    """Run a test with the interpreter's 16-wide tiles and with the 64-wide tiles of a GPU."""
    monkeypatch.setenv("SPARSELORA_TRITON_GPU_TILES", "1" if request.param == "GPU tiles" else "0")


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
    for high in (-1, int(keys.order_keys(x[:1], absolute)[0]) >> 16):
        got = ops.key_histogram(dev(x), absolute=absolute, high=high)
        assert ops.last_backend("key_histogram") == "triton"
        assert torch.equal(got, reference.key_histogram(x, absolute, high))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absolute", [True, False])
def test_select_matches_reference_with_ties(forced, dtype, absolute):
    gen = torch.Generator().manual_seed(2)
    scores = [(torch.randint(-4, 5, (1023,), generator=gen) * 0.37).to(dtype), torch.randn(7, 3, generator=gen).to(dtype),
              torch.zeros(1, dtype=dtype)]
    n = sum(s.numel() for s in scores)
    on_device = [dev(s) for s in scores]
    for k in (0, 1, n // 3, n - 1, n):
        pruned = torch.empty(3, dtype=torch.int64, device=DEVICE)
        got = ops.select_prune_mask(on_device, k, absolute=absolute, pruned=pruned)
        assert ops.last_backend("select_prune_mask") == "triton"
        want = reference.select_prune_mask(scores, k, absolute)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), k
        assert pruned.tolist() == [m.numel() - int(m.count_nonzero()) for m in want], k
        threshold = ops.prune_threshold(on_device, k, absolute=absolute)
        assert threshold == reference.prune_threshold(scores, k, absolute)
        packed, _ = ops.write_prune_mask(on_device[0], threshold, threshold.ties, absolute=absolute, packed=True)
        assert torch.equal(packed.cpu(), pack_bits(want[0]))


def test_nonfinite_scores_are_rejected(forced):
    x = torch.randn(100)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.select_prune_mask([dev(x)], 10, absolute=True)


def test_float64_is_refused_with_a_reason(forced):
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        ops.select_prune_mask([torch.randn(10, dtype=torch.float64, device=DEVICE)], 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,r", [((1, 1), 1), ((7, 13), 3), ((33, 65), 16), ((40, 70), 20), ((70, 9), 200)])
@pytest.mark.parametrize("masked", [True, False])
def test_merge_matches_reference(monkeypatch, tiles, dtype, shape, r, masked):
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
    got = ops.merge_lora_(dev(W.clone()), dev(A), dev(B), 0.5, dev(M)).cpu()
    assert ops.last_backend("merge_lora_") == "triton" and got.dtype == dtype
    err, ref_err = (got.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert err <= 2 * ref_err + torch.finfo(dtype).eps * exact.abs().max(), (err, ref_err)
    if masked:
        assert torch.equal(got[~M], torch.zeros(int((~M).sum()), dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,r", [((7, 13), 3), ((40, 70), 20)])
def test_merge_norms_match_reference(monkeypatch, tiles, dtype, shape, r):
    """The merge report's squared norms come from the merge's own pass (and a norms-only pass)."""
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(shape, generator=gen).to(dtype)
    A, B = torch.randn(r, shape[1], generator=gen).to(dtype), torch.randn(shape[0], r, generator=gen).to(dtype)
    M = torch.rand(shape, generator=gen) > 0.5
    want = reference.lora_update_norms(W, A, B, 0.5, M)
    monkeypatch.setenv("SPARSELORA_BACKEND", "triton")
    norms = torch.empty(3, dtype=torch.float64, device=DEVICE)
    merged = ops.merge_lora_(dev(W.clone()), dev(A), dev(B), 0.5, dev(pack_bits(M)), norms=norms)
    assert ops.last_backend("merge_lora_") == "triton"
    only = ops.lora_update_norms(dev(W), dev(A), dev(B), 0.5, dev(M))
    assert ops.last_backend("lora_update_norms") == "triton"
    for got in (norms, only):
        assert got.dtype == torch.float64 and torch.allclose(got.cpu(), want, rtol=1e-5), (got, want)
    assert torch.equal(merged.cpu()[~M], torch.zeros(int((~M).sum()), dtype=dtype))


def _run_linear(monkeypatch, backend, x0, w, a0, b0, mask, bias, dy, transposed=False):
    monkeypatch.setenv("SPARSELORA_BACKEND", backend)
    move = dev if backend == "triton" else (lambda t: t)
    x, a, b = (move(t).clone().requires_grad_() for t in (x0, a0, b0))
    y = ops.masked_lora_linear(x, move(w), a, b, 0.5, move(mask), move(bias), transposed=transposed)
    assert ops.last_backend("masked_lora_linear") == backend
    y.backward(move(dy))
    return tuple(t.detach().cpu() for t in (y, x.grad, a.grad, b.grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("r", [5, 200])
def test_masked_lora_linear_forward_and_gradients(monkeypatch, tiles, dtype, with_weight, with_bias, transposed, r):
    """Error at most 2x that of PyTorch computing the same thing in the same dtype."""
    gen = torch.Generator().manual_seed(4)
    out_f, in_f = 23, 37
    stored = (in_f, out_f) if transposed else (out_f, in_f)
    w = torch.randn(*stored, generator=gen).to(dtype) if with_weight else None
    bias = torch.randn(out_f, generator=gen).to(dtype) if with_bias else None
    mask = torch.rand(*stored, generator=gen) > 0.5
    x0, a0, b0 = (torch.randn(*s, generator=gen).to(dtype) for s in ((2, 9, in_f), (r, in_f), (out_f, r)))
    a0, b0 = a0 / r**0.5, b0 / r**0.5
    dy = torch.randn(2, 9, out_f, generator=gen).to(dtype)
    got = _run_linear(monkeypatch, "triton", x0, w, a0, b0, mask, bias, dy, transposed)
    ref = _run_linear(monkeypatch, "reference", x0, w, a0, b0, mask, bias, dy, transposed)
    double = lambda t: None if t is None else t.double()  # noqa: E731
    exact = _run_linear(monkeypatch, "reference", x0.double(), double(w), a0.double(), b0.double(), mask, double(bias),
                        dy.double(), transposed)
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
    model = model.to(DEVICE)
    monkeypatch.setenv("SPARSELORA_BACKEND", "triton")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 20, device=DEVICE)
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


def test_every_op_has_a_triton_implementation():
    from sparselora.ops.library import OPS

    assert [op for op in OPS if "triton" not in ops.registered_backends(op)] == []


def _rows_case(dtype, gen):
    x = (torch.randint(-3, 4, (9, 48), generator=gen) * 0.5).to(dtype)  # many ties
    x[0, 1], x[2, 5] = -0.0, 0.0
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absolute", [True, False])
def test_nm_selection_matches_reference(forced, dtype, absolute):
    gen = torch.Generator().manual_seed(6)
    for x in (_rows_case(dtype, gen), torch.randn(5, 48, generator=gen).to(dtype)):
        for n, m in ((2, 4), (1, 3), (4, 8), (3, 16), (1, 2), (5, 6), (7, 12), (15, 16)):
            got = ops.nm_prune_mask(dev(x), n, m, absolute=absolute)
            assert ops.last_backend("nm_prune_mask") == "triton"
            assert torch.equal(got.cpu(), reference.nm_prune_mask(x, n, m, absolute)), (n, m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absolute", [True, False])
def test_row_selection_matches_reference(forced, dtype, absolute):
    gen = torch.Generator().manual_seed(7)
    x = _rows_case(dtype, gen)
    prior = torch.rand(x.shape, generator=gen) > 0.15
    worst = int((~prior).sum(1).max())
    for k in (0, 1, 7, 24, 47, 48):
        got = ops.row_prune_mask(dev(x), k, absolute=absolute)
        assert ops.last_backend("row_prune_mask") == "triton"
        assert torch.equal(got.cpu(), reference.row_prune_mask(x, k, absolute, None)), k
        if k >= worst:
            got = ops.row_prune_mask(dev(x), k, absolute=absolute, prior=dev(prior))
            assert torch.equal(got.cpu(), reference.row_prune_mask(x, k, absolute, prior)), k
    with pytest.raises(ValueError, match="more than k=0"):
        ops.row_prune_mask(dev(x), 0, prior=dev(prior))
    wide = torch.randn(3, 2500, generator=gen).to(dtype)  # rows longer than one step of the kernel
    assert torch.equal(ops.row_prune_mask(dev(wide), 1234).cpu(), reference.row_prune_mask(wide, 1234, False, None))


def test_selection_rejects_nan_and_inf(forced):
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.nm_prune_mask(dev(x), 2, 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.row_prune_mask(dev(x), 3)
    prior = torch.ones(4, 8, dtype=torch.bool)
    prior[1, 2] = False  # a NaN that earlier pruning removed does not count
    assert torch.equal(ops.row_prune_mask(dev(x), 3, prior=dev(prior)).cpu(), reference.row_prune_mask(x, 3, False, prior))


@pytest.mark.parametrize("absolute", [True, False])
def test_bf16_threshold_reads_the_scores_once(forced, monkeypatch, absolute):
    from sparselora.ops.triton import select

    calls = []
    counting = select.histogram_counts
    monkeypatch.setattr(select, "histogram_counts", lambda *a, **k: calls.append(a[0][0].dtype) or counting(*a, **k))
    gen = torch.Generator().manual_seed(8)
    for dtype, passes in ((torch.bfloat16, 1), (torch.float32, 2)):
        scores = [(torch.randint(-9, 10, (777,), generator=gen) * 0.3).to(dtype), torch.randn(40, generator=gen).to(dtype)]
        for k in (1, 300, 816):
            calls.clear()
            got = ops.select_prune_mask([dev(s) for s in scores], k, absolute=absolute)
            want = reference.select_prune_mask(scores, k, absolute)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
            assert len(calls) == passes, (dtype, k)  # one launch per pass for the whole group


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_apply_mask_and_masked_copy(forced, dtype, packed):
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(37, 29, generator=gen).to(dtype)
    keep = torch.rand(w.shape, generator=gen) > 0.4
    w[~keep] = float("nan")  # pruned NaN/inf become 0
    mask = pack_bits(keep) if packed else keep
    want = w.masked_fill(~keep, 0)
    copy = library.call(library.masked_copy, dev(w), dev(mask))
    assert ops.last_backend("masked_copy") == "triton" and torch.equal(copy.cpu(), want)
    inplace = dev(w.clone())
    ops.apply_mask_(inplace, dev(mask))
    assert ops.last_backend("apply_mask_") == "triton" and torch.equal(inplace.cpu(), want)


def test_model_pruning_runs_on_triton_and_matches_cpp(monkeypatch):
    from sparselora.pruning.mask_generator import compute_nm_mask, compute_unstructured_mask

    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    calls = {"global": lambda m: compute_unstructured_mask(m, 0.5, global_pruning=True, progress=False),
             "row": lambda m: compute_unstructured_mask(m, 0.5, scope="row", progress=False),
             "2:4": lambda m: compute_nm_mask(m, 2, 4, progress=False)}
    for name, call in calls.items():
        monkeypatch.setenv("SPARSELORA_BACKEND", "cpp")
        want = call(model)
        monkeypatch.setenv("SPARSELORA_BACKEND", "triton")
        got = call(model.to(DEVICE))
        model.cpu()
        assert set(got) == set(want) and all(torch.equal(got[k].cpu(), want[k]) for k in want), name


def test_bf16_rounding_keeps_nan_and_matches_torch(forced):
    from sparselora.ops.triton.masked_lora import effective_weight

    bits = torch.tensor([0x7FFFFFFF, 0x7F800001, -1, 0x7FC00000, 0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F800000,
                         -0x00800000, 0x00000001], dtype=torch.int32)
    w = bits.view(torch.float32).reshape(2, 5)
    a, b = torch.zeros(1, 5), torch.zeros(2, 1)  # delta 0: the output is W rounded to bf16
    got = effective_weight(dev(w), dev(a), dev(b), 1.0, dev(torch.ones(2, 5, dtype=torch.bool)), False, torch.bfloat16).cpu()
    want = w.to(torch.bfloat16)
    assert torch.equal(torch.isnan(got), torch.isnan(w))
    finite = ~torch.isnan(w)
    assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16))


def test_float_mask_is_an_error_not_a_reinterpretation(forced):
    from sparselora.ops.triton import masked_lora

    x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(TypeError, match="dtype torch.float32"):
        masked_lora.masked_lora_linear(dev(x), dev(w), dev(a), dev(b), 0.5, dev(torch.ones(4, 8)), None)


@pytest.mark.parametrize("transposed", [False, True])
def test_adapter_gradients_are_deterministic_and_match_reference(forced, transposed):
    from sparselora.ops.triton import masked_lora

    gen = torch.Generator().manual_seed(11)
    out_f, in_f, r = 19, 33, 4
    stored = (in_f, out_f) if transposed else (out_f, in_f)
    dy, x = torch.randn(50, out_f, generator=gen), torch.randn(50, in_f, generator=gen)
    a, b = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
    mask = torch.rand(stored, generator=gen) > 0.5
    args = [dev(t) for t in (dy, x, a, b)] + [0.5, dev(mask), transposed, True]
    first = masked_lora.masked_lora_adapter_grad(*args)
    again = masked_lora.masked_lora_adapter_grad(*args)
    assert all(torch.equal(u, v) for u, v in zip(first, again))  # no atomics: same bits every run
    want = reference.masked_lora_adapter_grad(dy, x, a, b, 0.5, mask, transposed, True)
    for got, ref in zip(first, want):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)
    assert not bool(first[2].cpu()[~mask].any())  # the weight gradient is masked


def test_tile_origins_are_64_bit():
    """Every kernel widens its program id before multiplying it: offsets past 2^31 stay correct."""
    from pathlib import Path

    import sparselora.ops.triton as package

    narrow = []
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            if "tl.program_id(" not in line:
                continue
            widened = ".to(tl.int64)" in line or (line.strip().startswith("pid = ") and "pid.to(tl.int64)" in text)
            if not widened:
                narrow.append(f"{path.name}:{number}")
    assert narrow == []


def test_gpu_script_checks_pass_under_the_interpreter(capsys):
    from conftest import load_benchmark

    gpu = load_benchmark("triton_gpu")
    assert gpu.main(["--checks-only"] + ([] if torch.cuda.is_available() else ["--interpret"])) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out and out.count("  ok  ") >= 27


def test_groups_of_mixed_dtypes_and_empty_tensors_select_like_the_reference(forced):
    gen = torch.Generator().manual_seed(12)
    scores = [torch.randn(300, generator=gen), torch.zeros(0), (torch.randint(-3, 4, (257,), generator=gen) * 0.5).to(torch.bfloat16),
              torch.randn(5, 7, generator=gen).to(torch.float16)]
    n = sum(s.numel() for s in scores)
    for k in (0, 1, n // 2, n):
        got = ops.select_prune_mask([dev(s) for s in scores], k, absolute=True)
        want = reference.select_prune_mask(scores, k, True)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), k
        assert [tuple(a.shape) for a in got] == [tuple(s.shape) for s in scores]
