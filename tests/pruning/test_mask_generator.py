"""Mask generation: exact counts, the tie rule, agreement with torch.nn.utils.prune,
targets, scopes, structured / random / N:M methods."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from sparselora.pruning.importance import collect_activation_norms, wanda_importance
from sparselora.pruning.mask_generator import (
    MaskGenerator,
    compute_masks_for_state_dict,
    compute_nm_mask,
    compute_random_mask,
    compute_structured_mask,
    compute_unstructured_mask,
    sparsity_schedule,
)


def stable_sort_oracle(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Independent statement of the rule: prune the first k of a stable ascending sort."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.sort(flat, stable=True).indices[:k]] = True
    out, start = [], 0
    for s in scores:
        out.append(~pruned[start : start + s.numel()].view(s.shape))
        start += s.numel()
    return out


def linear_stack(*sizes: int, dtype=torch.float32) -> nn.Sequential:
    layers = [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
    return nn.Sequential(*layers).to(dtype)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.93, 1.0])
@pytest.mark.parametrize("global_pruning", [False, True])
def test_exact_pruned_count(sparsity, global_pruning):
    torch.manual_seed(1)
    model = linear_stack(7, 13, 1, 5)
    masks = compute_unstructured_mask(model, sparsity, global_pruning=global_pruning)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    assert list(masks) == ["0.weight", "1.weight", "2.weight"]
    if global_pruning:
        total = sum(w.numel() for w in weights)
        assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    else:
        for w, m in zip(weights, masks.values()):
            assert m.dtype == torch.bool and m.shape == w.shape
            assert int((~m).sum()) == round(sparsity * w.numel())


def test_global_equals_torch_global_unstructured():
    torch.manual_seed(2)
    model = linear_stack(33, 65, 17, 9)
    reference = copy.deepcopy(model)
    params = [(m, "weight") for m in reference if isinstance(m, nn.Linear)]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=0.6)
    masks = compute_unstructured_mask(model, 0.6, global_pruning=True)
    for (module, _), name in zip(params, masks):
        assert torch.equal(masks[name], module.weight_mask.bool())


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_per_layer_equals_torch_l1_unstructured(sparsity):
    torch.manual_seed(3)
    model = linear_stack(31, 47, 11)
    masks = compute_unstructured_mask(model, sparsity)
    for i, name in ((0, "0.weight"), (1, "1.weight")):
        layer = copy.deepcopy(model[i])
        torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
        assert torch.equal(masks[name], layer.weight_mask.bool())


@pytest.mark.parametrize(
    "make_weight",
    [
        lambda shape: torch.full(shape, 0.25),  # all equal
        lambda shape: torch.randint(-3, 4, shape).float(),  # integer valued, many ties
        lambda shape: torch.where(torch.rand(shape) < 0.6, 0.0, 1.0) * torch.randn(shape),  # many zeros
    ],
    ids=["all-equal", "integers", "many-zeros"],
)
@pytest.mark.parametrize("global_pruning", [False, True])
def test_ties_follow_lower_flat_index_first(make_weight, global_pruning):
    torch.manual_seed(4)
    model = linear_stack(9, 23, 7)
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(make_weight(layer.weight.shape))
    weights = [layer.weight.detach().abs() for layer in model]
    first = compute_unstructured_mask(model, 0.55, global_pruning=global_pruning)
    second = compute_unstructured_mask(model, 0.55, global_pruning=global_pruning)
    if global_pruning:
        expected = stable_sort_oracle(weights, round(0.55 * sum(w.numel() for w in weights)))
    else:
        expected = [stable_sort_oracle([w], round(0.55 * w.numel()))[0] for w in weights]
    for name, want in zip(first, expected):
        assert torch.equal(first[name], want)
        assert torch.equal(second[name], want)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 17),
    sparsity=st.floats(0.0, 1.0),
    values=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_property_count_and_ties(rows, cols, sparsity, values, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(0, values, (rows, cols), generator=gen).float())
    mask = compute_unstructured_mask(nn.Sequential(layer), sparsity)["0.weight"]
    k = round(sparsity * rows * cols)
    assert int((~mask).sum()) == k
    assert torch.equal(mask, stable_sort_oracle([layer.weight.detach()], k)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_models_match_fp32_of_same_values(dtype):
    torch.manual_seed(5)
    model = linear_stack(17, 29, 5, dtype=dtype)
    as_fp32 = copy.deepcopy(model).float()
    for global_pruning in (False, True):
        low = compute_unstructured_mask(model, 0.5, global_pruning=global_pruning)
        ref = compute_unstructured_mask(as_fp32, 0.5, global_pruning=global_pruning)
        for name in ref:
            assert torch.equal(low[name], ref[name])


def test_targets_of_a_bert_are_linear_weights_by_parameter_name():
    model = tiny_bert()
    masks = compute_unstructured_mask(model, 0.5)
    params = dict(model.named_parameters())
    linear_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(masks) == linear_names - {"pooler.dense.weight"}  # poolers and task heads stay dense
    assert "encoder.layer.0.attention.self.query.weight" in masks
    for name, mask in masks.items():
        assert mask.shape == params[name].shape


def test_lm_heads_stay_dense_and_conv1d_is_a_target():
    gpt2 = tiny_gpt2()
    masks = compute_unstructured_mask(gpt2, 0.5)
    assert "transformer.h.0.attn.c_attn.weight" in masks  # transformers' Conv1D
    assert not any("lm_head" in n or "wte" in n for n in masks)
    llama = tiny_llama()
    masks = compute_unstructured_mask(llama, 0.5)
    assert "model.layers.0.self_attn.q_proj.weight" in masks
    assert "lm_head.weight" not in masks


def test_include_exclude_globs():
    model = tiny_llama()
    only_attention = compute_unstructured_mask(model, 0.5, include="*.self_attn.*")
    assert only_attention and all(".self_attn." in n for n in only_attention)
    no_mlp = compute_unstructured_mask(model, 0.5, exclude=["*.mlp.*"])
    assert no_mlp and not any(".mlp." in n for n in no_mlp)


def test_sparsity_mapping_by_module_name_parameter_name_and_glob(three_layers):
    masks = compute_unstructured_mask(three_layers, {"layer1": 0.3, "layer2.weight": 0.5, "layer*": 0.7})
    assert set(masks) == {"layer1.weight", "layer2.weight", "layer3.weight"}
    for name, s in (("layer1.weight", 0.3), ("layer2.weight", 0.5), ("layer3.weight", 0.7)):
        assert int((~masks[name]).sum()) == round(s * masks[name].numel())
    partial = compute_unstructured_mask(three_layers, {"layer2": 0.5})
    assert set(partial) == {"layer2.weight"}


def test_structured_prunes_whole_output_channels_by_norm():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(10, 20), nn.Conv2d(3, 8, 3))
    masks = compute_structured_mask(model, 0.25, norm="l1")
    linear_mask = masks["0.weight"]
    kept_rows = linear_mask.all(dim=1)
    assert torch.equal(linear_mask, kept_rows[:, None].expand_as(linear_mask))
    assert int((~kept_rows).sum()) == 5
    norms = model[0].weight.detach().abs().sum(1)
    assert torch.equal(~kept_rows, norms <= norms.sort().values[4])
    conv_kept = masks["1.weight"].flatten(1).all(1)
    assert int((~conv_kept).sum()) == 2
    assert torch.equal(masks["1.weight"], conv_kept[:, None, None, None].expand(8, 3, 3, 3))


def test_structured_on_conv1d_prunes_output_columns():
    model = tiny_gpt2()
    mask = compute_structured_mask(model, 0.5, include="*.c_fc")["transformer.h.0.mlp.c_fc.weight"]
    kept_cols = mask.all(dim=0)
    assert torch.equal(mask, kept_cols[None, :].expand_as(mask))
    assert int((~kept_cols).sum()) == mask.shape[1] // 2


def test_random_is_seeded_and_exact(three_layers):
    a = compute_random_mask(three_layers, 0.4, seed=7)
    b = compute_random_mask(three_layers, 0.4, seed=7)
    c = compute_random_mask(three_layers, 0.4, seed=8)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert all(int((~m).sum()) == round(0.4 * m.numel()) for m in a.values())


def test_n_m_keeps_n_largest_in_every_run():
    torch.manual_seed(8)
    model = linear_stack(16, 8)
    mask = compute_nm_mask(model, n=2, m=4)["0.weight"]
    runs = mask.reshape(-1, 4)
    assert torch.equal(runs.sum(1), torch.full((runs.shape[0],), 2))
    w = model[0].weight.detach().abs().reshape(-1, 4)
    assert bool((w[runs].reshape(-1, 2).min(1).values >= w[~runs].reshape(-1, 2).max(1).values).all())


def test_taylor_metric_ranks_weight_times_gradient(three_layers):
    x = torch.randn(8, 12)
    three_layers(x).pow(2).sum().backward()
    masks = compute_unstructured_mask(three_layers, 0.5, importance_metric="taylor")
    for name, module in (("layer1.weight", three_layers.layer1), ("layer2.weight", three_layers.layer2)):
        score = (module.weight * module.weight.grad).abs().detach()
        assert torch.equal(masks[name], stable_sort_oracle([score], round(0.5 * score.numel()))[0])


def test_wanda_metric_uses_calibration_activations(three_layers):
    batches = [torch.randn(4, 12) for _ in range(3)]
    norms = collect_activation_norms(three_layers, batches)
    expected_norm = torch.cat(batches).norm(dim=0)
    torch.testing.assert_close(norms["layer1"], expected_norm)
    masks = MaskGenerator(three_layers, 0.5, importance_metric="wanda", calibration_data=batches).generate_masks()
    score = wanda_importance(three_layers.layer1, norms["layer1"])
    assert torch.equal(masks["layer1.weight"], stable_sort_oracle([score], round(0.5 * score.numel()))[0])


def test_custom_callable_metric(three_layers):
    masks = compute_unstructured_mask(three_layers, 0.5, importance_metric=lambda m, n: -m.weight.detach().abs())
    w = three_layers.layer1.weight.detach().abs()
    assert torch.equal(masks["layer1.weight"], stable_sort_oracle([-w], round(0.5 * w.numel()))[0])


@pytest.mark.parametrize("global_pruning", [False, True])
def test_state_dict_path_equals_model_path(global_pruning):
    model = tiny_bert()
    from_model = compute_unstructured_mask(model, 0.6, global_pruning=global_pruning)
    from_state = compute_masks_for_state_dict(model.state_dict(), 0.6, global_pruning=global_pruning)
    assert list(from_state) == list(from_model)
    assert all(torch.equal(from_state[n], from_model[n]) for n in from_model)


def test_sparsity_schedule_is_monotone_and_ends_at_final():
    schedule = sparsity_schedule(0.8, 5)
    assert schedule[0] == 0.0 and schedule[-1] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(schedule, schedule[1:]))
    assert sparsity_schedule(0.5, 1) == [0.5]
