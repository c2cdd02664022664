"""SparseGPT, OWL and sequential (block-by-block) calibration on small decoder models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from sparselora.pruning.calibration import calibration_batches
from sparselora.pruning.importance import collect_activation_norms
from sparselora.pruning.mask_generator import compute_unstructured_mask
from sparselora.pruning.mask_ops import validate_nm_mask
from sparselora.pruning.oneshot import find_decoder_blocks, prune_model
from sparselora.pruning.oneshot.owl import outlier_ratio, owl_sparsities
from sparselora.pruning.oneshot.sparsegpt import GramAccumulator, sparsegpt_prune_

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def batches(count: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (2, 24), generator=gen)} for _ in range(count)]


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen, dtype=torch.float64) / features**0.5
    scale = torch.rand(features, generator=gen, dtype=torch.float64) * 3 + 0.1
    return (torch.randn(tokens, features, generator=gen, dtype=torch.float64) @ mix + 0.3) * scale


def naive_obs(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """Optimal Brain Surgeon column by column with explicit inverses of the remaining
    Hessian (float64): what SparseGPT's Cholesky shortcut computes."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h += torch.eye(h.shape[0], dtype=torch.float64) * damp * h.diagonal().mean()
    for j in range(w.shape[1]):
        inverse = torch.linalg.inv(h[j:, j:])
        error = w[:, j] * (~keep[:, j]) / inverse[0, 0]
        w[:, j:] -= error.unsqueeze(1) * inverse[0].unsqueeze(0)
        w[:, j] = torch.where(keep[:, j], w[:, j], torch.zeros((), dtype=w.dtype))
    return w


# ---------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("shape", [(7, 16), (12, 40), (1, 8)])
def test_sparsegpt_equals_column_by_column_obs(shape):
    rows, cols = shape
    gen = torch.Generator().manual_seed(cols)
    weight = torch.randn(rows, cols, generator=gen)
    x = correlated_inputs(256, cols, seed=rows)
    hessian = (2 * x.t() @ x / x.shape[0]).float()
    pruned = weight.clone()
    keep = sparsegpt_prune_(pruned, hessian, 0.5, block_size=cols)
    assert int((~keep).sum()) == round(0.5 * weight.numel())
    expected = naive_obs(weight, hessian, keep, 0.01)
    assert torch.equal(pruned == 0, (~keep) | (expected == 0))
    torch.testing.assert_close(pruned.double(), expected, rtol=1e-3, atol=1e-4)


