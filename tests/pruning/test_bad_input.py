"""Bad input: every public entry point raises ValueError or TypeError with a message that
names the offending argument, and leaves models and files exactly as they were."""

from __future__ import annotations

import math
import os
import re
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparselora.ops as ops
from sparselora.lora import (
    SparseLoRAConfig,
    SparseLoRALinear,
    apply_sparse_lora,
    validate_sparsity_preserved,
)
from sparselora.pruning.importance import compute_layer_importance, taylor_importance
from sparselora.pruning.mask_generator import (
    MaskGenerator,
    compute_masks_for_state_dict,
    compute_unstructured_mask,
)
from sparselora.pruning.mask_ops import apply_masks_to_model, load_mask, save_mask, validate_mask


def small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, tuple[torch.Tensor, bool]]) -> None:
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    for name, (value, requires_grad) in before.items():
        assert torch.equal(after[name].detach(), value), name
        assert after[name].requires_grad == requires_grad, name
    assert not any(isinstance(m, SparseLoRALinear) for m in model.modules())


def good_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return compute_unstructured_mask(model, 0.5)


# --- sparsity values ---------------------------------------------------------------------

BAD_SPARSITY = [
    pytest.param(-0.1, ValueError, id="negative"),
    pytest.param(1.5, ValueError, id="above-one"),
    pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param("half", TypeError, id="string"),
]


@pytest.mark.parametrize("value, error", BAD_SPARSITY)
@pytest.mark.parametrize(
    "entry",
    ["compute_unstructured_mask", "MaskGenerator", "compute_masks_for_state_dict", "mapping-value"],
)
def test_bad_sparsity(entry, value, error):
    model = small_model()
    if entry == "compute_unstructured_mask":
        call, name = (lambda: compute_unstructured_mask(model, value)), "sparsity"
    elif entry == "MaskGenerator":
        call, name = (lambda: MaskGenerator(model, sparsity=value).generate_masks()), "sparsity"
    elif entry == "compute_masks_for_state_dict":
        call, name = (lambda: compute_masks_for_state_dict(model.state_dict(), value)), "sparsity"
    else:
        call, name = (lambda: compute_unstructured_mask(model, {"0": value})), r"sparsity\['0'\]"
    with pytest.raises(error, match=name):
        call()


@pytest.mark.parametrize("value, error", BAD_SPARSITY)
def test_bad_initial_sparsity(value, error):
    with pytest.raises(error, match="initial_sparsity"):
        SparseLoRAConfig(initial_sparsity=value)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "half"])
def test_bad_expected_sparsity(value):
    mask = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises((ValueError, TypeError), match="expected_sparsity"):
        validate_mask(mask, expected_sparsity=value)


# --- unknown choices ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: MaskGenerator(m, 0.5, method="magic"), id="MaskGenerator"),
        pytest.param(lambda m: compute_masks_for_state_dict(m.state_dict(), 0.5, method="magic"), id="state_dict"),
        pytest.param(lambda m: compute_layer_importance(m, method="magic"), id="compute_layer_importance"),
    ],
)
def test_unknown_method(call):
    with pytest.raises(ValueError, match=r"method='magic'"):
        call(small_model())


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: MaskGenerator(m, 0.5, importance_metric="gradient"), id="MaskGenerator"),
        pytest.param(lambda m: compute_unstructured_mask(m, 0.5, importance_metric="gradient"), id="unstructured"),
        pytest.param(
            lambda m: compute_masks_for_state_dict(m.state_dict(), 0.5, importance_metric="gradient"),
            id="state_dict",
        ),
    ],
)
def test_unknown_importance_metric(call):
    with pytest.raises(ValueError, match=r"importance_metric='gradient'"):
        call(small_model())


def test_unknown_format_on_save(tmp_path):
    path = tmp_path / "masks.pt"
    with pytest.raises(ValueError, match=r"format='h5'"):
        save_mask(good_masks(small_model()), path, format="h5")
    assert os.listdir(tmp_path) == []


def test_unknown_format_on_load(tmp_path):
    path = tmp_path / "masks.pt"
    save_mask(good_masks(small_model()), path)
    with pytest.raises(ValueError, match=r"format='h5'"):
        load_mask(path, format="h5")


def test_unknown_sparsity_mode():
    with pytest.raises(ValueError, match=r"sparsity_mode='dense'"):
        SparseLoRAConfig(sparsity_mode="dense")


# --- masks that do not fit the model -----------------------------------------------------


