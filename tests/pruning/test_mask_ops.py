"""Mask operations: validation, round trips in every format, statistics, plots, applying."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from conftest import tiny_bert
from sparselora.pruning.mask_generator import compute_unstructured_mask
from sparselora.pruning.mask_ops import (
    apply_masks_to_model,
    compute_sparsity_stats,
    load_mask,
    plot_sparsity_histogram,
    save_mask,
    validate_mask,
)

FORMATS = ["pt", "npz", "safetensors"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("explicit_format", [True, False])
def test_round_trip(tmp_path, dtype, fmt, explicit_format):
    model = tiny_bert().to(dtype)
    masks = compute_unstructured_mask(model, 0.5, global_pruning=True)
    metadata = {"sparsity": 0.5, "method": "unstructured", "layers": [1, 2], "nested": {"ok": True}}
    path = tmp_path / f"masks.{fmt}"
    save_mask(masks, path, metadata=metadata, format=fmt if explicit_format else None)
    loaded, meta = load_mask(path, format=fmt if explicit_format else None)
    assert meta == metadata
    assert list(loaded) == list(masks)
    for name in masks:
        assert loaded[name].dtype == torch.bool
        assert torch.equal(loaded[name], masks[name])


def test_plain_tensor_dict_pt_files_load(tmp_path):
    torch.save({"a.weight": torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8)}, tmp_path / "plain.pt")
    masks, meta = load_mask(tmp_path / "plain.pt")
    assert meta == {} and torch.equal(masks["a.weight"], torch.tensor([[True, False], [False, True]]))


def test_validate_mask_reports():
    mask = torch.ones(10, 10, dtype=torch.bool)
    mask[:5] = False
    ok, stats = validate_mask(mask, expected_sparsity=0.5, tolerance=0.01)
    assert ok and stats["error"] is None and stats["sparsity"] == 0.5 and stats["num_pruned"] == 50
    ok, stats = validate_mask(mask, expected_sparsity=0.7, tolerance=0.01)
    assert not ok and "tolerance" in stats["error"]
    ok, stats = validate_mask(torch.tensor([0.0, 0.5, 1.0]))
    assert not ok and "0 and 1" in stats["error"]
    ok, stats = validate_mask(torch.tensor([0.0, 1.0, 1.0, 0.0]), expected_sparsity=0.5)
    assert ok and stats["num_kept"] == 2


def test_sparsity_stats_by_hand():
    masks = {"a": torch.tensor([True, False, False, False]), "b": torch.tensor([[True, True], [False, True]])}
    stats = compute_sparsity_stats(masks)
    assert stats["global"]["sparsity"] == pytest.approx(4 / 8)
    assert stats["global"]["total_pruned"] == 4 and stats["global"]["total_params"] == 8
    assert stats["global"]["mean_layer_sparsity"] == pytest.approx((0.75 + 0.25) / 2)
    assert stats["global"]["std_layer_sparsity"] == pytest.approx(0.25)
    assert stats["per_layer"]["b"]["sparsity"] == pytest.approx(0.25)
    assert stats["per_layer"]["b"]["shape"] == (2, 2)


def test_histogram_png_headless(tmp_path):
    masks = compute_unstructured_mask(tiny_bert(), 0.6, global_pruning=True)
    path = tmp_path / "hist.png"
    fig = plot_sparsity_histogram(masks, save_path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.axes[0].get_xlabel().startswith("layer sparsity")


def test_apply_masks_zeroes_exactly_the_pruned_weights(three_layers):
    masks = compute_unstructured_mask(three_layers, {"layer1": 0.5})
    before = three_layers.layer1.weight.detach().clone()
    apply_masks_to_model(three_layers, {"layer1": masks["layer1.weight"]})  # module-name key
    after = three_layers.layer1.weight.detach()
    assert torch.equal(after[~masks["layer1.weight"]], torch.zeros(int((~masks["layer1.weight"]).sum())))
    assert torch.equal(after[masks["layer1.weight"]], before[masks["layer1.weight"]])


def test_apply_masks_clears_nan_in_pruned_slots():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
    mask = torch.tensor([[True, False, False], [False, False, True]])
    apply_masks_to_model(nn.Sequential(layer), {"0.weight": mask})
    assert torch.equal(layer.weight[~mask], torch.zeros(4))


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    from sparselora.io.atomic import atomic_write_bytes

    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.bin"
        atomic_write_bytes(fresh, b"x")
        assert fresh.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        kept.chmod(0o600)
        atomic_write_bytes(kept, b"new")
        assert kept.stat().st_mode & 0o777 == 0o600 and kept.read_bytes() == b"new"
    finally:
        os.umask(umask)
