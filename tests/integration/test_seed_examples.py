"""Every code example of the seed document, run as written with ``sparselora.`` in front of
the module path and a small concrete model in place of ``model = ...``; each test checks
what the example promises (exact counts, round trips, the printed keys, the files written)."""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

import sparselora.ops
from conftest import LLAMA_BASE_CONFIG

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def pruned(mask: torch.Tensor) -> int:
    return int((~mask).sum())


def train_adapters(model: nn.Module, steps: int = 5, seed: int = 1) -> None:
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 16)
        loss = model(x).pow(2).mean()
        sgd_step(params, loss, lr=0.1)
    model.eval()


def sgd_step(params: list[torch.Tensor], loss: torch.Tensor, lr: float) -> None:
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g


# --- 1. Importance metrics -------------------------------------------------------------


def test_importance_metrics():
    from sparselora.pruning.importance import magnitude_importance, taylor_importance

    layer = small_model()[0]

    importance = magnitude_importance(layer)
    assert torch.equal(importance, layer.weight.detach().abs())
    assert not importance.requires_grad

    x = torch.randn(4, 16)
    layer(x).pow(2).sum().backward()
    importance = taylor_importance(layer)  # Requires gradients
    assert torch.equal(importance, (layer.weight.detach() * layer.weight.grad).abs())
    assert importance.shape == layer.weight.shape and not importance.requires_grad


# --- 2. Mask generation ------------------------------------------------------------------


def test_mask_generator_and_direct_function():
    from sparselora.pruning.mask_generator import MaskGenerator, compute_unstructured_mask

    model = small_model()

    generator = MaskGenerator(
        model=model,
        sparsity=0.5,
        method="unstructured",
        importance_metric="magnitude"
    )
    masks = generator.generate_masks()

    masks2 = compute_unstructured_mask(
        model=model,
        sparsity=0.5,
        importance_metric="magnitude"
    )

    weights = linear_weights(model)
    assert list(masks) == list(weights) == ["0.weight", "2.weight", "4.weight"]
    assert masks.keys() == masks2.keys()
    for name, w in weights.items():
        assert masks[name].dtype == torch.bool and masks[name].shape == w.shape
        assert pruned(masks[name]) == round(0.5 * w.numel())
        assert torch.equal(masks[name], masks2[name])
        layer = copy.deepcopy(dict(model.named_modules())[name.rsplit(".", 1)[0]])
        torch_prune.l1_unstructured(layer, "weight", amount=0.5)
        assert torch.equal(masks[name], layer.weight_mask.bool())


@pytest.mark.parametrize("method", ["unstructured", "structured", "random"])
def test_supported_methods(method):
    from sparselora.pruning.mask_generator import MaskGenerator

    model = small_model()
    masks = MaskGenerator(model=model, sparsity=0.5, method=method).generate_masks()
    for name, w in linear_weights(model).items():
        mask = masks[name]
        assert mask.shape == w.shape
        if method == "structured":
            rows = mask.all(dim=1) | (~mask).all(dim=1)
            assert bool(rows.all())
            assert int((~mask.all(dim=1)).sum()) == round(0.5 * w.shape[0])
        else:
            assert pruned(mask) == round(0.5 * w.numel())


# --- 3. Mask operations ------------------------------------------------------------------