def _unknown_name(model):
    masks = good_masks(model)
    masks["decoder.weight"] = torch.ones(4, 4, dtype=torch.bool)
    return masks, "decoder"


def _wrong_shape(model):
    masks = good_masks(model)
    masks["2.weight"] = torch.ones(16, 4, dtype=torch.bool)
    return masks, r"2\.weight"


def _half_values(model):
    masks = good_masks(model)
    bad = masks["2.weight"].float()
    bad[0, 0] = 0.5
    masks["2.weight"] = bad
    return masks, r"2\.weight"


@pytest.mark.parametrize("make", [_unknown_name, _wrong_shape, _half_values], ids=["unknown-name", "shape", "0.5"])
@pytest.mark.parametrize("entry", ["apply_masks_to_model", "apply_sparse_lora", "validate_sparsity_preserved"])
def test_masks_that_do_not_fit_leave_model_unchanged(entry, make):
    model = small_model()
    masks, offender = make(model)
    before = snapshot(model)
    arg = "original_masks" if entry == "validate_sparsity_preserved" else "masks"
    with pytest.raises(ValueError, match=rf"{arg}.*{offender}|{offender}.*{arg}"):
        if entry == "apply_masks_to_model":
            apply_masks_to_model(model, masks)
        elif entry == "apply_sparse_lora":
            apply_sparse_lora(model, masks, SparseLoRAConfig(r=2))
        else:
            validate_sparsity_preserved(model, masks)
    assert_unchanged(model, before)


def test_save_mask_rejects_non_binary_values(tmp_path):
    masks, _ = _half_values(small_model())
    path = tmp_path / "masks.pt"
    with pytest.raises(ValueError, match=r"masks\['2\.weight'\]"):
        save_mask(masks, path)
    assert os.listdir(tmp_path) == []


# --- scores that are not finite ----------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_select_prune_mask_rejects_non_finite_scores(bad):
    scores = torch.rand(4, 5)
    scores[1, 2] = bad
    with pytest.raises(ValueError, match="scores"):
        ops.select_prune_mask([torch.rand(3), scores], 4)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_custom_importance_returning_nan(global_pruning):
    model = small_model()

    def nan_importance(module, name):
        score = module.weight.detach().abs().clone()
        score[0, 0] = math.nan
        return score

    generator = MaskGenerator(model, 0.5, importance_metric=nan_importance, global_pruning=global_pruning)
    with pytest.raises(ValueError, match="importance"):
        generator.generate_masks()


def test_taylor_importance_without_gradients():
    layer = small_model()[0]
    with pytest.raises(ValueError, match=r"(?i)taylor.*grad"):
        taylor_importance(layer)


def test_taylor_metric_without_gradients():
    model = small_model()
    generator = MaskGenerator(model, 0.5, importance_metric="taylor")
    with pytest.raises(ValueError, match=r"(?i)taylor.*grad"):
        generator.generate_masks()


# --- damaged files -----------------------------------------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 32 : middle + 32] = bytes(range(0xA0, 0xE0))
    path.write_bytes(bytes(data))


