"""The training stack of sparse LoRA: the hot ops as custom operators (opcheck on both
backends), torch.compile without graph breaks, the dtype rules (fp32/fp16/bf16 bases,
fp32 adapters, autocast), masks as packed bits outside the buffers and inside the state
dict, the inference cache, transformers' Conv1D layers, and PEFT interoperability."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_gpt2, tiny_llama
from sparselora import ops
from sparselora.lora import (
    SparseLoRAConfig,
    SparseLoRALinear,
    apply_sparse_lora,
    export_peft_adapter,
    from_peft_adapter,
    merge_all_lora_weights,
    merge_report,
    print_trainable_parameters,
    trainable_parameters,
    validate_sparsity_preserved,
)
from sparselora.ops import _dispatch, cpp, library
from sparselora.ops.masks import pack_bits
from sparselora.pruning.mask_generator import compute_random_mask, compute_unstructured_mask
from sparselora.pruning.mask_ops import apply_masks_to_model

MODES = ["sparse_to_dense", "sparse_to_sparse"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "v_proj"]


def tokens(batch=2, length=8, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)]


def randomize_lora_B(model, std=0.1, seed=1):
    """Trained-looking adapters: a fresh lora_B is zero, so the adapter would not matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)
    return model


def conv1d_cls():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


# ----- 1. the custom operators ---------------------------------------------------------------

