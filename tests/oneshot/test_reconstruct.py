"""Block reconstruction in the one-shot engine: masks unchanged, pruned weights exactly 0, the
held-out error lowered (or the block left as pruned), the dense stream, streaming = in
memory, ranks = one process, bf16 checkpoints, N:M, bad options."""

from __future__ import annotations

import copy
import json
import math
import re
import os

import pytest
import torch

from sparselora.cli import main
from sparselora.pruning.mask_ops import load_mask, validate_nm_mask
from sparselora.pruning.oneshot import Reconstruction, prune_checkpoint, prune_model
from sparselora.pruning.oneshot import engine as engine_module
from sparselora.pruning.oneshot.reconstruct import split_batches

transformers = pytest.importorskip("transformers")

from conftest import cli_exit_code, run_torchrun, tiny_gpt2, tiny_llama, token_batches, write_llama_checkpoint  # noqa: E402

QUICK = {"steps": 6, "lr": 1e-2}


def data(count: int = 6, vocab: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, 16), generator=gen)} for _ in range(count)]


def recorded_runs(monkeypatch):
    """Every reconstruct_block call's result and the block's weights right after it."""
    calls = []
    real = engine_module.reconstruct_block

    def spy(block, targets, masks, inputs, goal, extras, options, **kwargs):
        before = {t.name: t.weight.detach().clone() for t in targets}
        result = real(block, targets, masks, inputs, goal, extras, options, **kwargs)
        calls.append({"result": result, "before": before, "masks": dict(masks), "goal": [goal[i] for i in range(len(goal))],
                      "after": {t.name: t.weight.detach().clone() for t in targets}})
        return result

    monkeypatch.setattr(engine_module, "reconstruct_block", spy)
    return calls


@pytest.mark.parametrize("method,level", [("magnitude", {"sparsity": 0.5}), ("wanda", {"sparsity": 0.6}),
                                          ("sparsegpt", {"sparsity": 0.5}), ("wanda", {"nm": (2, 4)}),
                                          ("wanda", {"sparsity": 0.5, "owl": True}),
                                          ("magnitude", {"sparsity": 0.5, "scope": "row"})])
def test_kept_weights_train_pruned_weights_stay_exactly_zero(monkeypatch, method, level):
    model = tiny_llama()
    calls = recorded_runs(monkeypatch)
    masks = prune_model(model, data(), method, reconstruct=QUICK, progress=False, **level)
    assert len(calls) == 2  # one per block
    for call in calls:
        assert call["result"]["after"] < call["result"]["before"]  # the held-out error went down
        assert call["result"]["kept"]
        for name, keep in call["masks"].items():
            assert torch.equal(masks[name], keep)  # the mask the block was pruned with is the one returned
            after = call["after"][name]
            assert torch.equal(after[~keep], torch.zeros_like(after[~keep]))
            assert not torch.equal(after[keep], call["before"][name][keep])  # the kept weights moved
    for name, param in model.named_parameters():
        if name in masks:
            assert torch.equal(param.data[~masks[name]], torch.zeros_like(param.data[~masks[name]])), name
    if "nm" in level:
        validate_nm_mask({n: p.data != 0 for n, p in model.named_parameters() if n in masks}, 2, 4)


def test_data_free_masks_are_those_of_the_plain_run():
    plain, rebuilt = tiny_llama(), tiny_llama()
    expected = prune_model(plain, None, "magnitude", 0.5, progress=False)
    got = prune_model(rebuilt, data(), "magnitude", 0.5, reconstruct=QUICK, progress=False)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert any(not torch.equal(plain.get_parameter(k), rebuilt.get_parameter(k)) for k in expected)