def test_mask_operations(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from sparselora.pruning.mask_generator import compute_unstructured_mask
    from sparselora.pruning.mask_ops import (
        validate_mask,
        save_mask,
        load_mask,
        compute_sparsity_stats,
        plot_sparsity_histogram
    )

    model = small_model()
    masks = compute_unstructured_mask(model, 0.5)
    mask = masks["2.weight"]

    is_valid, stats = validate_mask(mask, expected_sparsity=0.5, tolerance=0.01)
    assert is_valid is True and stats["error"] is None
    assert stats["sparsity"] == 0.5 and stats["num_pruned"] == 512 and stats["num_kept"] == 512

    save_mask(masks, "masks.pt", metadata={"sparsity": 0.5}, format="pt")
    assert (tmp_path / "masks.pt").is_file()

    loaded, metadata = load_mask("masks.pt", format="pt")
    assert metadata == {"sparsity": 0.5}
    assert list(loaded) == list(masks)
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)

    stats = compute_sparsity_stats(loaded)
    print(f"Global sparsity: {stats['global']['sparsity']:.2%}")
    assert capsys.readouterr().out == "Global sparsity: 50.00%\n"

    fig = plot_sparsity_histogram(loaded, save_path="histogram.png")
    data = (tmp_path / "histogram.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert fig is not None
    assert sorted(os.listdir(tmp_path)) == ["histogram.png", "masks.pt"]


# --- 4. Sparse LoRA ----------------------------------------------------------------------


def test_sparse_lora_config_apply_merge_validate(capsys):
    from sparselora.pruning.mask_generator import compute_unstructured_mask
    from sparselora.pruning.sparse_lora import (
        SparseLoRAConfig,
        apply_sparse_lora,
        merge_all_lora_weights,
        validate_sparsity_preserved
    )
    from sparselora.pruning.sparse_lora import SparseLoRALinear

    model = small_model()
    masks = compute_unstructured_mask(model, 0.5)
    original_masks = {k: v.clone() for k, v in masks.items()}
    dense = {k: w.detach().clone() for k, w in linear_weights(model).items()}

    config = SparseLoRAConfig(
        r=16,                    # LoRA rank
        alpha=32,                # Scaling factor
        dropout=0.05,            # Dropout
        target_modules=["Linear"],
        sparsity_mode="sparse_to_dense",
        initial_sparsity=0.5,
        preserve_sparsity_on_merge=True
    )
    assert config.scaling == 2.0 and config.maintain_sparsity is False

    model = apply_sparse_lora(model, masks, config)

    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)}
    assert sorted(wrapped) == ["0", "2", "4"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{ab}" for n in wrapped for ab in "AB")
    for name, layer in wrapped.items():
        mask = masks[f"{name}.weight"]
        assert torch.equal(layer.weight.detach(), dense[f"{name}.weight"] * mask)

    train_adapters(model)
    expected = {}
    for name, layer in wrapped.items():
        assert layer.lora_B.abs().sum() > 0
        delta = layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach())
        expected[name] = (layer.weight.detach() + delta) * masks[f"{name}.weight"]

    model = merge_all_lora_weights(model, preserve_sparsity=True)

    assert not any(isinstance(m, SparseLoRALinear) for m in model.modules())
    for name, w in linear_weights(model).items():
        assert type(dict(model.named_modules())[name[: -len(".weight")]]) is nn.Linear
        assert torch.allclose(w.detach(), expected[name[: -len(".weight")]], atol=1e-6)
        assert int((w.detach()[~original_masks[name]] != 0).sum()) == 0

    is_valid, report = validate_sparsity_preserved(model, original_masks)
    print(f"Sparsity preserved: {is_valid}")
    assert capsys.readouterr().out == "Sparsity preserved: True\n"
    assert report["global"]["total_violations"] == 0
    assert report["global"]["total_pruned"] == sum(pruned(m) for m in original_masks.values())


# --- Usage examples 1-3 ------------------------------------------------------------------


def example_1(tmp_path, capsys):
    import torch
    import torch.nn as nn
    from sparselora.pruning.mask_generator import compute_unstructured_mask
    from sparselora.pruning.mask_ops import save_mask, compute_sparsity_stats

    # Load model
    model = small_model()

    # Compute masks
    masks = compute_unstructured_mask(
        model,
        sparsity=0.7,  # 70% sparsity
        importance_metric="magnitude",
        global_pruning=True
    )

    # Compute stats
    stats = compute_sparsity_stats(masks)
    print(f"Generated masks with {stats['global']['sparsity']:.2%} sparsity")

    # Save masks
    save_mask(
        masks,
        "masks_70pct.pt",
        metadata={
            "sparsity": 0.7,
            "method": "unstructured",
            "importance": "magnitude"
        }
    )
    return model, masks, stats


def test_example_1_generate_masks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model, masks, stats = example_1(tmp_path, capsys)

    weights = linear_weights(model)
    total = sum(w.numel() for w in weights.values())
    k = round(0.7 * total)
    assert sum(pruned(m) for m in masks.values()) == k
    assert stats["global"]["total_pruned"] == k and stats["global"]["total_params"] == total
    assert capsys.readouterr().out == f"Generated masks with {k / total:.2%} sparsity\n"

    reference = copy.deepcopy(model)
    layers = [m for m in reference.modules() if isinstance(m, nn.Linear)]
    torch_prune.global_unstructured(
        [(m, "weight") for m in layers], pruning_method=torch_prune.L1Unstructured, amount=0.7
    )
    for name, layer in zip(weights, layers):
        assert torch.equal(masks[name], layer.weight_mask.bool())
    assert (tmp_path / "masks_70pct.pt").is_file()