def op_cases(packed: bool):
    """(op name, args) covering every op; masks bool or packed, Linear and Conv1D layouts."""
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, r, s = 6, 10, 3, 0.75  # 60 mask bits: the last packed byte is padded

    def rand(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    keep = pack_bits if packed else (lambda m: m)
    mask = torch.rand(out_f, in_f, generator=gen) > 0.5
    mask_t = mask.t().contiguous()
    weight, bias = rand(out_f, in_f), rand(out_f, grad=True)
    lora_A, lora_B = rand(r, in_f, grad=True), rand(out_f, r, grad=True)
    x, dy = rand(2, 3, in_f, grad=True), rand(2, 3, out_f)
    a, b = lora_A.detach(), lora_B.detach()
    bf = torch.bfloat16
    score = rand(5, 7)
    high = int(torch.ops.sparselora.key_histogram(score, False, -1).nonzero()[0])
    return [
        ("masked_lora_linear", (x, weight, lora_A, lora_B, s, keep(mask), bias, False)),
        ("masked_lora_linear", (x, weight.t().contiguous(), lora_A, lora_B, s, keep(mask_t), bias, True)),
        ("masked_lora_linear", (x, rand(out_f, in_f, grad=True), lora_A, lora_B, s, keep(mask), None, False)),
        ("masked_lora_linear", (x, None, lora_A, lora_B, s, keep(mask), None, False)),
        # bf16 compute with fp32 adapters (the fp32-adapter rule)
        ("masked_lora_linear", (rand(4, in_f, dtype=bf, grad=True), weight.to(bf), lora_A, lora_B, s, keep(mask),
                                bias.detach().to(bf), False)),
        ("masked_lora_weight", (rand(out_f, in_f, grad=True), lora_A, lora_B, s, keep(mask))),
        ("masked_lora_weight", (None, lora_A, lora_B, s, keep(mask))),
        ("masked_lora_input_grad", (dy, weight, a, b, s, keep(mask), False)),
        ("masked_lora_input_grad", (dy, weight.t().contiguous(), a, b, s, keep(mask_t), True)),
        ("masked_lora_input_grad", (dy.to(bf), None, a, b, s, keep(mask), False)),
        ("masked_lora_adapter_grad", (dy, x.detach(), a, b, s, keep(mask), False, True)),
        ("masked_lora_adapter_grad", (dy, x.detach(), a, b, s, keep(mask_t), True, False)),
        ("masked_lora_adapter_grad", (dy.to(bf), x.detach().to(bf), a, b, s, keep(mask), False, True)),
        ("merge_lora_", (weight.clone(), a, b, s, keep(mask), None)),
        ("merge_lora_", (weight.t().contiguous(), b.t(), a.t(), s, keep(mask_t), None)),
        ("merge_lora_", (weight.clone(), a, b, s, None, None)),
        ("merge_lora_", (weight.clone(), a, b, s, keep(mask), torch.zeros(3, dtype=torch.float64))),
        ("lora_update_norms", (weight, a, b, s, keep(mask))),
        ("lora_update_norms", (weight.t().contiguous().to(bf), b.t(), a.t(), s, None)),
        ("apply_mask_", (weight.clone(), keep(mask))),
        ("masked_copy", (weight, keep(mask))),
        ("select_prune_mask", ([weight, score], 31, True, False)),
        ("select_prune_mask", ([weight, score], 0, False, False)),
        ("select_prune_mask", ([weight, score], 57, False, True)),
        ("key_histogram", (score, False, -1)),
        ("key_histogram", (score, False, high)),
        ("key_histogram", (score, True, -1)),
        ("nm_prune_mask", (weight, 2, 5, True)),
        ("nm_prune_mask", (score.reshape(-1, 5).to(torch.float64), 1, 5, False)),
        ("row_prune_mask", (weight, 3, True, None)),
        ("row_prune_mask", (weight.to(bf), 7, False, mask | (torch.arange(in_f) < 5))),  # <= 5 prior prunes a row
    ]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("packed", [False, True], ids=["bool-mask", "packed-mask"])
def test_opcheck_every_custom_op(monkeypatch, backend, packed):
    """Schema, fake impl (under dynamic shapes), autograd registration and aot dispatch of
    every ``torch.ops.sparselora`` op, on the backend the test forces."""
    assert cpp.available(), cpp.unavailable_reason()
    monkeypatch.setenv("SPARSELORA_BACKEND", backend)
    monkeypatch.setattr(_dispatch, "_LAST", {})  # last_backend must come from this test's calls
    cases = op_cases(packed)
    assert {name for name, _ in cases} == set(library.OPS), "an op is not covered"
    for name, args in cases:
        torch.library.opcheck(getattr(torch.ops.sparselora, name), args)
    for name in library.OPS:
        assert ops.last_backend(name) == backend, name


# ----- 2. torch.compile --------------------------------------------------------------------

class TwoLayers(nn.Module):
    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        if conv1d:  # transformers' Conv1D(nf=out, nx=in), weight stored (in, out) as in GPT-2
            Conv1D = conv1d_cls()
            self.up, self.down = Conv1D(16, 8), Conv1D(4, 16)
            nn.init.normal_(self.up.weight)
            nn.init.normal_(self.down.weight)
        else:
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def compiled_case(conv1d: bool, mode: str):
    torch.manual_seed(0)
    model = TwoLayers(conv1d)
    masks = compute_unstructured_mask(model, 0.5, progress=False)
    model = apply_sparse_lora(
        model, masks, SparseLoRAConfig(r=2, dropout=0.0, sparsity_mode=mode, target_modules=["up", "down"])
    )
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B)
    return model


def grads_of(model, x, fn):
    for p in list(model.parameters()) + [x]:
        p.grad = None
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad], x.grad.clone()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "Conv1D"])
def test_compile_fullgraph_matches_eager(mode, conv1d):
    model = compiled_case(conv1d, mode)
    assert all(layer.fan_in_fan_out is conv1d for _, layer in lora_layers(model))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch._dynamo.reset()
    try:
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        model.eval()
        with torch.no_grad():  # the inference path (the cache is skipped while compiling)
            assert torch._dynamo.explain(model)(x).graph_break_count == 0
        model.train()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        y_c, g_c, gx_c = grads_of(model, x, compiled)
        y_e, g_e, gx_e = grads_of(model, x, model)
    finally:
        torch._dynamo.reset()
    assert len(g_e) == 4  # lora_A and lora_B of both layers
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-5)
    assert all(bool(g.abs().sum() > 0) for g in g_e)


@pytest.mark.parametrize("mode", MODES)
def test_gpt2_with_sparse_lora_has_no_graph_breaks(mode):
    model = apply_sparse_lora(
        tiny_gpt2(), None, SparseLoRAConfig(r=2, dropout=0.0, sparsity_mode=mode, target_modules=GPT2_TARGETS)
    )
    randomize_lora_B(model)
    ids = tokens()
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(lambda i: model(input_ids=i, use_cache=False).logits)(ids)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