def test_sparsegpt_mask_uses_the_inverse_hessian_scores():
    # one block: scores w²/[U]²_jj with U the Cholesky factor of H⁻¹, chosen before any update
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 12, generator=gen)
    x = correlated_inputs(128, 12, seed=3)
    hessian = (2 * x.t() @ x / 128).float()
    h = hessian.double() + torch.eye(12, dtype=torch.float64) * 0.01 * hessian.double().diagonal().mean()
    factor = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    scores = weight.double().square() / factor.diagonal().square()
    k = round(0.25 * weight.numel())
    expected = torch.ones(weight.numel(), dtype=torch.bool)
    expected[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
    keep = sparsegpt_prune_(weight.clone(), hessian, 0.25, block_size=12)
    assert torch.equal(keep, expected.view(6, 12))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
@pytest.mark.parametrize("block_size", [4, 7, 128])
def test_sparsegpt_exact_counts_over_column_blocks(sparsity, block_size):
    weight = torch.randn(9, 30)
    x = correlated_inputs(64, 30)
    keep = sparsegpt_prune_(weight, (2 * x.t() @ x / 64).float(), sparsity, block_size=block_size)
    assert int((~keep).sum()) == round(sparsity * 270)
    assert bool((weight[~keep] == 0).all())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_sparsegpt_nm_masks_are_valid(n, m):
    weight = torch.randn(5, 32)
    x = correlated_inputs(64, 32)
    keep = sparsegpt_prune_(weight, (2 * x.t() @ x / 64).float(), n=n, m=m, block_size=16)
    validate_nm_mask({"w": keep}, n, m)
    assert bool((weight[~keep] == 0).all())


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=gen)
    x = correlated_inputs(512, 96, seed=1).float()
    acc = GramAccumulator(96, full=True)
    acc.add(x)
    target = x @ weight.t()

    def error(w):
        return float((x @ w.t() - target).square().mean())

    sgpt = weight.clone()
    sparsegpt_prune_(sgpt, acc.hessian(), 0.5)
    wanda_score = weight.abs() * acc.feature_norms().unsqueeze(0)
    wanda = weight * compute_unstructured_mask(nn.Linear(96, 64), 0.5, lambda _m, _n: wanda_score, scope="row")["weight"]
    magnitude = weight * (weight.abs() > weight.abs().flatten().kthvalue(weight.numel() // 2).values)
    assert error(sgpt) < 0.8 * error(wanda) < 0.8 * error(magnitude)


def test_sparsegpt_keeps_dtype_and_handles_dead_inputs():
    weight = torch.randn(4, 8).to(torch.bfloat16)
    x = correlated_inputs(32, 8).float()
    x[:, 3] = 0  # an input that never fires: its weights go first
    hessian = (2 * x.t() @ x / 32).float()
    keep = sparsegpt_prune_(weight, hessian, 0.25)
    assert weight.dtype == torch.bfloat16
    assert not bool(keep[:, 3].any())


def test_sparsegpt_rejects_bad_arguments():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="hessian"):
        sparsegpt_prune_(w, torch.eye(7), 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        sparsegpt_prune_(w, h)
    with pytest.raises(ValueError, match="multiple of m"):
        sparsegpt_prune_(torch.randn(4, 6), torch.eye(6), n=2, m=4)
    with pytest.raises(ValueError, match="damp"):
        sparsegpt_prune_(w, h, 0.5, damp=0)
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune_(w, -torch.eye(8), 0.5, damp=1e-6)


def test_gram_accumulator_gives_wanda_norms_and_the_hessian():
    x1, x2 = torch.randn(2, 5, 6), torch.randn(3, 6)
    full, diag = GramAccumulator(6, full=True), GramAccumulator(6, full=False)
    for acc in (full, diag):
        acc.add(x1)
        acc.add(x2)
    flat = torch.cat([x1.reshape(-1, 6), x2]).double()
    torch.testing.assert_close(full.hessian().double(), 2 * flat.t() @ flat / 13, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(diag.feature_norms(), flat.norm(dim=0).float())
    torch.testing.assert_close(full.feature_norms(), diag.feature_norms())
    with pytest.raises(ValueError, match="full=True"):
        diag.hessian()


# ---------------------------------------------------------------- OWL


def test_owl_sparsities_centre_on_the_target_with_a_bounded_spread():
    ratios = [0.01, 0.05, 0.02, 0.03]
    result = owl_sparsities(ratios, 0.7, lam=0.08)
    assert abs(sum(result) / 4 - 0.7) < 1e-12
    assert abs((max(result) - min(result)) - 0.16) < 1e-12
    # more outliers, less pruning
    assert sorted(range(4), key=lambda i: ratios[i]) == sorted(range(4), key=lambda i: -result[i])
    assert owl_sparsities([0.1, 0.1], 0.5) == [0.5, 0.5]
    with pytest.raises(ValueError, match="outside"):
        owl_sparsities([0.0, 1.0], 0.97, lam=0.1)
    with pytest.raises(ValueError, match="lam"):
        owl_sparsities([0.0, 1.0], 0.5, lam=0.9)


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 41.0])]
    # mean = 50/10 = 5; threshold 2 → cut 10: only 41 is above
    assert outlier_ratio(scores, 2.0) == pytest.approx(0.1)
    assert outlier_ratio(scores, 9.0) == 0.0


# ---------------------------------------------------------------- sequential


def test_decoder_blocks_are_found_from_the_module_tree():
    assert find_decoder_blocks(tiny_llama())[0] == "model.layers"
    assert find_decoder_blocks(tiny_gpt2())[0] == "transformer.h"
    with pytest.raises(ValueError, match="decoder blocks"):
        find_decoder_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_sequential_wanda_calibrates_each_block_on_the_pruned_blocks_before_it():
    data = batches()
    model = tiny_llama()
    masks = prune_model(model, data, "wanda", 0.5, progress=False)
    # by hand: block i's norms measured on the model whose blocks < i are already pruned
    manual = tiny_llama()
    expected = {}
    for i in range(3):
        norms = collect_activation_norms(manual, data, progress=False)
        block = compute_unstructured_mask(manual, 0.5, "wanda", scope="row", activation_norms=norms,
                                          include=f"model.layers.{i}.*", progress=False)
        with torch.no_grad():
            for name, keep in block.items():
                manual.get_parameter(name).mul_(keep)
        expected.update(block)
    assert set(masks) == set(expected)
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
    for name, param in model.named_parameters():
        assert torch.equal(param, manual.get_parameter(name)), name