def test_example_2_sparse_to_dense(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model, saved_masks, _ = example_1(tmp_path, capsys)
    capsys.readouterr()
    model = small_model()
    dense = {k: w.detach().clone() for k, w in linear_weights(model).items()}

    from sparselora.pruning.mask_ops import load_mask
    from sparselora.pruning.sparse_lora import SparseLoRAConfig, apply_sparse_lora

    # Load masks
    masks, metadata = load_mask("masks_70pct.pt")
    print(f"Loaded masks: {metadata}")

    # Apply sparse LoRA (sparse-to-dense mode)
    config = SparseLoRAConfig(
        r=16,
        sparsity_mode="sparse_to_dense",
        preserve_sparsity_on_merge=True
    )

    model = apply_sparse_lora(model, masks, config)

    expected_meta = {"sparsity": 0.7, "method": "unstructured", "importance": "magnitude"}
    assert metadata == expected_meta
    assert capsys.readouterr().out == f"Loaded masks: {metadata}\n"
    assert list(masks) == list(saved_masks)
    assert all(torch.equal(masks[k], saved_masks[k]) for k in masks)

    from sparselora.pruning.sparse_lora import SparseLoRALinear, merge_all_lora_weights

    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)}
    assert list(layers) == list(masks)
    x = torch.randn(5, 16)
    before = model(x)
    for name, layer in layers.items():
        assert torch.equal(layer.weight.detach(), dense[name] * masks[name])
        assert not layer.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad
        assert torch.count_nonzero(layer.lora_B) == 0

    train_adapters(model)
    for name, layer in layers.items():
        delta = layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach())
        assert int((delta[~masks[name]] != 0).sum()) > 0
    assert not torch.allclose(model(x), before)

    model = merge_all_lora_weights(model)
    for name, w in linear_weights(model).items():
        assert int((w.detach()[~masks[name]] != 0).sum()) == 0
        assert pruned(masks[name]) == int((w.detach() == 0).sum())


def test_example_3_sparse_to_sparse(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    example_1(tmp_path, capsys)
    from sparselora.pruning.mask_ops import load_mask
    from sparselora.pruning.sparse_lora import (
        SparseLoRAConfig,
        SparseLoRALinear,
        apply_sparse_lora,
        merge_all_lora_weights,
        validate_sparsity_preserved,
    )

    masks, _ = load_mask("masks_70pct.pt")
    model = small_model()

    # Apply sparse LoRA (sparse-to-sparse mode)
    config = SparseLoRAConfig(
        r=16,
        sparsity_mode="sparse_to_sparse",
        maintain_sparsity=True,  # Enforce sparsity during training
        preserve_sparsity_on_merge=True
    )

    model = apply_sparse_lora(model, masks, config)

    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)}
    assert list(layers) == list(masks)
    for step in range(3):
        train_adapters(model, steps=2, seed=step)
        for name, layer in layers.items():
            effective = layer.effective_weight()
            assert int((effective[~masks[name]] != 0).sum()) == 0
        is_valid, report = validate_sparsity_preserved(model, masks)
        assert is_valid and report["global"]["total_violations"] == 0

    x = torch.randn(6, 16)
    with torch.no_grad():
        before = model(x)
    model = merge_all_lora_weights(model)
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)
    for name, w in linear_weights(model).items():
        assert int((w.detach()[~masks[name]] != 0).sum()) == 0


# --- Cerebras integration ----------------------------------------------------------------