# ----- 3. dtype rules ------------------------------------------------------------------------

BF16_BOUND = 2e-2
FP16_BOUND = 4e-3
FP32_BOUND = 1e-5


def grad_bound(compute_dtype: torch.dtype) -> float:
    """Bound on ‖g − g32‖/‖g32‖ for outputs and gradients of one small layer (in=16,
    out=12, r=4, 5 rows) computed in ``compute_dtype`` against the same function in fp32.

    Each value passes through a handful of roundings to the compute dtype (x, the weight
    or effective weight, each matmul's output, the gradient's cast back), each a relative
    error of at most eps/2 (bf16: eps = 2^-8 ≈ 3.9e-3; fp16: 2^-11 ≈ 4.9e-4) and largely
    independent, while the fp32 accumulation inside the kernels adds nothing at these sizes.
    Measured errors are ≈ 1 eps (≤ 4.6e-3 bf16, ≤ 4.9e-4 fp16); the bounds allow ~5 eps
    (bf16: 2e-2) and ~8 eps (fp16: 4e-3) and still catch any wrong formula, dtype mix-up
    or uninitialised memory (which used to give values like -5.9e29). fp32 is exact up to
    summation order."""
    return {torch.bfloat16: BF16_BOUND, torch.float16: FP16_BOUND, torch.float32: FP32_BOUND}[compute_dtype]


def dtype_case(mode, base_dtype, adapter_dtype, frozen=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(16, 12)
    mask = torch.rand(12, 16, generator=gen) > 0.5
    with torch.no_grad():
        lin.weight.copy_(torch.randn(12, 16, generator=gen) * 0.25 * mask)
        lin.bias.copy_(torch.randn(12, generator=gen) * 0.1)
    config = SparseLoRAConfig(r=4, alpha=8, dropout=0.0, sparsity_mode=mode, adapter_dtype=adapter_dtype)
    layer = SparseLoRALinear(lin.to(base_dtype), mask, config, adapter_dtype=config.adapter_dtype)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(4, 16, generator=gen) * 0.3)
        layer.lora_B.copy_(torch.randn(12, 4, generator=gen) * 0.3)
    if frozen:
        layer.requires_grad_(False)
    return layer, mask, torch.randn(5, 16, generator=gen), torch.randn(5, 12, generator=gen)


def fp32_function(layer, mask, x, mode):
    """The layer's function on fp32 copies of its (exactly representable) values."""
    weight, bias = layer.weight.detach().float(), layer.bias.detach().float()
    lora_A = layer.lora_A.detach().float().requires_grad_()
    lora_B = layer.lora_B.detach().float().requires_grad_()
    x = x.detach().float().requires_grad_()
    s = layer.scaling
    if mode == "sparse_to_sparse":
        y = F.linear(x, (weight + s * (lora_B @ lora_A)) * mask, bias)
    else:
        y = F.linear(x, weight * mask, bias) + s * F.linear(F.linear(x, lora_A), lora_B)
    return y, x, lora_A, lora_B


def rel_err(value, exact):
    exact = exact.detach()
    return float((value.detach().float() - exact).norm() / exact.norm())


