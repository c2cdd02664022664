"""A one-shot method is one entry of the method table: a toy method registered from here runs
through prune_model, prune_checkpoint and ``sparselora prune`` without any other change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparselora.cli import main
from sparselora.pruning.mask_ops import load_mask
from sparselora.pruning.oneshot import (
    Gathers,
    MethodRule,
    mask_and_zero,
    method_names,
    prune_checkpoint,
    prune_model,
    register_method,
    unregister_method,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import token_batches as batches  # noqa: E402
from conftest import write_llama_checkpoint as write_checkpoint  # noqa: E402


def random_score(matrix: torch.Tensor, _stats) -> torch.Tensor:
    """Scores drawn from the weight's shape alone, seeded: the same mask from RAM and disk."""
    gen = torch.Generator().manual_seed(matrix.shape[0] * 7919 + matrix.shape[1])
    return torch.rand(matrix.shape, generator=gen).to(matrix.device)


@pytest.fixture
def toy_method():
    register_method("random-rows", MethodRule(Gathers.NOTHING, random_score, mask_and_zero, scopes=("row",),
                                              default_scope="row"))
    try:
        yield "random-rows"
    finally:
        unregister_method("random-rows")
    assert "random-rows" not in method_names()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt", layers=2)


def assert_rows_lose_exactly(masks: dict[str, torch.Tensor], sparsity: float) -> None:
    assert masks
    for name, keep in masks.items():
        pruned = (~keep).sum(dim=1)
        expected = round(sparsity * keep.shape[1])
        assert torch.equal(pruned, torch.full_like(pruned, expected)), name


def test_a_registered_method_runs_through_prune_model(toy_method, checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    masks = prune_model(model, None, toy_method, 0.25, progress=False)
    assert_rows_lose_exactly(masks, 0.25)
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert not params[name].detach()[~keep].any(), name
    with pytest.raises(ValueError, match=r"scope='layer' is unknown; accepted: row"):
        prune_model(model, None, toy_method, 0.25, scope="layer")


def test_a_registered_method_runs_through_prune_checkpoint_as_in_memory(toy_method, checkpoint, tmp_path):
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    expected = prune_model(reference, None, toy_method, 0.5, progress=False)
    prune_checkpoint(checkpoint, tmp_path / "out", toy_method, 0.5, calibration_data=batches(), progress=False)
    written, _ = load_mask(tmp_path / "out" / "masks.safetensors")
    assert written.keys() == expected.keys()
    for name in expected:
        assert torch.equal(written[name], expected[name]), name
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for name, param in reference.named_parameters():
        assert torch.equal(param, got.get_parameter(name)), name


def test_a_registered_method_runs_through_the_cli(toy_method, checkpoint, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["prune", str(checkpoint), "--method", toy_method, "--sparsity", "0.5", "--samples", "2",
                 "--seq-len", "8", "--no-progress", "-o", str(out)]) == 0
    masks, _ = load_mask(out / "masks.safetensors")
    assert_rows_lose_exactly(masks, 0.5)


def test_the_table_refuses_a_second_entry_of_one_name(toy_method):
    with pytest.raises(ValueError, match="already in the table"):
        register_method(toy_method, MethodRule(Gathers.NOTHING, random_score, mask_and_zero, scopes=("row",),
                                               default_scope="row"))
    with pytest.raises(ValueError, match="built in"):
        unregister_method("wanda")


def test_include_globs_may_name_some_blocks_only(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    masks = prune_model(model, batches(), "wanda", 0.5, include="model.layers.1.*", progress=False)
    assert masks and all(name.startswith("model.layers.1.") for name in masks)
    summary = prune_checkpoint(folder, tmp_path / "out", "wanda", 0.5, calibration_data=batches(),
                               include=["model.layers.1.*"], progress=False)
    on_disk, _ = load_mask(summary["masks"])
    assert on_disk.keys() == masks.keys() and all(torch.equal(on_disk[k], masks[k]) for k in masks)
    with pytest.raises(ValueError, match="include pattern 'model.layers.9.\\*' matches no prunable weight"):
        prune_model(model, batches(), "wanda", 0.5, include="model.layers.9.*", progress=False)
    with pytest.raises(ValueError, match="include pattern 'model.layers.9.\\*' matches no prunable weight"):
        prune_checkpoint(folder, tmp_path / "out2", "wanda", 0.5, calibration_data=batches(),
                         include="model.layers.9.*", progress=False)
