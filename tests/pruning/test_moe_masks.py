"""Mixture-of-experts models in memory: each expert of a fused 3-D weight is a matrix of its own."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from conftest import VOCAB
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
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
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


def test_wanda_mask_generation_refuses_experts():
    model = tiny_moe("mixtral")
    ids = [torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(ValueError, match="experts of a mixture-of-experts block"):
        compute_unstructured_mask(model, 0.5, importance_metric="wanda", calibration_data=ids, progress=False)


# ----- one-shot pruning: each expert calibrated on the tokens routed to it -------------------

def calibration(count: int = 4, length: int = 16) -> list[torch.Tensor]:
    return [torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(i)) for i in range(count)]


def routed_reference(model, batches, layer: int = 0):
    """Each expert's inputs in block ``layer`` of the dense model, found independently: the
    experts module's arguments, split by the router's choice, and the expert MLP written out."""
    experts = model.model.layers[layer].mlp.experts
    seen = []
    handle = experts.register_forward_hook(lambda _m, args, _out: seen.append((args[0].detach(), args[1].detach())))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    handle.remove()
    hidden = torch.cat([h for h, _ in seen])
    index = torch.cat([i for _, i in seen])
    per_expert = []
    for e in range(EXPERTS):
        x = hidden[(index == e).any(-1)]
        gate, up = (x @ experts.gate_up_proj[e].detach().t()).chunk(2, dim=-1)
        per_expert.append((x, experts.act_fn(gate) * up))
    return per_expert


def wanda_rows(weight: torch.Tensor, inputs: torch.Tensor, sparsity: float) -> torch.Tensor:
    score = weight.abs().float() * inputs.float().norm(dim=0)
    return ops.row_prune_mask(score, int(round(sparsity * weight.shape[1])), absolute=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_calibrates_each_expert_on_its_routed_tokens(family):
    dense, batches = tiny_moe(family), calibration()
    reference = routed_reference(dense, batches)
    experts = dense.model.layers[0].mlp.experts
    pruned = tiny_moe(family)
    masks = prune_model(pruned, batches, "wanda", 0.5, progress=False)
    gate_up, down = masks["model.layers.0.mlp.experts.gate_up_proj"], masks["model.layers.0.mlp.experts.down_proj"]
    for e, (x, inner) in enumerate(reference):
        assert x.shape[0] > 0
        assert torch.equal(gate_up[e], wanda_rows(experts.gate_up_proj[e].detach(), x, 0.5)), e
        assert torch.equal(down[e], wanda_rows(experts.down_proj[e].detach(), inner, 0.5)), e
    for name, weight in experts_of(pruned).items():  # every expert exactly at its sparsity, zeros in place
        assert torch.equal(weight == 0, ~masks[name]) or bool((weight[~masks[name]] == 0).all())
        assert torch.equal((~masks[name]).sum(-1), torch.full(weight.shape[:2], weight.shape[-1] // 2))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_model_prunes_every_expert_at_50_percent_and_2_4(family, method):
    for kwargs in ({"sparsity": 0.5}, {"sparsity": None, "nm": (2, 4)}):
        model = tiny_moe(family)
        masks = prune_model(model, calibration(), method, progress=False, **kwargs)
        for name, weight in experts_of(model).items():
            mask = masks[name]
            assert mask.shape == weight.shape and bool((weight[~mask] == 0).all())
            for e in range(EXPERTS):
                if "nm" in kwargs:
                    validate_nm_mask(mask[e], 2, 4)
                else:
                    assert int((~mask[e]).sum()) == mask[e].numel() // 2, (name, e)


def route_away_from(model, expert: int) -> None:
    """Make every block's router never choose ``expert`` (its logit is -inf before the top-k)."""
    for layer in model.model.layers:
        router = layer.mlp.gate
        top_k = router.top_k

        def forward(hidden, router=router, top_k=top_k):
            logits = torch.nn.functional.linear(hidden.reshape(-1, router.weight.shape[1]), router.weight)
            logits[:, expert] = float("-inf")
            probs = logits.float().softmax(-1)
            values, index = probs.topk(top_k, dim=-1)
            return logits, values / values.sum(-1, keepdim=True), index

        router.forward = forward


def test_an_expert_without_tokens_is_pruned_by_magnitude_and_named():
    model = tiny_moe("mixtral")
    route_away_from(model, 3)
    before = experts_of(model)["model.layers.0.mlp.experts.gate_up_proj"].detach().clone()
    with pytest.warns(UserWarning, match=r"received none of the calibration tokens .*gate_up_proj\[3\]"):
        masks = prune_model(model, calibration(), "wanda", 0.5, progress=False)
    # by magnitude, in Wanda's groups (rows)
    want = ops.row_prune_mask(before[3], before[3].shape[1] // 2, absolute=True)
    assert torch.equal(masks["model.layers.0.mlp.experts.gate_up_proj"][3], want)


def test_all_experts_calibrates_every_expert_on_every_token():
    model = tiny_moe("mixtral")
    route_away_from(model, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = prune_model(model, calibration(), "wanda", 0.5, all_experts=True, progress=False)
    assert int((~masks["model.layers.0.mlp.experts.down_proj"][3]).sum()) == 32 * 48 // 2
    with pytest.raises(TypeError, match="all_experts"):
        prune_model(tiny_moe("mixtral"), calibration(), "wanda", 0.5, all_experts="yes", progress=False)