@pytest.mark.parametrize("autocast", [False, True], ids=["no-autocast", "autocast-bf16"])
@pytest.mark.parametrize("adapter_fp32", [False, True], ids=["adapters-in-base-dtype", "adapters-fp32"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_dtype_rules_outputs_and_gradients(monkeypatch, backend, mode, base_dtype, adapter_fp32, autocast):
    """Output dtype, gradient dtypes, and outputs/gradients (of lora_A, lora_B and x, and of
    x alone with frozen adapters) against the same function in fp32 within grad_bound."""
    monkeypatch.setenv("SPARSELORA_BACKEND", backend)
    adapter_dtype = torch.float32 if adapter_fp32 else None
    compute = torch.bfloat16 if autocast else base_dtype
    bound = grad_bound(compute)
    for frozen in (False, True):
        layer, mask, x, probe = dtype_case(mode, base_dtype, adapter_dtype, frozen)
        assert layer.lora_A.dtype == (adapter_dtype or base_dtype)
        x_in = (x if autocast else x.to(base_dtype)).detach().requires_grad_()  # autocast takes fp32 x
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            y = layer(x_in)
        assert y.dtype == compute
        (y.float() * probe).sum().backward()
        y32, x32, a32, b32 = fp32_function(layer, mask, x_in, mode)
        (y32 * probe).sum().backward()
        assert rel_err(y, y32) <= bound
        assert x_in.grad.dtype == x_in.dtype
        assert rel_err(x_in.grad, x32.grad) <= bound, ("x", frozen)
        if frozen:
            assert layer.lora_A.grad is None and layer.lora_B.grad is None
        else:
            assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == layer.lora_A.dtype
            assert rel_err(layer.lora_A.grad, a32.grad) <= bound, "lora_A"
            assert rel_err(layer.lora_B.grad, b32.grad) <= bound, "lora_B"
        if mode == "sparse_to_sparse":
            assert ops.last_backend("masked_lora_linear") == backend


@pytest.mark.parametrize("adapter_fp32", [False, True], ids=["adapters-in-base-dtype", "adapters-fp32"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_autocast_bf16_matches_linear_plus_adapter_in_bf16(mode, base_dtype, adapter_fp32):
    """Under autocast the layer computes what nn.Linear plus PEFT's adapter compute there:
    sparse_to_dense runs the very same autocast ops (bit-equal); sparse_to_sparse is
    x_bf16 · ((W_bf16 + s·B@A) ⊙ M)ᵀ with the effective weight formed in fp32 once."""
    layer, mask, x, _ = dtype_case(mode, base_dtype, torch.float32 if adapter_fp32 else None)
    layer.eval()
    s = layer.scaling
    for grad in (True, False):  # the autograd op and the cached inference path
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            if mode == "sparse_to_dense":
                expected = F.linear(x, layer.weight, layer.bias) + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * s
        assert y.dtype == torch.bfloat16
        if mode == "sparse_to_dense":
            assert torch.equal(y, expected)
        else:
            a, b = layer.lora_A.detach(), layer.lora_B.detach()
            if a.dtype != torch.float32:
                a, b = a.bfloat16(), b.bfloat16()
            w_eff = ((layer.weight.detach().bfloat16().float() + s * (b.float() @ a.float())) * mask).bfloat16()
            torch.testing.assert_close(y, F.linear(x.bfloat16(), w_eff, layer.bias.detach().bfloat16()))


def test_sparse_to_dense_bf16_base_fp32_adapters_without_autocast():
    """PEFT's rule: the adapter's input is cast to the adapter dtype, its output back."""
    layer, mask, x, _ = dtype_case("sparse_to_dense", torch.bfloat16, torch.float32)
    x = x.bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = F.linear(x, layer.weight, layer.bias) + (
        F.linear(F.linear(x.float(), layer.lora_A), layer.lora_B) * layer.scaling
    ).bfloat16()
    assert torch.equal(y, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["train-grad", "eval-no-grad"])
def test_bf16_base_rejects_fp32_input_without_autocast(mode, path):
    layer, _, x, _ = dtype_case(mode, torch.bfloat16, None)
    layer.train(path == "train-grad")
    with torch.set_grad_enabled(path == "train-grad"), pytest.raises(TypeError, match="dtype"):
        layer(x)  # fp32 x, bf16 weight: never a silent cast


def test_masked_lora_linear_names_the_mismatched_argument():
    gen = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(3, 8, generator=gen), torch.randn(5, 8, generator=gen), torch.randn(5, generator=gen)
    a, b = torch.randn(2, 8, generator=gen), torch.randn(5, 2, generator=gen)
    mask = torch.rand(5, 8, generator=gen) > 0.5
    bf = torch.bfloat16
    with pytest.raises(TypeError, match="weight"):
        ops.masked_lora_linear(x, w.to(bf), a, b, 1.0, mask, bias)
    with pytest.raises(TypeError, match="bias"):
        ops.masked_lora_linear(x, w, a, b, 1.0, mask, bias.to(bf))
    with pytest.raises(TypeError, match="adapters"):  # fp16 adapters with bf16 compute
        ops.masked_lora_linear(x.to(bf), w.to(bf), a.half(), b.half(), 1.0, mask, bias.to(bf))
    with pytest.raises(TypeError, match="lora_A"):
        ops.masked_lora_linear(x, w, a.to(bf), b, 1.0, mask, bias)
    # the allowed mixes run: adapters in the compute dtype or in fp32
    assert ops.masked_lora_linear(x.to(bf), w.to(bf), a, b, 1.0, mask, bias.to(bf)).dtype == bf


# ----- 4. masks are packed bits, not buffers -----------------------------------------------------

def test_mask_is_packed_outside_the_buffers_and_follows_to():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(13, 7)  # 91 elements: 12 bytes, the last one padded
    mask = torch.rand(7, 13, generator=gen) > 0.5
    layer = SparseLoRALinear(lin, mask, SparseLoRAConfig(r=2, dropout=0.0, sparsity_mode="sparse_to_sparse"))
    model = nn.Sequential(layer)
    assert list(layer.buffers()) == [] and list(model.buffers()) == []
    bits = layer.packed_mask
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (math.ceil(91 / 8),)
    assert torch.equal(bits, pack_bits(mask))
    assert torch.equal(layer.weight_mask, mask)

    x = torch.randn(4, 13, generator=gen)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    model.to(torch.float64)
    assert layer.weight.dtype == layer.lora_A.dtype == torch.float64
    assert layer.packed_mask.dtype == torch.uint8 and torch.equal(layer.packed_mask, pack_bits(mask))
    assert torch.equal(layer.weight_mask, mask)
    with torch.no_grad():
        w_eff = (layer.weight + layer.scaling * layer.lora_B @ layer.lora_A) * mask
        torch.testing.assert_close(model(x.double()), F.linear(x.double(), w_eff, layer.bias))
    model.half()
    assert layer.weight.dtype == torch.float16 and layer.packed_mask.dtype == torch.uint8
    assert torch.equal(layer.weight_mask, mask)

    model.to("meta")  # meta holds no values: the bits stay where they are, ready for to_empty
    assert layer.weight.device.type == "meta"
    assert layer.packed_mask.device.type == "cpu" and torch.equal(layer.packed_mask, pack_bits(mask))
    assert layer._cache is None


# ----- 5. masks travel with the state dict -----------------------------------------------------

def wrapped_llama(masks, mode="sparse_to_dense", seed=0, **config):
    config = SparseLoRAConfig(r=2, dropout=0.0, sparsity_mode=mode, target_modules=LLAMA_TARGETS, **config)
    return apply_sparse_lora(tiny_llama(seed), masks, config).eval()


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_carries_packed_masks_and_refuses_other_masks(mode):
    masks = compute_unstructured_mask(tiny_llama(), 0.5, progress=False)
    model = randomize_lora_B(wrapped_llama(masks, mode))
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    state = model.state_dict()
    names = [n for n, _ in lora_layers(model)]
    assert len(names) == 4
    for name in names:
        key = f"{name}.weight_mask"
        assert state[key].dtype == torch.uint8
        assert torch.equal(state[key], pack_bits(masks[f"{name}.weight"]))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    # the same masks on another initialisation: a strict load restores the same function
    same = wrapped_llama(masks, mode, seed=1)
    same.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(same(input_ids=ids).logits, expected)

    # other masks: refused, whether made at another sparsity or at the same one
    for other in (
        apply_sparse_lora(tiny_llama(), None, SparseLoRAConfig(r=2, target_modules=LLAMA_TARGETS,
                                                                sparsity_mode=mode, initial_sparsity=0.3)),
        wrapped_llama(compute_random_mask(tiny_llama(), 0.5, seed=3), mode),
    ):
        with pytest.raises(RuntimeError, match="weight_mask: the saved mask differs"):
            other.load_state_dict(state)

    # a layer without a mask adopts the saved one
    bare = wrapped_llama({}, mode, seed=2)
    assert all(layer.packed_mask is None for _, layer in lora_layers(bare))
    bare.load_state_dict(state, strict=True)
    for name, layer in lora_layers(bare):
        assert torch.equal(layer.weight_mask, masks[f"{name}.weight"])
    with torch.no_grad():
        assert torch.equal(bare(input_ids=ids).logits, expected)

    # a state dict without the mask: a missing key under strict loading
    lacking = {k: v for k, v in state.items() if k != f"{names[0]}.weight_mask"}
    with pytest.raises(RuntimeError, match="Missing key.*weight_mask"):
        wrapped_llama(masks, mode).load_state_dict(lacking, strict=True)
    result = wrapped_llama(masks, mode).load_state_dict(lacking, strict=False)
    assert result.missing_keys == [f"{names[0]}.weight_mask"]


# ----- 6. the inference cache --------------------------------------------------------------

def test_inference_cache_reuses_and_tracks_in_place_changes():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(12, 16, generator=gen) > 0.5
    layer = SparseLoRALinear(nn.Linear(16, 12), mask,
                             SparseLoRAConfig(r=4, dropout=0.0, sparsity_mode="sparse_to_sparse"))
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    x = torch.randn(5, 16, generator=gen)

    def uncached():
        with torch.no_grad():
            return ops.masked_lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling,
                                          layer.packed_mask, layer.bias)

    layer.eval()
    with torch.no_grad():
        y1 = layer(x)
    cache = layer._cache
    assert cache is not None
    torch.testing.assert_close(y1, uncached(), rtol=0, atol=1e-6)
    with torch.no_grad():
        y2 = layer(x)
    assert layer._cache is cache and torch.equal(y1, y2)

    with torch.no_grad():
        layer.lora_B.add_(1)
        y3 = layer(x)
    assert layer._cache is not cache
    assert not torch.allclose(y3, y1)
    torch.testing.assert_close(y3, uncached(), rtol=0, atol=1e-6)

    # an optimizer step (training mode) is seen by the next inference call
    layer.train()
    assert layer._cache is None
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    (layer(x) ** 2).sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        y4 = layer(x)
    assert not torch.allclose(y4, y3)
    torch.testing.assert_close(y4, uncached(), rtol=0, atol=1e-6)

    # with autograd on and adapters requiring gradients nothing is cached
    layer.train()  # clears the cache
    layer.eval()
    layer(x)
    assert layer._cache is None
    with torch.no_grad():
        layer(x)
    assert layer._cache is not None
    layer.train()
    assert layer._cache is None


# ----- 7. transformers' Conv1D (GPT-2) -------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_gpt2_conv1d_wraps_merges_and_stays_sparse(mode):
    Conv1D = conv1d_cls()
    base = tiny_gpt2()
    masks = compute_unstructured_mask(base, 0.5, progress=False)
    assert {f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} <= set(masks)
    model = apply_sparse_lora(base, masks, SparseLoRAConfig(r=4, dropout=0.0, sparsity_mode=mode, target_modules=GPT2_TARGETS))
    layers = lora_layers(model)
    assert len(layers) == 8 and all(layer.fan_in_fan_out for _, layer in layers)
    attn = model.transformer.h[0].attn.c_attn
    assert attn.weight.shape == (32, 96) and attn.lora_A.shape == (4, 32) and attn.lora_B.shape == (96, 4)
    assert torch.equal(attn.weight_mask, masks["transformer.h.0.attn.c_attn.weight"])

    ids = tokens()
    model.train()  # one training step: gradients reach every adapter
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(bool(layer.lora_A.grad is not None and torch.isfinite(layer.lora_B.grad).all()) for _, layer in layers)
    assert all(bool(layer.lora_B.grad.abs().sum() > 0) for _, layer in layers)

    randomize_lora_B(model)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    valid, report = validate_sparsity_preserved(model, masks)
    assert valid == (mode == "sparse_to_sparse"), report["global"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse_to_dense warns what the masked merge drops (tested below)
        merged = merge_all_lora_weights(model)
    for i in (0, 1):
        for sub in (merged.transformer.h[i].attn.c_attn, merged.transformer.h[i].attn.c_proj,
                    merged.transformer.h[i].mlp.c_fc, merged.transformer.h[i].mlp.c_proj):
            assert type(sub) is Conv1D
    assert not lora_layers(merged)
    valid, report = validate_sparsity_preserved(merged, masks)
    assert valid, report["global"]
    with torch.no_grad():
        after = merged(input_ids=ids).logits
    if mode == "sparse_to_sparse":
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_conv1d_sparse_to_sparse_gradients_match_the_masked_weight():
    """A Conv1D layer (weight (in, out)) in sparse_to_sparse mode computes
    x·((W + s·(B@A)ᵀ) ⊙ M) + b; its gradients are those of that formula."""
    Conv1D = conv1d_cls()
    gen = torch.Generator().manual_seed(0)
    conv = Conv1D(12, 16)  # nf=12 outputs, nx=16 inputs: weight (16, 12)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(16, 12, generator=gen))
    mask = torch.rand(16, 12, generator=gen) > 0.5
    layer = SparseLoRALinear(conv, mask, SparseLoRAConfig(r=3, dropout=0.0, sparsity_mode="sparse_to_sparse"))
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    probe = torch.randn(2, 5, 12, generator=gen)
    (layer(x) * probe).sum().backward()
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = x2 @ ((layer.weight + layer.scaling * (b @ a).t()) * mask) + layer.bias
    (y * probe).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


# ----- 8. PEFT interoperability, merge report, safe merge -------------------------------------

def llama_case():
    base = tiny_llama()
    masks = compute_unstructured_mask(base, 0.5, progress=False)
    return base, masks


def gpt2_case():
    base = tiny_gpt2()
    masks = compute_unstructured_mask(base, 0.5, progress=False)
    return base, masks


@pytest.mark.parametrize("arch", ["llama", "gpt2-conv1d"])
def test_export_peft_adapter_loads_in_peft_with_equal_outputs(tmp_path, arch):
    import peft

    base, masks = llama_case() if arch == "llama" else gpt2_case()
    targets = LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS
    model = apply_sparse_lora(copy.deepcopy(base), masks, SparseLoRAConfig(r=4, alpha=8, target_modules=targets))
    randomize_lora_B(model)
    model.eval()
    ids = tokens()
    directory = export_peft_adapter(model, tmp_path / "adapter")
    assert (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file()

    pruned_base = apply_masks_to_model(copy.deepcopy(base), masks)
    theirs = peft.PeftModel.from_pretrained(pruned_base, str(directory)).eval()
    with torch.no_grad():
        ours_out, theirs_out = model(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours_out, apply_masks_to_model(copy.deepcopy(base), masks)(input_ids=ids).logits,
                              atol=1e-3), "the adapters must matter"

    # and back: the adapter directory on the unpruned base with the masks
    back = from_peft_adapter(copy.deepcopy(base), directory, masks).eval()
    assert {n for n, _ in lora_layers(back)} == {n for n, _ in lora_layers(model)}
    assert all(layer.sparsity_mode == "sparse_to_dense" for _, layer in lora_layers(back))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, theirs_out, rtol=1e-5, atol=1e-5)

    s2s = apply_sparse_lora(copy.deepcopy(base), masks,
                            SparseLoRAConfig(r=4, sparsity_mode="sparse_to_sparse", target_modules=targets))
    with pytest.raises(ValueError, match="[Mm]erge"):
        export_peft_adapter(s2s, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def trained_peft_model(base, masks, seed: int):
    """PEFT's LoRA on the pruned base, with nonzero (trained-looking) lora_B."""
    import peft

    peft_model = peft.get_peft_model(
        apply_masks_to_model(copy.deepcopy(base), masks),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_TARGETS),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft_model



def test_from_peft_adapter_sparse_to_sparse_config_computes_the_masked_merge(tmp_path):
    base, masks = llama_case()
    peft_model = trained_peft_model(base, masks, seed=5)
    peft_model.save_pretrained(str(tmp_path))
    ids = tokens()
    config = SparseLoRAConfig(r=4, alpha=8, dropout=0.0, sparsity_mode="sparse_to_sparse", target_modules=LLAMA_TARGETS)
    ours = from_peft_adapter(copy.deepcopy(base), str(tmp_path), masks, config=config).eval()
    layers = dict(lora_layers(ours))
    assert len(layers) == 4 and all(layer.masks_delta for layer in layers.values())
    peft_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layers["model.layers.0.self_attn.q_proj"].lora_B, peft_layer.lora_B["default"].weight)
    # sparse_to_sparse computes ((W⊙M + s·BA) ⊙ M) x: PEFT's merge, masked again
    merged = apply_masks_to_model(peft_model.merge_and_unload(), masks).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        from_peft_adapter(copy.deepcopy(base), str(tmp_path), masks,
                          config=SparseLoRAConfig(r=8, alpha=8, target_modules=LLAMA_TARGETS))


def test_from_peft_model_and_peft_models_are_refused():
    base, masks = llama_case()
    peft_model = trained_peft_model(base, masks, seed=7)
    peft_model.eval()
    ids = tokens()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits

    for refused in (lambda m: apply_sparse_lora(m, masks, SparseLoRAConfig(r=4, target_modules=LLAMA_TARGETS)),
                    lambda m: compute_unstructured_mask(m, 0.5, progress=False)):
        with pytest.raises(ValueError, match="from_peft_adapter") as info:
            refused(peft_model)
        assert "merge_and_unload" in str(info.value)

    ours = from_peft_adapter(peft_model).eval()  # masks None: magnitude masks of the pruned base
    layers = lora_layers(ours)
    assert len(layers) == 4 and all(layer.sparsity_mode == "sparse_to_dense" for _, layer in layers)
    for name, layer in layers:
        assert torch.equal(layer.weight_mask, masks[f"{name}.weight"])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    counts = trainable_parameters(ours)
    lora_numel = sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in layers)
    assert counts["trainable"] == lora_numel
    assert counts["total"] == sum(p.numel() for p in ours.parameters())
    assert counts["percent"] == pytest.approx(100 * lora_numel / counts["total"])


def test_print_trainable_parameters(capsys):
    model = wrapped_llama({})
    print_trainable_parameters(model)
    c = trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || trainable%: {c['percent']:.4f}"
    )


def test_safe_merge_names_the_nan_layer_and_changes_nothing():
    masks = compute_unstructured_mask(tiny_llama(), 0.5, progress=False)
    model = randomize_lora_B(wrapped_llama(masks))
    bad = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        model.get_submodule(bad).lora_B[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        merge_all_lora_weights(model, safe_merge=True)
    assert len(lora_layers(model)) == 4
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name


def test_merge_report_and_dropped_update_warning():
    base = tiny_llama()
    masks = compute_random_mask(base, 0.5, seed=0)
    fresh = wrapped_llama(masks)
    report = merge_report(fresh)
    assert set(report) == {n for n, _ in lora_layers(fresh)}
    assert all(v == {"dropped_update": 0.0, "relative_change": 0.0} for v in report.values())

    trained = randomize_lora_B(wrapped_llama(masks))
    for name, values in merge_report(trained).items():
        # a random mask independent of the update drops ≈ sparsity of its energy: ‖·‖ ≈ √0.5
        assert 0.0 < values["dropped_update"] < 1.0, name
        assert abs(values["dropped_update"] ** 2 - 0.5) < 0.1, (name, values)
        layer = trained.get_submodule(name)
        delta = layer.scaling * (layer.lora_B @ layer.lora_A).detach()
        dropped = float((delta * ~masks[f"{name}.weight"]).norm())
        assert values["dropped_update"] == pytest.approx(dropped / float(delta.norm()), rel=1e-5)
        assert values["relative_change"] == pytest.approx(dropped / float((layer.weight + delta).norm()), rel=1e-5)
        assert values["relative_change"] > 0.0
    with pytest.warns(UserWarning, match="dropped the part of the trained sparse_to_dense update"):
        merge_all_lora_weights(trained)

    s2s = randomize_lora_B(wrapped_llama(masks, "sparse_to_sparse"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = merge_all_lora_weights(s2s)
    assert not lora_layers(merged)
