"""Pruning methods on tiny hand-computed cases: Wanda (and its per-row scope), Taylor
accumulated over batches, N:M masks and their validation, gradual schedules and monotone
gradual pruning."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import tiny_gpt2
from torch import nn

from sparselora.pruning.importance import (
    collect_activation_norms,
    collect_taylor_importance,
    wanda_importance,
)
from sparselora.pruning.mask_generator import (
    MaskGenerator,
    compute_nm_mask,
    compute_random_mask,
    compute_structured_mask,
    compute_unstructured_mask,
    prune_gradually,
    sparsity_schedule,
)
from sparselora.pruning.mask_ops import validate_nm_mask

T, F = True, False


def linear(weight: list[list[float]]) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def row_oracle(score: torch.Tensor, sparsity: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Independent statement of the row rule: per row, a stable ascending sort, the already
    pruned first, and the first round(s·row) pruned."""
    keep = torch.ones_like(score, dtype=torch.bool)
    k = round(sparsity * score.shape[1])
    for r in range(score.shape[0]):
        key = score[r].double().clone()
        if prior is not None:
            key[~prior[r]] = -math.inf
        keep[r, torch.sort(key, stable=True).indices[:k]] = False
    return keep


# --- Wanda ---------------------------------------------------------------------------------


def test_activation_norms_hand_computed_over_tokens_and_batches():
    model = nn.Sequential(linear([[1.0, -2.0], [3.0, 0.5]]))
    # a (batch, tokens, features) batch and a (batch, features) one: every token counts
    batches = iter([torch.tensor([[[1.0, 2.0], [2.0, 0.0]]]), torch.tensor([[0.0, -1.0]])])
    norms = collect_activation_norms(model, batches)  # a one-shot iterator: streamed once
    assert list(norms) == ["0"]
    torch.testing.assert_close(norms["0"], torch.tensor([math.sqrt(5.0), math.sqrt(5.0)]))
    score = wanda_importance(model[0], norms["0"])
    r5 = math.sqrt(5.0)
    torch.testing.assert_close(score, torch.tensor([[r5, 2 * r5], [3 * r5, 0.5 * r5]]))


def test_activation_norms_rejects_unknown_module_names_and_restores_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).train()
    norms = collect_activation_norms(model, [torch.ones(1, 2)], module_names=["2"])
    assert list(norms) == ["2"] and model.training
    with pytest.raises(ValueError, match=r"module_names \['1'\] are not Linear modules"):
        collect_activation_norms(model, [torch.ones(1, 2)], module_names=["1"])


def test_row_scope_hand_computed():
    layer = nn.Sequential(linear([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]]))
    per_layer = compute_unstructured_mask(layer, 0.5)["0.weight"]
    per_row = compute_unstructured_mask(layer, 0.5, scope="row")["0.weight"]
    assert torch.equal(per_layer, torch.tensor([[F, F, F, F], [T, T, T, T]]))
    assert torch.equal(per_row, torch.tensor([[F, F, T, T], [F, F, T, T]]))
    # ties go lowest index first within each row
    tied = nn.Sequential(linear([[1.0, 1.0, 1.0, 1.0], [-2.0, 2.0, -2.0, 2.0]]))
    assert torch.equal(compute_unstructured_mask(tied, 0.25, scope="row")["0.weight"],
                       torch.tensor([[F, T, T, T], [F, T, T, T]]))


