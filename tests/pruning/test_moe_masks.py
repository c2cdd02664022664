"""Mixture-of-experts models in memory: each expert of a fused 3-D weight is a matrix of its own."""

from __future__ import annotations

import pytest
import torch
import transformers

from sparselora import ops
from sparselora.lora import SparseLoRAConfig, apply_sparse_lora, merge_all_lora_weights
from sparselora.pruning.mask_generator import compute_nm_mask, compute_unstructured_mask
from sparselora.pruning.mask_ops import (
    apply_masks_to_model,
    compute_sparsity_stats,
    load_mask,
    save_mask,
    validate_nm_mask,
)
from sparselora.pruning.oneshot import prune_model

EXPERTS = 4


def tiny_moe(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2)
    if family == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=48, num_local_experts=EXPERTS, **common)
    else:
        config = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=EXPERTS,
                                             head_dim=8, **common)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


FAMILIES = ["mixtral", "qwen3_moe"]


def experts_of(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".experts." in n}


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_are_targets_and_routers_stay_dense(family):
    model = tiny_moe(family)
    masks = compute_unstructured_mask(model, 0.5, progress=False)
    fused = experts_of(model)
    assert set(fused) <= set(masks) and len(fused) == 4  # gate_up_proj and down_proj of 2 blocks
    assert not any(n.endswith("mlp.gate.weight") for n in masks)  # routers
    for name, weight in fused.items():
        assert masks[name].shape == weight.shape and masks[name].dtype == torch.bool


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_scope_prunes_each_expert_as_its_own_group(family):
    model = tiny_moe(family)
    masks = compute_unstructured_mask(model, 0.5, progress=False)
    for name, weight in experts_of(model).items():
        for e in range(EXPERTS):
            (want,) = ops.select_prune_mask([weight[e].detach()], ops.prune_count(weight[e].numel(), 0.5), absolute=True)
            assert torch.equal(masks[name][e], want), (name, e)


@pytest.mark.parametrize("family", FAMILIES)
def test_global_scope_ranks_experts_with_everything_else(family):
    model = tiny_moe(family)
    masks = compute_unstructured_mask(model, 0.5, global_pruning=True, progress=False)
    names = list(masks)
    weights = [model.get_parameter(n).detach() for n in names]
    want = ops.select_prune_mask(weights, ops.prune_count(sum(w.numel() for w in weights), 0.5), absolute=True)
    assert all(torch.equal(masks[n], w) for n, w in zip(names, want))
    stats = compute_sparsity_stats(masks)
    for name in experts_of(model):
        per_expert = stats["per_layer"][name]["per_expert"]
        assert len(per_expert) == EXPERTS
        kept = masks[name].reshape(EXPERTS, -1).float().mean(1)
        assert per_expert == pytest.approx((1 - kept).tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_and_n_m_run_along_each_experts_input(family):
    model = tiny_moe(family)
    rows = compute_unstructured_mask(model, 0.5, scope="row", progress=False)
    nm = compute_nm_mask(model, 2, 4, progress=False)
    for name, weight in experts_of(model).items():
        inputs = weight.shape[-1]
        assert torch.equal((~rows[name]).sum(-1), torch.full(weight.shape[:2], inputs // 2))
        for e in range(EXPERTS):
            assert torch.equal(rows[name][e], ops.row_prune_mask(weight[e].detach(), inputs // 2, absolute=True))
            validate_nm_mask(nm[name][e], 2, 4)  # raises on a breach


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npz"])
def test_expert_masks_save_load_and_apply(tmp_path, suffix):
    model = tiny_moe("mixtral")
    masks = compute_unstructured_mask(model, 0.5, progress=False)
    save_mask(masks, tmp_path / f"masks{suffix}")
    loaded, _ = load_mask(tmp_path / f"masks{suffix}")
    assert all(torch.equal(loaded[n], m) for n, m in masks.items())
    apply_masks_to_model(model, loaded)
    for name, weight in experts_of(model).items():
        assert bool((weight[~masks[name]] == 0).all()), name


def test_sparse_lora_keeps_experts_frozen_and_sparse_and_refuses_to_adapt_them():
    model = tiny_moe("qwen3_moe")
    masks = compute_unstructured_mask(model, 0.5, progress=False)
    wrapped = apply_sparse_lora(model, masks, SparseLoRAConfig(r=2, sparsity_mode="sparse_to_sparse"))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(not p.requires_grad for p in experts_of(wrapped).values())
    merged = merge_all_lora_weights(wrapped)
    for name, weight in experts_of(merged).items():
        assert bool((weight[~masks[name]] == 0).all()), name
    for targets in (["gate_up_proj"], ["experts"], ["mlp.experts.down_proj"]):
        with pytest.raises(ValueError, match="cannot adapt fused experts yet"):
            apply_sparse_lora(tiny_moe("qwen3_moe"), masks, SparseLoRAConfig(r=2, target_modules=targets))


def test_wanda_mask_generation_refuses_experts_and_prune_model_says_it_keeps_them_dense():
    model = tiny_moe("mixtral")
    ids = [torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(ValueError, match="experts of a mixture-of-experts block"):
        compute_unstructured_mask(model, 0.5, importance_metric="wanda", calibration_data=ids, progress=False)
    before = {n: p.detach().clone() for n, p in experts_of(model).items()}
    with pytest.warns(UserWarning, match="keeps the 4 fused-experts weights"):
        masks = prune_model(model, ids, "wanda", 0.5, progress=False)
    assert not any(".experts." in n for n in masks)
    assert all(torch.equal(p, before[n]) for n, p in experts_of(model).items())
