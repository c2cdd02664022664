"""Sequential pruning straight from a sharded checkpoint: equal to the in-memory run, bit for bit;
the ``sparselora prune`` command; ranks under torchrun."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sparselora.cli import main
from sparselora.pruning.mask_ops import load_mask, validate_nm_mask
from sparselora.pruning.oneshot import prune_checkpoint, prune_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import VOCAB, cli_exit_code, run_torchrun  # noqa: E402
from conftest import token_batches as batches  # noqa: E402
from conftest import write_llama_checkpoint as write_checkpoint  # noqa: E402

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("llm") / "ckpt")


def assert_same_model(expected, folder: Path, dtype=torch.float32):
    got = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    for name, param in expected.named_parameters():
        assert torch.equal(param, got.get_parameter(name)), name


CASES = [("magnitude", {}), ("wanda", {}), ("wanda", {"owl": True}), ("sparsegpt", {}),
         ("sparsegpt", {"nm": (2, 4), "sparsity": None}), ("sparsegpt", {"owl": True, "owl_lambda": 0.04})]


@pytest.mark.parametrize("method,kwargs", CASES, ids=[f"{m}-{'-'.join(k)}" for m, k in CASES])
def test_checkpoint_run_equals_the_in_memory_run(checkpoint, tmp_path, method, kwargs):
    data = batches()
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    masks = prune_model(reference, data, method, progress=False, **kwargs)
    summary = prune_checkpoint(checkpoint, tmp_path / "out", method, calibration_data=data, progress=False, **kwargs)
    assert_same_model(reference, tmp_path / "out")
    on_disk, _ = load_mask(summary["masks"])
    assert on_disk.keys() == masks.keys()
    assert all(torch.equal(on_disk[k], masks[k]) for k in masks)
    # same shards, same index, companions copied; no spill files left beside the output
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(p.name for p in (tmp_path / "out").iterdir()
                                                                   if p.name != "masks.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bf16_checkpoint_computes_and_stays_in_bf16(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", torch.bfloat16)
    data = batches()
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    prune_model(reference, data, "sparsegpt", 0.5, progress=False)
    summary = prune_checkpoint(folder, tmp_path / "out", "sparsegpt", 0.5, calibration_data=data, progress=False)
    assert summary["dtype"] == "torch.bfloat16"
    assert_same_model(reference, tmp_path / "out", torch.bfloat16)
    from safetensors import safe_open

    for shard in (tmp_path / "out").glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            assert all(handle.get_tensor(k).dtype == torch.bfloat16 for k in handle.keys())


def test_offloaded_activations_and_built_in_calibration_text(checkpoint, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    a = prune_checkpoint(checkpoint, tmp_path / "a", "wanda", 0.5, samples=6, seq_len=16, progress=False)
    b = prune_checkpoint(checkpoint, tmp_path / "b", "wanda", 0.5, samples=6, seq_len=16, offload_dir=spill,
                         progress=False)
    masks_a, _ = load_mask(a["masks"])
    masks_b, _ = load_mask(b["masks"])
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert list(spill.iterdir()) == []


def test_refuses_bad_inputs_and_leaves_nothing_behind(checkpoint, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        prune_checkpoint(checkpoint, tmp_path / "taken", "magnitude", progress=False)
    with pytest.raises(ValueError, match="config.json"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "model.safetensors").write_bytes(next(checkpoint.glob("*.safetensors")).read_bytes())
        prune_checkpoint(empty, tmp_path / "out", "magnitude", progress=False)
    with pytest.raises(ValueError, match="inside|contains|same"):
        prune_checkpoint(checkpoint, checkpoint / "out", "magnitude", progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        prune_checkpoint(checkpoint, tmp_path / "out", "wanda", calibration_text="too short", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]


def test_prune_command_writes_a_loadable_checkpoint_and_masks(checkpoint, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("sparse weights keep their shape and their zeros. " * 80, encoding="utf-8")
    out = tmp_path / "out"
    code = main(["prune", str(checkpoint), "--method", "sparsegpt", "--nm", "2:4", "--calibration", str(text),
                 "--samples", "4", "--seq-len", "16", "-o", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "3 blocks pruned with sparsegpt at 2:4" in capsys.readouterr().out
    masks, metadata = load_mask(out / "masks.safetensors")
    validate_nm_mask(masks, 2, 4)
    assert main(["validate", str(out), str(out / "masks.safetensors"), "--no-progress"]) == 0
    transformers.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("argv,message", [
    (["--owl", "--nm", "2:4"], "--owl"),
    (["--nm", "4:2"], "--nm=(4, 2) must be ints with 0 < n < m"),
    (["--nm", "4:4"], "--nm=(4, 4) must be ints with 0 < n < m"),
    (["--method", "obs"], "--method='obs' is unknown; accepted: magnitude, wanda, sparsegpt"),
    (["--calibration", "missing.txt"], "does not exist"),
])
def test_prune_command_rejects_bad_arguments(checkpoint, tmp_path, capsys, argv, message):
    assert cli_exit_code(["prune", str(checkpoint), "-o", str(tmp_path / "out"), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,count", [("sparsegpt", 6), ("wanda", 6), ("sparsegpt", 1)])
def test_two_ranks_equal_one_process(checkpoint, tmp_path, method, count):
    data = batches(count)  # one batch: rank 1 has none and only takes part in the sums
    torch.save(data, tmp_path / "batches.pt")
    (tmp_path / "method.txt").write_text(method)
    os.symlink(checkpoint, tmp_path / "ckpt")
    single = prune_checkpoint(checkpoint, tmp_path / "single", method, 0.5, calibration_data=data,
                              owl=method == "wanda", progress=False)
    run_torchrun("oneshot/prune_worker.py", tmp_path, 2)
    masks_single, _ = load_mask(single["masks"])
    masks_dist, _ = load_mask(tmp_path / "distributed" / "masks.safetensors")
    assert masks_single.keys() == masks_dist.keys()
    assert all(torch.equal(masks_single[k], masks_dist[k]) for k in masks_single)
    expected = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "single")
    assert_same_model(expected, tmp_path / "distributed")


def test_prune_command_under_torchrun_equals_one_process(checkpoint, tmp_path, capsys):
    (tmp_path / "method.txt").write_text("cli")
    os.symlink(checkpoint, tmp_path / "ckpt")
    assert main(["prune", str(checkpoint), "--method", "sparsegpt", "--samples", "16", "--seq-len", "16",
                 "--no-progress", "-o", str(tmp_path / "single")]) == 0  # two batches of 8, one per rank
    run_torchrun("oneshot/prune_worker.py", tmp_path, 2)
    single, _ = load_mask(tmp_path / "single" / "masks.safetensors")
    dist, _ = load_mask(tmp_path / "distributed" / "masks.safetensors")
    assert single.keys() == dist.keys() and all(torch.equal(single[k], dist[k]) for k in single)
    assert_same_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "single"), tmp_path / "distributed")