def test_wanda_row_scope_uses_activation_norms():
    model = nn.Sequential(linear([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    # feature 3 is silent, feature 0 loud: Wanda keeps what magnitude would drop
    norms = {"0": torch.tensor([10.0, 1.0, 1.0, 0.0])}
    wanda = compute_unstructured_mask(model, 0.5, "wanda", scope="row", activation_norms=norms)["0.weight"]
    magnitude = compute_unstructured_mask(model, 0.5, scope="row")["0.weight"]
    # scores: row 0 = [10, 2, 3, 0], row 1 = [40, 3, 2, 0]
    assert torch.equal(wanda, torch.tensor([[T, F, T, F], [T, T, F, F]]))
    assert torch.equal(magnitude, torch.tensor([[F, F, T, T], [T, T, F, F]]))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("cols", [1, 5, 7, 16])
def test_row_scope_exact_counts_equal_the_oracle(sparsity, cols):
    torch.manual_seed(cols)
    model = nn.Sequential(nn.Linear(cols, 9), nn.Linear(9, 3))
    with torch.no_grad():
        model[0].weight[:, 0] = model[0].weight[:, -1]  # some ties
    masks = compute_unstructured_mask(model, sparsity, scope="row")
    for name, layer in (("0.weight", model[0]), ("1.weight", model[1])):
        w = layer.weight.detach().abs()
        assert torch.equal((~masks[name]).sum(1), torch.full((w.shape[0],), round(sparsity * w.shape[1])))
        assert torch.equal(masks[name], row_oracle(w, sparsity))


def test_row_scope_on_conv_and_hf_conv1d_groups_by_output_channel():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, kernel_size=3))
    mask = compute_unstructured_mask(conv, 0.5, scope="row")["0.weight"]
    assert torch.equal((~mask).reshape(4, -1).sum(1), torch.full((4,), round(0.5 * 27)))
    gpt2 = tiny_gpt2()
    masks = compute_unstructured_mask(gpt2, 0.3, scope="row")
    w = gpt2.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out), rows are columns
    m = masks["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal((~m).sum(0), torch.full((w.shape[1],), round(0.3 * w.shape[0])))
    assert torch.equal(m.t(), row_oracle(w.detach().abs().t(), 0.3))


def test_random_row_scope_is_exact_and_seeded(three_layers):
    a = compute_random_mask(three_layers, 0.5, seed=3, scope="row")
    b = compute_random_mask(three_layers, 0.5, seed=3, scope="row")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal((~m).sum(1), torch.full((m.shape[0],), round(0.5 * m.shape[1]))) for m in a.values())


def test_scope_errors(three_layers):
    with pytest.raises(ValueError, match=r"scope='rows' is unknown; accepted: layer, global, row"):
        compute_unstructured_mask(three_layers, 0.5, scope="rows")
    with pytest.raises(ValueError, match=r"global_pruning=True contradicts scope='row'"):
        compute_unstructured_mask(three_layers, 0.5, global_pruning=True, scope="row")
    with pytest.raises(ValueError, match=r"scope='row' works with method='unstructured' or 'random'"):
        compute_structured_mask(three_layers, 0.5, scope="row")
    with torch.no_grad():
        three_layers.layer2.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"scores of 'layer2.weight' contain 1 NaN or inf"):
        compute_unstructured_mask(three_layers, 0.5, scope="row")


def test_scope_global_equals_global_pruning(three_layers):
    a = compute_unstructured_mask(three_layers, 0.6, scope="global")
    b = compute_unstructured_mask(three_layers, 0.6, global_pruning=True)
    assert all(torch.equal(a[n], b[n]) for n in a)


# --- Taylor over batches -----------------------------------------------------------------------


def sum_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).sum()  # d/dW = the batch's inputs summed over rows


def test_taylor_accumulates_per_batch_absolute_saliency():
    model = nn.Sequential(linear([[1.0, -1.0, 2.0, 0.5]]))
    batches = [torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([[-3.0, 0.0, 0.1, 0.4]])]
    scores = collect_taylor_importance(model, batches, sum_loss)
    # batch 1: |W·g| = [1, 1, 2, 0.5]; batch 2: [3, 0, 0.2, 0.2]; mean of the two
    # (|W · Σg| / 2 would give 1 for the first weight: its gradients cancel)
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[2.0, 0.5, 1.1, 0.35]]))
    assert model[0].weight.grad is None  # .grad is left alone

    masks = MaskGenerator(model, 0.5, importance_metric="taylor", calibration_data=batches,
                          loss_fn=sum_loss).generate_masks()
    assert torch.equal(masks["0.weight"], torch.tensor([[T, F, T, F]]))
    # the last batch's gradient alone ranks differently: prunes weight 2, keeps weight 3
    sum_loss(model, batches[-1]).backward()
    assert torch.equal(compute_unstructured_mask(model, 0.5, "taylor")["0.weight"], torch.tensor([[T, F, F, T]]))