def test_cerebras_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    masks = {"layer.weight": torch.rand(8, 8) > 0.7}
    from sparselora.pruning.mask_ops import save_mask

    save_mask(masks, "masks_70pct.pt")
    from sparselora.utils.cerebras_sparse_callback import SparseMaskCallback, create_sparse_config

    # Create callback
    callback = SparseMaskCallback(
        mask_path="masks_70pct.pt",
        apply_every_step=False,  # Set True for sparse-to-sparse
    )

    # Modify Cerebras config
    base_config = LLAMA_BASE_CONFIG  # Your base config
    sparse_config = create_sparse_config(
        base_config,
        mask_path="masks_70pct.pt",
        lora_config={
            "r": 16,
            "alpha": 32,
            "dropout": 0.05
        },
        sparse_mode="sparse_to_dense"
    )

    assert callback.mask_path == "masks_70pct.pt" and callback.apply_every_step is False
    callbacks = sparse_config["trainer"]["init"]["callbacks"]
    assert callbacks[0] == {"Lora": {"lora_params": {"r": 16, "alpha": 32, "dropout": 0.05, "fan_in_fan_out": False,
                                                     "merge_weights": False, "target_modules": ["Linear"]}}}
    assert callbacks[1] == {"SparseMaskCallback": {"mask_path": str(Path("masks_70pct.pt").resolve()), "apply_every_step": False}}
    assert "sparsity" not in sparse_config["trainer"]["init"]
    assert "callbacks" not in base_config["trainer"]["init"]  # the input is not changed


# --- Validation --------------------------------------------------------------------------


def test_validate_masks_loop(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from sparselora.pruning.mask_generator import compute_unstructured_mask
    from sparselora.pruning.mask_ops import validate_mask

    model = small_model()
    per_layer = compute_unstructured_mask(model, 0.5)
    _, global_70, _ = example_1(tmp_path, capsys)
    capsys.readouterr()

    for masks in (per_layer, global_70):
        for name, mask in masks.items():
            is_valid, stats = validate_mask(
                mask,
                expected_sparsity=0.5,
                tolerance=0.01
            )

            if not is_valid:
                print(f"Invalid mask: {name}")
                print(f"  Error: {stats['error']}")
            else:
                print(f"Valid: {name} ({stats['sparsity']:.2%} sparsity)")

    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"Valid: {n} (50.00% sparsity)" for n in per_layer]
    invalid = lines[3:]
    assert invalid[0::2] == [f"Invalid mask: {n}" for n in global_70]
    assert all(line.startswith("  Error: sparsity ") and "tolerance 0.01" in line for line in invalid[1::2])


def test_validate_sparsity_preserved_after_merge(capsys):
    from sparselora.pruning.mask_generator import compute_unstructured_mask
    from sparselora.pruning.sparse_lora import (
        SparseLoRAConfig,
        apply_sparse_lora,
        merge_all_lora_weights,
        validate_sparsity_preserved,
    )

    def report_for(preserve: bool):
        model = small_model()
        original_masks = compute_unstructured_mask(model, 0.5)
        model = apply_sparse_lora(model, original_masks, SparseLoRAConfig(r=4))
        train_adapters(model)
        model = merge_all_lora_weights(model, preserve_sparsity=preserve)

        # After merging LoRA weights
        is_valid, report = validate_sparsity_preserved(
            model,
            original_masks,
            tolerance=1e-6
        )

        if is_valid:
            print("✓ Sparsity preserved after LoRA merge")
        else:
            print("✗ Sparsity NOT preserved")
            print(f"  Violations: {report['global']['total_violations']}")
            print(f"  Rate: {report['global']['violation_rate']:.2%}")
        expected = sum(
            int((w.detach()[~original_masks[n]].abs() > 1e-6).sum()) for n, w in linear_weights(model).items()
        )
        return is_valid, report, expected, sum(pruned(m) for m in original_masks.values())

    is_valid, report, expected, total_pruned = report_for(True)
    assert is_valid and expected == 0
    assert report["global"]["total_violations"] == 0 and report["global"]["violation_rate"] == 0.0
    assert capsys.readouterr().out == "✓ Sparsity preserved after LoRA merge\n"

    is_valid, report, expected, total_pruned = report_for(False)
    assert not is_valid and expected > 0
    assert report["global"]["total_violations"] == expected
    assert report["global"]["violation_rate"] == expected / total_pruned
    assert capsys.readouterr().out == (
        "✗ Sparsity NOT preserved\n"
        f"  Violations: {expected}\n"
        f"  Rate: {expected / total_pruned:.2%}\n"
    )