def test_dense_target_is_the_dense_models_block_output(monkeypatch):
    model = tiny_llama()
    batches = data(4)
    dense = copy.deepcopy(model)
    outputs: dict[int, list] = {}
    for index, layer in enumerate(dense.model.layers):
        layer.register_forward_hook(lambda _m, _a, out, i=index: outputs.setdefault(i, []).append(
            out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for batch in batches:
            dense(**batch, use_cache=False)
    calls = recorded_runs(monkeypatch)
    prune_model(model, batches, "wanda", 0.5, reconstruct=QUICK, progress=False)
    for index, call in enumerate(calls):
        assert all(torch.allclose(got, want, atol=1e-6) for got, want in zip(call["goal"], outputs[index]))
    # the other target: the dense block on the pruned inputs (block 0's inputs are the same either way)
    calls.clear()
    prune_model(tiny_llama(), batches, "wanda", 0.5, reconstruct={**QUICK, "target": "pruned"}, progress=False)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(calls[0]["goal"], outputs[0]))
    assert not all(torch.allclose(g, w, atol=1e-4) for g, w in zip(calls[1]["goal"], outputs[1]))


def test_a_reconstruction_that_does_not_help_is_undone(monkeypatch):
    plain, rebuilt = tiny_llama(), tiny_llama()
    batches = data()
    calls = recorded_runs(monkeypatch)
    prune_model(plain, batches, "magnitude", 0.5, progress=False)
    prune_model(rebuilt, batches, "magnitude", 0.5, reconstruct={"steps": 3, "lr": 1e4}, progress=False)
    assert [c["result"]["kept"] for c in calls] == [False, False]
    assert all(c["result"]["after"] >= c["result"]["before"] for c in calls)
    for name, param in plain.named_parameters():
        assert torch.equal(param, rebuilt.get_parameter(name)), name


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_every_precision_lowers_the_error_and_keeps_the_zeros(monkeypatch, precision):
    model = tiny_llama()
    calls = recorded_runs(monkeypatch)
    masks = prune_model(model, data(), "sparsegpt", 0.5, reconstruct={**QUICK, "precision": precision},
                        progress=False)
    assert all(c["result"]["kept"] and c["result"]["after"] < c["result"]["before"] for c in calls)
    for name, keep in masks.items():
        weight = model.get_parameter(name)
        assert weight.dtype == torch.float32  # trained in fp32 (bf16 only inside the products)
        assert torch.equal(weight[~keep], torch.zeros_like(weight[~keep]))


def test_deterministic_for_a_seed_and_the_seed_matters():
    runs = []
    for seed in (0, 0, 1):
        model = tiny_llama()
        prune_model(model, data(), "wanda", 0.5, reconstruct={**QUICK, "seed": seed}, progress=False)
        runs.append(model)
    names = [n for n, _ in runs[0].named_parameters()]
    assert all(torch.equal(runs[0].get_parameter(n), runs[1].get_parameter(n)) for n in names)
    assert not all(torch.equal(runs[0].get_parameter(n), runs[2].get_parameter(n)) for n in names)


def test_gpt2_conv1d_blocks_and_offloaded_activations(tmp_path):
    batches = data(4, vocab=64)
    in_memory, offloaded = tiny_gpt2(), tiny_gpt2()
    masks = prune_model(in_memory, batches, "sparsegpt", 0.5, reconstruct=QUICK, progress=False)
    prune_model(offloaded, batches, "sparsegpt", 0.5, reconstruct=QUICK, offload_dir=tmp_path, progress=False)
    for name, param in in_memory.named_parameters():
        assert torch.equal(param, offloaded.get_parameter(name)), name
    assert list(tmp_path.iterdir()) == []
    for name, keep in masks.items():
        weight = in_memory.get_parameter(name).data
        assert torch.equal(weight[~keep], torch.zeros_like(weight[~keep])), name


def test_held_out_batches_are_apart_from_the_training_ones():
    training, held = split_batches(8, Reconstruction())
    assert len(held) == 1 and not set(training) & set(held) and sorted(training + held) == list(range(8))
    training, held = split_batches(20, Reconstruction(holdout=0.25))
    assert len(held) == 5 and len(training) == 15
    assert split_batches(1, Reconstruction()) == ([0], [0])  # one batch: the guard measures on it
    training, held = split_batches(4, Reconstruction(holdout=0.0))
    assert training == held == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_llama_checkpoint(tmp_path_factory.mktemp("recon") / "ckpt")


def test_checkpoint_run_equals_the_in_memory_run(checkpoint, tmp_path):
    batches = token_batches(5)
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    masks = prune_model(reference, batches, "sparsegpt", 0.5, reconstruct=QUICK, progress=False)
    summary = prune_checkpoint(checkpoint, tmp_path / "out", "sparsegpt", 0.5, calibration_data=batches,
                               reconstruct=QUICK, progress=False)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for name, param in reference.named_parameters():
        assert torch.equal(param, got.get_parameter(name)), name
    on_disk, metadata = load_mask(summary["masks"])
    assert all(torch.equal(on_disk[k], masks[k]) for k in masks)
    assert metadata["reconstruct"]["steps"] == QUICK["steps"]
    assert [b["block"] for b in summary["reconstruction"]] == [0, 1, 2]
    assert all(b["kept"] and b["after"] < b["before"] for b in summary["reconstruction"])


def test_bf16_checkpoint_reconstructs_in_fp32_and_stays_bf16(tmp_path):
    folder = write_llama_checkpoint(tmp_path / "ckpt", torch.bfloat16)
    batches = token_batches(5)
    summary = prune_checkpoint(folder, tmp_path / "out", "wanda", 0.5, calibration_data=batches,
                               reconstruct=QUICK, progress=False)
    assert summary["dtype"] == "torch.bfloat16"
    assert all(b["kept"] for b in summary["reconstruction"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    masks, _ = load_mask(summary["masks"])
    for name, keep in masks.items():
        weight = model.get_parameter(name)
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight[~keep], torch.zeros_like(weight[~keep])), name
    assert any(not torch.equal(model.get_parameter(k)[masks[k]], dense.get_parameter(k)[masks[k]]) for k in masks)
    assert main(["validate", str(tmp_path / "out"), summary["masks"], "--no-progress"]) == 0


def test_two_ranks_equal_one_process(checkpoint, tmp_path):
    batches = token_batches(5)
    torch.save(batches, tmp_path / "batches.pt")
    (tmp_path / "method.txt").write_text("magnitude")
    options = {"reconstruct": {"steps": 6, "lr": 1e-2, "batch": 2}}
    (tmp_path / "options.json").write_text(json.dumps(options))
    os.symlink(checkpoint, tmp_path / "ckpt")
    single = prune_checkpoint(checkpoint, tmp_path / "single", "magnitude", 0.5, calibration_data=batches,
                              progress=False, **options)
    run_torchrun("oneshot/prune_worker.py", tmp_path, 2)
    masks_single, _ = load_mask(single["masks"])
    masks_dist, _ = load_mask(tmp_path / "distributed" / "masks.safetensors")
    assert all(torch.equal(masks_single[k], masks_dist[k]) for k in masks_single)
    one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "single")
    two = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "distributed")
    dense = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    for name in masks_single:
        a, b = one.get_parameter(name), two.get_parameter(name)
        # the same steps on the same batches; only the order of the gradient sums differs
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.equal(b[~masks_dist[name]], torch.zeros_like(b[~masks_dist[name]]))
        assert not torch.equal(b, dense.get_parameter(name) * masks_dist[name])  # it did reconstruct