def test_taylor_restores_frozen_weights_and_checks_its_input():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    scores = collect_taylor_importance(model, [torch.randn(4, 3)], sum_loss)
    assert list(scores) == ["0.weight", "1.weight"] and bool((scores["0.weight"] > 0).all())
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad
    with pytest.raises(ValueError, match="batches is empty"):
        collect_taylor_importance(model, [], sum_loss)
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        collect_taylor_importance(model, [torch.randn(4, 3)], lambda m, x: m(x))
    with pytest.raises(TypeError, match="loss_fn"):
        collect_taylor_importance(model, [torch.randn(4, 3)], "mse")
    with pytest.raises(ValueError, match=r"loss_fn is used by importance_metric='taylor' only"):
        MaskGenerator(model, 0.5, "unstructured", "magnitude", calibration_data=[1], loss_fn=sum_loss)
    with pytest.raises(ValueError, match=r"loss_fn needs calibration_data="):
        MaskGenerator(model, 0.5, "unstructured", "taylor", loss_fn=sum_loss)


# --- N:M -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_are_exact_and_validate(n, m):
    torch.manual_seed(n * 10 + m)
    model = nn.Sequential(nn.Linear(16, 5), nn.Linear(24, 8))  # not a working net: weights only
    masks = compute_nm_mask(model, n=n, m=m)
    for mask in masks.values():
        groups = mask.reshape(mask.shape[0], -1, m)
        assert torch.equal(groups.sum(2), torch.full(groups.shape[:2], n))
    validate_nm_mask(masks, n, m)


def test_nm_ties_hand_computed():
    model = nn.Sequential(linear([[1.0, 1.0, 1.0, 1.0, 5.0, -1.0, 4.0, 0.0]]))
    assert torch.equal(compute_nm_mask(model, 2, 4)["0.weight"], torch.tensor([[F, F, T, T, T, F, T, F]]))


def test_nm_validation_errors_name_layer_row_and_group():
    mask = torch.tensor([[T, T, F, F, T, F, F, T], [T, F, T, F, T, T, T, F]])
    validate_nm_mask({"a.weight": mask[:1]}, 2, 4)
    with pytest.raises(ValueError, match=r"'a\.weight' breaks the 2:4 pattern in 1 group\(s\); first: row 1, "
                                         r"input columns 4\.\.7 keep 3 of 4 weights \(must keep exactly 2\)"):
        validate_nm_mask({"a.weight": mask}, 2, 4)
    with pytest.raises(ValueError, match=r"'b': rows have 6 input weights, not a multiple of m=4"):
        validate_nm_mask({"b": torch.ones(2, 6, dtype=torch.bool)}, 2, 4)
    for n, m in ((3, 2), (0, 4), (4, 4), (True, 4), (2, 4.0)):
        with pytest.raises((ValueError, TypeError), match=r"must be ints with 0 < n < m"):
            validate_nm_mask(mask, n, m)
    with pytest.raises(ValueError, match="1-D mask"):
        validate_nm_mask(torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="holds values other than 0 and 1"):
        validate_nm_mask(torch.full((2, 4), 2.0))


def test_nm_on_hf_conv1d_runs_along_the_input_dimension():
    model = tiny_gpt2()
    masks = compute_nm_mask(model, 2, 4)
    conv1d = {n: 1 for n in masks if n.startswith("transformer.h.")}
    validate_nm_mask(masks, 2, 4, out_dim=conv1d)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.weight' breaks the 2:4 pattern"):
        validate_nm_mask(masks, 2, 4)  # read as (out, in) the groups are wrong


# --- gradual pruning ---------------------------------------------------------------------------


def test_schedule_at_explicit_steps_hand_computed():
    schedule = sparsity_schedule(0.8, steps=[0, 10, 30, 100])
    expected = [0.0, 0.8 * (1 - 0.9**3), 0.8 * (1 - 0.7**3), 0.8]
    assert schedule == pytest.approx(expected)
    assert schedule[-1] == 0.8
    assert sparsity_schedule(0.8, 5) == pytest.approx(sparsity_schedule(0.8, steps=[0, 1, 2, 3, 4]))
    assert sparsity_schedule(0.6, steps=[7]) == [0.6]


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
@pytest.mark.parametrize(("initial", "final"), [(0.0, 0.9), (0.2, 0.5), (0.5, 0.5)])
def test_schedules_are_monotone(power, initial, final):
    for schedule in (sparsity_schedule(final, 9, initial, power),
                     sparsity_schedule(final, initial_sparsity=initial, power=power, steps=[3, 4, 10, 50, 51, 200])):
        assert schedule[0] == pytest.approx(initial) and schedule[-1] == final
        assert all(a <= b for a, b in itertools.pairwise(schedule))