def _payload_offset(path) -> int:
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        header_len = int.from_bytes(data[:8], "little")
        return 8 + header_len
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    start = info.header_offset
    name_len = int.from_bytes(data[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(data[start + 28 : start + 30], "little")
    return start + 30 + name_len + extra_len


def _garbage_in_tensor_data(path):
    data = bytearray(path.read_bytes())
    offset = _payload_offset(path) + 100
    data[offset : offset + 64] = bytes(range(0xA0, 0xE0))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [_truncate, _garbage, _garbage_in_tensor_data],
    ids=["truncated", "garbage-middle", "garbage-tensor-data"],
)
@pytest.mark.parametrize("fmt", ["pt", "npz", "safetensors"])
def test_damaged_mask_file(fmt, damage, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    path = tmp_path / f"masks.{fmt}"
    save_mask(good_masks(model), path, metadata={"sparsity": 0.5})
    damage(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_mask(path)


def test_unknown_extension_without_format(tmp_path):
    masks = good_masks(small_model())
    path = tmp_path / "masks.bin"
    with pytest.raises(ValueError, match="format"):
        save_mask(masks, path)
    assert os.listdir(tmp_path) == []

    save_mask(masks, path, format="pt")
    with pytest.raises(ValueError, match="format"):
        load_mask(path)


@pytest.mark.parametrize("fmt", ["pt", "npz", "safetensors"])
def test_failed_save_leaves_old_file_intact(fmt, tmp_path):
    model = small_model()
    path = tmp_path / f"masks.{fmt}"
    save_mask(good_masks(model), path, metadata={"version": 1})
    old = path.read_bytes()

    masks, _ = _half_values(model)
    masks = {"0.weight": good_masks(model)["0.weight"], **masks}
    with pytest.raises(ValueError, match=r"masks\['2\.weight'\]"):
        save_mask(masks, path, metadata={"version": 2})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("fmt", ["pt", "npz", "safetensors"])
def test_save_interrupted_while_writing_leaves_old_file_intact(fmt, tmp_path, monkeypatch):
    import safetensors.torch

    model = small_model()
    path = tmp_path / f"masks.{fmt}"
    save_mask(good_masks(model), path, metadata={"version": 1})
    old = path.read_bytes()

    def half_written(obj, handle=None, *args, **kwargs):
        if handle is not None and hasattr(handle, "write"):
            handle.write(b"partial data")
        raise OSError("disk full")

    if fmt == "pt":
        monkeypatch.setattr(torch, "save", half_written)
    elif fmt == "npz":
        monkeypatch.setattr(np, "savez_compressed", half_written)
    else:
        monkeypatch.setattr(safetensors.torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_mask(good_masks(small_model(seed=1)), path, metadata={"version": 2})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == [path.name]


# --- sparse LoRA settings ----------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -1])
def test_rank_must_be_positive(r):
    with pytest.raises(ValueError, match=rf"\br={r}\b"):
        SparseLoRAConfig(r=r)


@pytest.mark.parametrize("dropout", [1.0, -0.1])
def test_dropout_outside_unit_interval(dropout):
    with pytest.raises(ValueError, match=rf"dropout={dropout}"):
        SparseLoRAConfig(dropout=dropout)


@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "no-masks"])
def test_target_modules_matching_nothing_leave_model_unchanged(with_masks):
    model = small_model()
    masks = good_masks(model) if with_masks else None
    before = snapshot(model)
    with pytest.raises(ValueError, match="target_modules"):
        apply_sparse_lora(model, masks, SparseLoRAConfig(r=2, target_modules=["q_proj"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "mode, maintain", [("sparse_to_dense", True), ("sparse_to_sparse", False)]
)
def test_maintain_sparsity_contradicting_mode(mode, maintain):
    with pytest.raises(ValueError, match="maintain_sparsity"):
        SparseLoRAConfig(sparsity_mode=mode, maintain_sparsity=maintain)


# --- targets and scopes ------------------------------------------------------------------


def test_global_pruning_with_per_layer_mapping(three_layers):
    with pytest.raises(ValueError, match="global_pruning"):
        compute_unstructured_mask(three_layers, {"layer1": 0.3, "layer2": 0.5}, global_pruning=True)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: compute_unstructured_mask(m, {"layer1": 0.3, "layer9": 0.5}), id="unstructured"),
        pytest.param(
            lambda m: compute_masks_for_state_dict(m.state_dict(), {"layer9": 0.5}), id="state_dict"
        ),
    ],
)
def test_sparsity_keys_matching_nothing(call, three_layers):
    with pytest.raises(ValueError, match=r"sparsity.*layer9"):
        call(three_layers)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: compute_unstructured_mask(m, 0.5, include="decoder.*"), id="unstructured"),
        pytest.param(lambda m: MaskGenerator(m, 0.5, include=["layer1", "decoder.*"]), id="MaskGenerator"),
        pytest.param(
            lambda m: compute_masks_for_state_dict(m.state_dict(), 0.5, include="decoder.*"), id="state_dict"
        ),
    ],
)
def test_include_glob_matching_nothing(call, three_layers):
    with pytest.raises(ValueError, match=r"include.*decoder\.\*"):
        call(three_layers)


# --- backend selection -------------------------------------------------------------------


def test_unknown_backend_in_environment(monkeypatch):
    monkeypatch.setenv("SPARSELORA_BACKEND", "quantum")
    weight = torch.randn(4, 6)
    before = weight.clone()
    mask = torch.rand(4, 6) > 0.5
    with pytest.raises(ValueError, match="SPARSELORA_BACKEND"):
        ops.apply_mask_(weight, mask)
    assert torch.equal(weight, before)

    model = small_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="SPARSELORA_BACKEND"):
        compute_unstructured_mask(model, 0.5)
    with pytest.raises(ValueError, match="SPARSELORA_BACKEND"):
        apply_masks_to_model(model, {"0.weight": torch.rand(16, 8) > 0.5})
    assert_unchanged(model, snap)