def test_prune_command_reconstructs_and_validates(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prune", str(checkpoint), "--method", "wanda", "--nm", "2:4", "--samples", "24", "--seq-len", "16",
                 "--reconstruct", "--reconstruct-steps", "4", "--reconstruct-lr", "0.01", "-o", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "3 blocks pruned with wanda at 2:4 + reconstruction" in printed
    assert "reconstruction kept in 3/3 blocks" in printed
    masks, metadata = load_mask(out / "masks.safetensors")
    assert metadata["reconstruct"] == {**Reconstruction().__dict__, "steps": 4, "lr": 0.01}
    validate_nm_mask(masks, 2, 4)
    assert main(["validate", str(out), str(out / "masks.safetensors"), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("valid: 0 of ")


@pytest.mark.parametrize("argv,message", [
    (["--reconstruct", "--reconstruct-steps", "-1"], "--reconstruct-steps=-1 must be an int >= 1"),
    (["--reconstruct", "--reconstruct-steps", "0"], "--reconstruct-steps=0 must be an int >= 1"),
    (["--reconstruct", "--reconstruct-lr", "0"], "--reconstruct-lr=0.0 must be a finite number > 0"),
    (["--reconstruct", "--reconstruct-lr", "nan"], "--reconstruct-lr=nan must be a finite number > 0"),
    (["--reconstruct", "--reconstruct-lr=-1e-3"], "--reconstruct-lr=-0.001 must be a finite number > 0"),
    (["--reconstruct", "--reconstruct-target", "sparse"], "invalid choice: 'sparse'"),
    (["--reconstruct-steps", "4"], "--reconstruct-steps only apply with --reconstruct"),
])
def test_prune_command_rejects_bad_reconstruction_options(checkpoint, tmp_path, capsys, argv, message):
    assert cli_exit_code(["prune", str(checkpoint), "-o", str(tmp_path / "out"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len([line for line in err.splitlines() if "Error" in line or "error" in line]) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,error,message", [
    ({"steps": -1}, ValueError, "steps=-1 must be an int >= 1"),
    ({"steps": 2.5}, TypeError, "steps=2.5 must be an int >= 1"),
    ({"lr": 0.0}, ValueError, "lr=0.0 must be a finite number > 0"),
    ({"lr": math.nan}, ValueError, "lr=nan must be a finite number > 0"),
    ({"lr": math.inf}, ValueError, "lr=inf must be a finite number > 0"),
    ({"batch": 0}, ValueError, "batch=0 must be an int >= 1"),
    ({"holdout": 1.0}, ValueError, "holdout=1.0 must be a number in [0, 1)"),
    ({"target": "sparse"}, ValueError, "target='sparse' is unknown; accepted: dense, pruned"),
    ({"seed": True}, TypeError, "seed=True must be an int"),
    ({"precision": "fp16"}, ValueError, "precision='fp16' is unknown; accepted: auto, fp32, bf16"),
    ({"epochs": 3}, TypeError, "epochs"),
])
def test_bad_options_are_refused_naming_the_option(options, error, message):
    with pytest.raises(error) as caught:
        prune_model(tiny_llama(), data(), "wanda", 0.5, reconstruct=options, progress=False)
    assert message in str(caught.value)
    with pytest.raises(TypeError, match="reconstruct='yes' must be True, False, a Reconstruction or a dict"):
        prune_model(tiny_llama(), data(), "wanda", 0.5, reconstruct="yes", progress=False)
    with pytest.raises(ValueError, match="reconstruct= needs calibration_data"):
        prune_model(tiny_llama(), None, "magnitude", 0.5, reconstruct=True, progress=False)


def test_progress_bar_shows_block_step_and_loss(capsys):
    prune_model(tiny_llama(), data(), "wanda", 0.5, reconstruct=QUICK, progress=True)
    err = capsys.readouterr().err
    assert "block 1: step 6/6, loss " in err and "→" in err
    assert re.search(r"block 1: loss [0-9.e-]+ → [0-9.e-]+", err)