def test_sequential_magnitude_equals_per_layer_magnitude_masks():
    model = tiny_llama()
    expected = compute_unstructured_mask(copy.deepcopy(model), 0.6, include="model.layers.*", progress=False)
    masks = prune_model(model, None, "magnitude", 0.6, progress=False)
    assert masks.keys() == expected.keys()
    assert all(torch.equal(masks[k], expected[k]) for k in masks)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_masks_for_every_method(method):
    model = tiny_gpt2() if method == "wanda" else tiny_llama()
    masks = prune_model(model, batches(), method, nm=(2, 4), progress=False)
    out_dims = {name: (1 if "transformer" in name else 0) for name in masks}
    validate_nm_mask(masks, 2, 4, out_dim=out_dims)
    for name, keep in masks.items():
        assert bool((model.get_parameter(name)[~keep] == 0).all())


def test_sparsegpt_on_gpt2_conv1d_keeps_the_layout():
    model = tiny_gpt2()
    masks = prune_model(model, batches(), "sparsegpt", 0.5, progress=False)
    for name, keep in masks.items():
        weight = model.get_parameter(name)
        assert keep.shape == weight.shape
        assert int((~keep).sum()) == round(0.5 * keep.numel())
        assert bool((weight[~keep] == 0).all())


def test_owl_gives_each_block_its_own_exact_sparsity():
    model = tiny_llama(layers=4)
    masks = prune_model(model, batches(), "sparsegpt", 0.6, owl=True, owl_lambda=0.05, progress=False)
    per_block = []
    for i in range(4):
        block = [m for n, m in masks.items() if n.startswith(f"model.layers.{i}.")]
        per_block.append(1 - sum(int(m.sum()) for m in block) / sum(m.numel() for m in block))
    assert 0.05 < max(per_block) - min(per_block) <= 2 * 0.05 + 1e-3  # a spread of 2·lambda at most
    assert abs(sum(per_block) / 4 - 0.6) < 2e-3


def test_offloaded_inputs_give_the_same_result(tmp_path):
    a, b = tiny_llama(), tiny_llama()
    masks_a = prune_model(a, batches(), "sparsegpt", 0.5, progress=False)
    masks_b = prune_model(b, batches(), "sparsegpt", 0.5, offload_dir=tmp_path, progress=False)
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert all(torch.equal(p, b.get_parameter(n)) for n, p in a.named_parameters())
    assert list(tmp_path.iterdir()) == []  # the spilled inputs are removed


def test_prune_model_rejects_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="method"):
        prune_model(model, batches(), "obs")
    with pytest.raises(ValueError, match="calibration_data"):
        prune_model(model, None, "wanda")
    with pytest.raises(ValueError, match="nm"):
        prune_model(model, batches(), "wanda", nm=(2, 4), owl=True)
    with pytest.raises(ValueError, match="scope"):
        prune_model(model, batches(), "sparsegpt", scope="row")
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(model, batches(), "wanda", 1.5)


def test_calibration_batches_are_seeded_windows():
    class Chars:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 96 for c in text]

    a = calibration_batches(Chars(), "abcdefghij" * 50, samples=10, seq_len=16, batch_size=4, seed=3)
    b = calibration_batches(Chars(), "abcdefghij" * 50, samples=10, seq_len=16, batch_size=4, seed=3)
    assert [x["input_ids"].shape for x in a] == [(4, 16), (4, 16), (2, 16)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert len(calibration_batches(Chars(), samples=2, seq_len=8)) == 1  # built-in text
    with pytest.raises(ValueError, match="seq_len"):
        calibration_batches(Chars(), "short", seq_len=16)
    with pytest.raises(ValueError, match="samples"):
        calibration_batches(Chars(), "x" * 100, samples=0)
