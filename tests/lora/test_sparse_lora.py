"""Sparse LoRA: PEFT conventions, both sparsity modes, merge invariants."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from conftest import tiny_bert, tiny_llama
from sparselora.lora import (
    SparseLoRAConfig,
    SparseLoRALinear,
    apply_sparse_lora,
    merge_all_lora_weights,
    validate_sparsity_preserved,
)
from sparselora.pruning.mask_generator import compute_unstructured_mask

MODES = ["sparse_to_dense", "sparse_to_sparse"]


def tokens(batch=4, length=12, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def train_steps(model, ids, steps=8, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("mode", MODES)
def test_fresh_adapter_leaves_outputs_unchanged(mode):
    model = tiny_bert()
    masks = compute_unstructured_mask(model, 0.5)
    ids = tokens()
    pruned = copy.deepcopy(model)
    from sparselora.pruning.mask_ops import apply_masks_to_model

    apply_masks_to_model(pruned, masks)
    expected = pruned(input_ids=ids).last_hidden_state
    wrapped = apply_sparse_lora(model, masks, SparseLoRAConfig(r=4, sparsity_mode=mode)).eval()
    torch.testing.assert_close(wrapped(input_ids=ids).last_hidden_state, expected)


def test_only_adapters_train_and_names_follow_peft():
    model = tiny_llama()
    masks = compute_unstructured_mask(model, 0.5)
    model = apply_sparse_lora(model, masks, SparseLoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {
        f"model.layers.{i}.self_attn.{proj}.{ab}" for i in (0, 1) for proj in ("q_proj", "v_proj") for ab in ("lora_A", "lora_B")
    }
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, SparseLoRALinear)
    assert q.lora_A.shape == (4, q.in_features) and q.lora_B.shape == (q.out_features, 4)
    assert torch.count_nonzero(q.lora_B) == 0
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert not isinstance(model.model.layers[0].self_attn.k_proj, SparseLoRALinear)


def test_sparse_to_dense_forward_matches_peft():
    import peft
    base = tiny_llama()
    ours = apply_sparse_lora(copy.deepcopy(base), {}, SparseLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, SparseLoRALinear):
                module.lora_B.normal_()
                peft_layer = theirs.base_model.model.get_submodule(name)
                peft_layer.lora_A["default"].weight.copy_(module.lora_A)
                peft_layer.lora_B["default"].weight.copy_(module.lora_B)
    ids = tokens()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_sparse_to_dense_merge_with_preserve_passes_validation():
    model = tiny_llama()
    masks = compute_unstructured_mask(model, 0.7, global_pruning=True)
    model = apply_sparse_lora(model, masks, SparseLoRAConfig(r=4, sparsity_mode="sparse_to_dense"))
    losses = train_steps(model, tokens())
    assert losses[-1] < losses[0]
    ok, report = validate_sparsity_preserved(model, masks)
    assert not ok and report["global"]["total_violations"] > 0  # the dense delta fills pruned slots
    merged = merge_all_lora_weights(model, preserve_sparsity=True)
    assert not any(isinstance(m, SparseLoRALinear) for m in merged.modules())
    ok, report = validate_sparsity_preserved(merged, masks, tolerance=0.0)
    assert ok and report["global"]["total_violations"] == 0


def test_sparse_to_dense_merge_without_preserve_densifies():
    model = tiny_llama()
    masks = compute_unstructured_mask(model, 0.5)
    model = apply_sparse_lora(model, masks, SparseLoRAConfig(r=4, sparsity_mode="sparse_to_dense"))
    train_steps(model, tokens(), steps=3)
    ids = tokens(seed=1)
    before = model(input_ids=ids).logits
    merged = merge_all_lora_weights(model, preserve_sparsity=False)
    torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    ok, report = validate_sparsity_preserved(merged, masks)
    assert not ok and report["global"]["violation_rate"] > 0.5


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sparse_to_sparse_trains_sparse_and_merges_exactly(dropout):
    model = tiny_llama()
    masks = compute_unstructured_mask(model, 0.7, global_pruning=True)
    config = SparseLoRAConfig(r=8, alpha=16, dropout=dropout, sparsity_mode="sparse_to_sparse", maintain_sparsity=True)
    model = apply_sparse_lora(model, masks, config)
    losses = train_steps(model, tokens(), steps=10)
    assert losses[-1] < losses[0]
    ok, _ = validate_sparsity_preserved(model, masks, tolerance=0.0)  # effective weights, mid-training
    assert ok
    ids = tokens(seed=2)
    before = model(input_ids=ids).logits
    merged = merge_all_lora_weights(model)
    torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    ok, report = validate_sparsity_preserved(merged, masks, tolerance=0.0)
    assert ok and report["global"]["total_pruned"] == sum(int((~m).sum()) for m in masks.values())


def test_sparse_to_sparse_gradients_are_masked_weight_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(7, 5)
    mask = torch.rand(5, 7) > 0.5
    model = apply_sparse_lora(nn.Sequential(layer), {"0.weight": mask}, SparseLoRAConfig(r=3, dropout=0.0, sparsity_mode="sparse_to_sparse"))
    lora = model[0]
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 7, requires_grad=True)
    dy = torch.randn(4, 5)
    model(x).backward(dy)
    # by hand: G = (dYᵀX) ⊙ M ; dB = s·G Aᵀ ; dA = s·Bᵀ G ; dX = dY W_eff
    g = (dy.T @ x.detach()) * mask
    s = lora.scaling
    w_eff = ((lora.weight + s * lora.lora_B @ lora.lora_A) * mask).detach()
    torch.testing.assert_close(lora.lora_B.grad, s * g @ lora.lora_A.detach().T)
    torch.testing.assert_close(lora.lora_A.grad, s * lora.lora_B.detach().T @ g)
    torch.testing.assert_close(x.grad, dy @ w_eff)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_merge_in_low_precision_is_exactly_sparse(dtype):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(33, 17), nn.Linear(17, 9)).to(dtype)
    masks = compute_unstructured_mask(model, 0.5)
    model = apply_sparse_lora(model, masks, SparseLoRAConfig(r=4, dropout=0.0, sparsity_mode="sparse_to_sparse"))
    with torch.no_grad():
        for m in model:
            m.lora_B.normal_()
    x = torch.randn(3, 33, dtype=dtype)
    before = model(x)
    merged = merge_all_lora_weights(model)
    after = merged(x)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(after, before, rtol=tol, atol=tol)
    assert validate_sparsity_preserved(merged, masks, tolerance=0.0)[0]
    assert merged[0].weight.dtype == dtype


def test_merge_guards_against_nan_in_pruned_slots():
    layer = nn.Linear(4, 3)
    mask = torch.tensor([[True, False, True, False]] * 3)
    with torch.no_grad():
        layer.weight[:, 1] = float("nan")
    model = apply_sparse_lora(nn.Sequential(layer), {"0": mask}, SparseLoRAConfig(r=2, dropout=0.0))
    assert torch.equal(model[0].weight[:, 1], torch.zeros(3))
    with torch.no_grad():
        model[0].lora_B.fill_(float("nan"))
    merged = merge_all_lora_weights(model, preserve_sparsity=True)
    assert torch.equal(merged[0].weight[~mask], torch.zeros(int((~mask).sum())))


def test_merge_is_idempotent_and_needs_adapters():
    model = tiny_llama()
    masks = compute_unstructured_mask(model, 0.5)
    merged = merge_all_lora_weights(apply_sparse_lora(model, masks, SparseLoRAConfig(r=2)))
    snapshot = {k: v.clone() for k, v in merged.state_dict().items()}
    with pytest.raises(ValueError, match="no sparse LoRA layers"):
        merge_all_lora_weights(merged)
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in snapshot.items())


def test_masks_none_uses_initial_sparsity(three_layers):
    model = apply_sparse_lora(three_layers, None, SparseLoRAConfig(r=2, initial_sparsity=0.25))
    for layer in (model.layer1, model.layer2, model.layer3):
        pruned = int((~layer.weight_mask).sum())
        assert pruned == round(0.25 * layer.weight.numel())
        assert int((layer.weight == 0).sum()) >= pruned


def test_config_defaults_follow_the_seed():
    config = SparseLoRAConfig()
    assert (config.r, config.alpha, config.dropout, config.target_modules) == (16, 32, 0.05, ["Linear", "Conv1D"])
    assert config.scaling == 2.0
    assert SparseLoRAConfig(sparsity_mode="sparse_to_sparse").maintain_sparsity is True
    assert SparseLoRAConfig(sparsity_mode="sparse_to_dense").maintain_sparsity is False


def test_seed_path_and_pruning_api_hand_on_the_lora_package():
    import sparselora.lora as lora
    import sparselora.pruning as pruning
    import sparselora.pruning.sparse_lora as seed

    assert set(seed.__all__) <= set(lora.__all__)
    for name in seed.__all__:
        assert getattr(seed, name) is getattr(lora, name), name
    for name in set(pruning.__all__) & set(lora.__all__):
        assert getattr(pruning, name) is getattr(lora, name), name


@pytest.mark.parametrize("mode", ["sparse_to_dense", "sparse_to_sparse"])
def test_masks_survive_a_model_built_on_the_meta_device(mode):
    """Large models are built on ``meta`` and given storage by ``to_empty`` (as before
    ``fully_shard``): the masks keep their values, and follow the weights to their device."""
    base = nn.Sequential(nn.Linear(24, 16), nn.Linear(16, 8))
    masks = compute_unstructured_mask(base, 0.5, progress=False)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(24, 16), nn.Linear(16, 8))
    model = apply_sparse_lora(meta, masks, SparseLoRAConfig(r=2, sparsity_mode=mode))
    model.to_empty(device="cpu")
    for name, layer in model.named_modules():
        if isinstance(layer, SparseLoRALinear):
            assert layer.packed_mask.device.type == "cpu"
            assert torch.equal(layer.weight_mask, masks[f"{name}.weight"]), name
    model.half()  # a dtype conversion leaves the packed bits as they are
    assert all(layer.packed_mask.dtype == torch.uint8 for layer in model.modules() if isinstance(layer, SparseLoRALinear))