def test_schedule_errors():
    with pytest.raises(ValueError, match="exactly one of num_steps"):
        sparsity_schedule(0.5)
    with pytest.raises(ValueError, match="exactly one of num_steps"):
        sparsity_schedule(0.5, 3, steps=[0, 1, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        sparsity_schedule(0.5, steps=[0, 5, 5])
    with pytest.raises(ValueError, match="must hold ints"):
        sparsity_schedule(0.5, steps=[0, 1.5])
    with pytest.raises(ValueError, match=r"power=0 must be a finite number > 0"):
        sparsity_schedule(0.5, 3, power=0)


def regrowing_metric(module: nn.Module, _name: str) -> torch.Tensor:
    # prefers small weights: the zeros of pruned weights score highest, so masks recomputed
    # from scratch bring them back
    return -module.weight.detach().abs()


@pytest.mark.parametrize("scope", ["layer", "global", "row"])
def test_prune_gradually_is_monotone_with_exact_counts(scope):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 7))
    seen: list[dict[str, torch.Tensor]] = []

    def train(model, masks, step):
        seen.append({n: m.clone() for n, m in masks.items()})
        with torch.no_grad():  # a "training step" that moves every weight
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)

    schedule = [0.2, 0.4, 0.6, 0.8]
    final = prune_gradually(model, schedule, train, importance_metric=regrowing_metric, scope=scope)
    assert all(torch.equal(final[n], seen[-1][n]) for n in final)
    for before, after in itertools.pairwise(seen):
        for name in after:
            assert torch.equal(after[name] & before[name], after[name])  # nothing grew back
    weights = {"0.weight": model[0].weight, "1.weight": model[1].weight}
    for step, s in enumerate(schedule):
        if scope == "global":
            total = sum(w.numel() for w in weights.values())
            assert sum(int((~m).sum()) for m in seen[step].values()) == round(s * total)
        elif scope == "row":
            for name, w in weights.items():
                assert torch.equal((~seen[step][name]).sum(1), torch.full((w.shape[0],), round(s * w.shape[1])))
        else:
            assert all(int((~seen[step][n]).sum()) == round(s * w.numel()) for n, w in weights.items())
    assert all(int((w.detach()[~final[n]] != 0).sum()) == 0 for n, w in weights.items())


def test_prune_gradually_regrows_only_when_allowed():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 12))
    seen: list[torch.Tensor] = []
    prune_gradually(model, [0.3, 0.5], lambda m, masks, step: seen.append(masks["0.weight"].clone()),
                    importance_metric=regrowing_metric, allow_regrowth=True)
    assert bool((seen[1] & ~seen[0]).any())  # a weight pruned at step 0 is back at step 1
    with pytest.raises(ValueError, match=r"schedule\[2\]=0\.3 is below schedule\[1\]=0\.5.*allow_regrowth=True"):
        prune_gradually(model, [0.1, 0.5, 0.3])


@pytest.mark.parametrize("scope", ["layer", "global", "row"])
def test_previous_masks_reselect_among_kept_weights(scope):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 5))
    previous = compute_random_mask(model, 0.3, seed=1, scope="row" if scope == "row" else "layer")
    masks = MaskGenerator(model, 0.5, scope=scope).generate_masks(previous_masks=previous)
    names = list(masks)
    scores = [model[i].weight.detach().abs() for i in range(2)]
    if scope == "row":
        expected = [row_oracle(s, 0.5, previous[n]) for s, n in zip(scores, names)]
    else:
        # oracle: already-pruned first, then a stable ascending sort of the rest
        groups = [[0], [1]] if scope == "layer" else [[0, 1]]
        expected = [None, None]
        for group in groups:
            key = torch.cat([scores[i].reshape(-1).double().masked_fill(~previous[names[i]].reshape(-1), -math.inf)
                             for i in group])
            pruned = torch.zeros(key.numel(), dtype=torch.bool)
            pruned[torch.sort(key, stable=True).indices[: round(0.5 * key.numel())]] = True
            start = 0
            for i in group:
                expected[i] = ~pruned[start : start + scores[i].numel()].view(scores[i].shape)
                start += scores[i].numel()
    for name, want in zip(names, expected):
        assert torch.equal(masks[name], want)
        assert torch.equal(masks[name] & previous[name], masks[name])
    with pytest.raises(ValueError, match="previous_masks already prune"):
        MaskGenerator(model, 0.1, scope=scope).generate_masks(previous_masks=previous)