# --- File formats ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "npz", "safetensors"])
@pytest.mark.parametrize("explicit", [True, False], ids=["format=", "from-extension"])
def test_mask_storage_round_trip(fmt, explicit, three_layers, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from sparselora.pruning.mask_generator import compute_unstructured_mask
    from sparselora.pruning.mask_ops import load_mask, save_mask

    masks = compute_unstructured_mask(three_layers, {"layer1": 0.3, "layer2": 0.5, "layer3": 0.7})
    path = f"masks.{fmt}"
    kwargs = {"format": fmt} if explicit else {}

    save_mask(masks, path, **kwargs)
    loaded, metadata = load_mask(path, **kwargs)
    assert metadata == {}
    assert list(loaded) == list(masks)
    for name in masks:
        assert loaded[name].dtype == torch.bool
        assert torch.equal(loaded[name], masks[name])

    meta = {"sparsity": 0.5, "method": "unstructured", "layers": ["layer1", "layer2"], "nested": {"k": 1}}
    save_mask(masks, path, metadata=meta, **kwargs)
    loaded, metadata = load_mask(path, **kwargs)
    assert metadata == meta
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert os.listdir(tmp_path) == [path]


# --- Statistics and visualisation --------------------------------------------------------


def test_comprehensive_stats(three_layers, capsys):
    from sparselora.pruning.mask_generator import compute_unstructured_mask
    from sparselora.pruning.mask_ops import compute_sparsity_stats

    model = three_layers
    masks = compute_unstructured_mask(model, {"layer1": 0.25, "layer2": 0.5, "layer3": 0.75})

    stats = compute_sparsity_stats(masks)

    # Global stats
    print(f"Global sparsity: {stats['global']['sparsity']:.2%}")
    print(f"Mean layer sparsity: {stats['global']['mean_layer_sparsity']:.2%}")
    print(f"Std layer sparsity: {stats['global']['std_layer_sparsity']:.2%}")

    # Per-layer stats
    for layer, layer_stats in stats['per_layer'].items():
        print(f"{layer}: {layer_stats['sparsity']:.2%}")

    sizes = {"layer1.weight": 12 * 24, "layer2.weight": 24 * 24, "layer3.weight": 24 * 6}
    ratios = {"layer1.weight": 0.25, "layer2.weight": 0.5, "layer3.weight": 0.75}
    total_pruned = sum(round(ratios[n] * sizes[n]) for n in sizes)
    glob = total_pruned / sum(sizes.values())
    mean = 0.5
    std = (((0.25 - mean) ** 2 + 0 + (0.75 - mean) ** 2) / 3) ** 0.5
    assert stats["global"]["sparsity"] == pytest.approx(glob)
    assert stats["global"]["mean_layer_sparsity"] == pytest.approx(mean)
    assert stats["global"]["std_layer_sparsity"] == pytest.approx(std)
    assert capsys.readouterr().out.splitlines() == [
        f"Global sparsity: {glob:.2%}",
        "Mean layer sparsity: 50.00%",
        f"Std layer sparsity: {std:.2%}",
        "layer1.weight: 25.00%",
        "layer2.weight: 50.00%",
        "layer3.weight: 75.00%",
    ]


def test_visualise_sparsity_distribution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from sparselora.pruning.mask_generator import compute_unstructured_mask
    from sparselora.pruning.mask_ops import plot_sparsity_histogram

    masks = compute_unstructured_mask(small_model(), 0.6)

    plot_sparsity_histogram(masks, save_path="sparsity_hist.png")

    data = (tmp_path / "sparsity_hist.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert os.listdir(tmp_path) == ["sparsity_hist.png"]


# --- Advanced features -------------------------------------------------------------------


def test_custom_importance_metric_falls_back_to_magnitude():
    from sparselora.pruning.importance import compute_layer_importance, magnitude_importance

    model = small_model()

    def custom_importance(module, name):
        # Your custom importance computation
        weight = module.weight
        importance = torch.abs(weight) ** 2  # L2 norm example
        return importance

    # Register custom metric
    with pytest.warns(UserWarning, match="magnitude"):
        importance_dict = compute_layer_importance(
            model,
            method="custom"  # Will fall back to magnitude
        )

    modules = dict(model.named_modules())
    assert list(importance_dict) == ["0.weight", "2.weight", "4.weight"]
    for name, score in importance_dict.items():
        assert torch.equal(score, magnitude_importance(modules[name[: -len(".weight")]]))
    assert importance_dict.keys() == compute_layer_importance(model, method="magnitude").keys()

    custom = compute_layer_importance(model, method=custom_importance)
    for name, score in custom.items():
        assert torch.equal(score, modules[name[: -len(".weight")]].weight.detach().abs() ** 2)


def test_layer_specific_sparsity(three_layers):
    from sparselora.pruning.mask_generator import compute_unstructured_mask

    model = three_layers

    # Different sparsity per layer
    layer_sparsities = {
        "layer1": 0.3,
        "layer2": 0.5,
        "layer3": 0.7
    }

    masks = {}
    for name, module in model.named_modules():
        if name in layer_sparsities:
            sparsity = layer_sparsities[name]
            # Compute mask for this layer
            masks.update(compute_unstructured_mask(model, {name: sparsity}))

    direct = compute_unstructured_mask(model, layer_sparsities)
    assert list(masks) == list(direct) == ["layer1.weight", "layer2.weight", "layer3.weight"]
    for name, sparsity in layer_sparsities.items():
        weight = getattr(model, name).weight
        assert pruned(direct[f"{name}.weight"]) == round(sparsity * weight.numel())
        assert torch.equal(masks[f"{name}.weight"], direct[f"{name}.weight"])
        layer = copy.deepcopy(getattr(model, name))
        torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
        assert torch.equal(direct[f"{name}.weight"], layer.weight_mask.bool())


def test_gradual_pruning():
    from sparselora.pruning.mask_generator import compute_unstructured_mask
    from sparselora.pruning.mask_ops import apply_masks_to_model

    model = small_model()

    def train(model, num_steps):
        for _ in range(num_steps):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            sgd_step(list(model.parameters()), loss, lr=0.05)

    torch.manual_seed(3)

    # Iterative pruning schedule
    sparsity_schedule = [0.0, 0.2, 0.4, 0.6, 0.8]

    for sparsity in sparsity_schedule:
        # Compute masks
        masks = compute_unstructured_mask(model, sparsity)

        # Apply masks
        apply_masks_to_model(model, masks)

        for name, w in linear_weights(model).items():
            assert pruned(masks[name]) == round(sparsity * w.numel())
            assert int((w.detach()[~masks[name]] != 0).sum()) == 0

        # Fine-tune for N steps
        train(model, num_steps=10)

    assert all(pruned(masks[n]) == round(0.8 * w.numel()) for n, w in linear_weights(model).items())


# --- Performance considerations ----------------------------------------------------------


def test_memory_efficient_mask_generation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from sparselora.pruning.mask_generator import compute_unstructured_mask

    model = small_model()
    torch.save(model.state_dict(), "model.pt")

    # Generate masks without loading full model
    from sparselora.pruning.mask_generator import compute_masks_for_state_dict

    state_dict = torch.load("model.pt", map_location="cpu", weights_only=True)
    masks = compute_masks_for_state_dict(
        state_dict,
        sparsity=0.5,
        method="unstructured"
    )

    expected = compute_unstructured_mask(model, 0.5)
    assert list(masks) == list(expected) == ["0.weight", "2.weight", "4.weight"]
    for name in masks:
        assert torch.equal(masks[name], expected[name])
        assert pruned(masks[name]) == round(0.5 * state_dict[name].numel())


def compute_layer_mask(layer_name, layer_weight, sparsity):
    # Compute mask for single layer
    k = sparselora.ops.prune_count(layer_weight.numel(), sparsity)
    (mask,) = sparselora.ops.select_prune_mask([layer_weight], k, absolute=True)
    return layer_name, mask


def test_distributed_mask_computation():
    from sparselora.pruning.mask_generator import compute_unstructured_mask

    model = small_model()
    layer_tasks = [(name, w.detach(), 0.5) for name, w in linear_weights(model).items()]

    with mp.get_context("fork").Pool(processes=2) as pool:
        results = pool.starmap(compute_layer_mask, layer_tasks)

    expected = compute_unstructured_mask(model, 0.5)
    assert [name for name, _ in results] == list(expected)
    for name, mask in results:
        assert torch.equal(mask, expected[name])
