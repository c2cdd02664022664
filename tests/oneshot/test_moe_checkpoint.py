"""Mixture-of-experts checkpoints as transformers saves them (experts stored one by one):
``sparselora prune`` reads each block in that layout and writes weights and masks back in it;
``masks`` / ``apply`` / ``validate`` work on the stored tensors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import cli_exit_code, write_tokenizer  # noqa: E402
from sparselora.pruning.mask_ops import load_mask, validate_nm_mask  # noqa: E402
from sparselora.pruning.oneshot import prune_checkpoint, prune_model  # noqa: E402
from sparselora.io.checkpoints import Checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pruning"))
from test_moe_masks import EXPERTS, FAMILIES, calibration, tiny_moe  # noqa: E402

# the stored name of each expert's matrices, and of the router
STORED = {
    "mixtral": ("block_sparse_moe.experts.{e}.{w}.weight", ("w1", "w2", "w3"), "block_sparse_moe.gate.weight"),
    "qwen3_moe": ("mlp.experts.{e}.{w}.weight", ("gate_proj", "down_proj", "up_proj"), "mlp.gate.weight"),
}


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "model"
    tiny_moe(request.param).save_pretrained(folder, max_shard_size="40KB")
    write_tokenizer(folder)
    return request.param, folder


def stored_experts(family: str, layer: int) -> list[str]:
    pattern, weights, _ = STORED[family]
    return [f"model.layers.{layer}.{pattern.format(e=e, w=w)}" for w in weights for e in range(EXPERTS)]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(folder)
    return {name: checkpoint.read(name) for name in checkpoint.names}


def test_the_checkpoint_stores_experts_one_by_one(saved):
    family, folder = saved
    names = set(Checkpoint(folder).names)
    assert set(stored_experts(family, 0)) <= names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_from_disk_equals_in_memory_and_reloads(saved, tmp_path, method):
    family, folder = saved
    batches = calibration()
    out = tmp_path / "out"
    summary = prune_checkpoint(folder, out, method, 0.5, calibration_data=batches, progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder)
    prune_model(reference, batches, method, 0.5, progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # the stored layout, loadable
    expected = reference.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    stored, masks = tensors(out), load_mask(out / "masks.safetensors")[0]
    before = tensors(folder)
    router = f"model.layers.0.{STORED[family][2]}"
    assert router not in masks and torch.equal(stored[router], before[router])
    for name in stored_experts(family, 0) + stored_experts(family, 1):
        mask = masks[name]  # in the stored layout, one 2-D mask per stored expert matrix
        assert bool((stored[name][~mask] == 0).all()), name
    pattern, (gate, down, up), _ = STORED[family]
    for layer in (0, 1):
        for e in range(EXPERTS):
            named = {w: masks[f"model.layers.{layer}.{pattern.format(e=e, w=w)}"] for w in (gate, down, up)}
            # an expert's fused gate_up matrix is one group (as transformers holds it): half of it
            fused = torch.cat([named[gate], named[up]])
            assert int((~fused).sum()) == fused.numel() // 2 and int((~named[down]).sum()) == named[down].numel() // 2
            if method == "wanda":  # Wanda's rows: half of every row of each stored matrix
                assert all(bool(((~m).sum(1) == m.shape[1] // 2).all()) for m in named.values())
    if method != "magnitude":
        for counts in summary["expert_tokens"].values():
            assert len(counts) == EXPERTS and sum(counts) == 2 * sum(ids.numel() for ids in batches)
    assert cli_exit_code(["validate", str(out), str(out / "masks.safetensors"), "--no-progress"]) == 0


def test_prune_command_2_4(saved, tmp_path, capsys):
    family, folder = saved
    text = tmp_path / "calibration.txt"
    text.write_text("sparse weights keep their shape and their zeros " * 40)
    out = tmp_path / "out"
    assert cli_exit_code(["prune", str(folder), "--method", "sparsegpt", "--nm", "2:4", "--calibration", str(text),
                          "--samples", "4", "--seq-len", "16", "-o", str(out), "--no-progress"]) == 0
    assert "experts calibrated on" in capsys.readouterr().out
    assert cli_exit_code(["prune", str(folder), "--method", "wanda", "--all-experts", "--calibration", str(text),
                          "--samples", "4", "--seq-len", "16", "-o", str(tmp_path / "all"), "--no-progress"]) == 0
    # every expert saw every one of the 4 x 16 calibration tokens
    assert "experts calibrated on 64-64 tokens each (0 of 8 on none" in capsys.readouterr().out
    masks, _ = load_mask(out / "masks.safetensors")
    for name in stored_experts(family, 0):
        validate_nm_mask(masks[name], 2, 4)
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_masks_apply_validate_on_the_stored_tensors(saved, tmp_path):
    family, folder = saved
    masks_file, applied = tmp_path / "masks.safetensors", tmp_path / "applied"
    assert cli_exit_code(["masks", str(folder), "--sparsity", "0.5", "--scope", "layer", "-o", str(masks_file),
                          "--no-progress"]) == 0
    masks, _ = load_mask(masks_file)
    assert set(stored_experts(family, 0)) <= set(masks)
    assert f"model.layers.0.{STORED[family][2]}" not in masks  # routers stay dense
    assert cli_exit_code(["apply", str(folder), str(masks_file), "-o", str(applied), "--no-progress"]) == 0
    assert cli_exit_code(["validate", str(applied), str(masks_file), "--no-progress"]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(applied)
    fused = reloaded.model.layers[0].mlp.experts.down_proj
    for e in range(EXPERTS):
        assert float((fused[e] == 0).float().mean()) == 0.5
