"""Sparse LoRA in transformers' Trainer: a tiny Llama with 50% masks, bf16 autocast on CPU,
non-reentrant gradient checkpointing, checkpoints every 3 steps, both sparsity modes.

After training: an exact sparse merge (sparse_to_sparse keeps its function), a
save_pretrained / from_pretrained round trip, resuming from a Trainer checkpoint to the
uninterrupted run's adapters, and masks carried by (and checked against) the checkpoint.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_llama
from sparselora.lora import (
    SparseLoRAConfig,
    SparseLoRALinear,
    apply_sparse_lora,
    merge_all_lora_weights,
    validate_sparsity_preserved,
)
from sparselora.ops.masks import unpack_bits
from sparselora.pruning.mask_generator import compute_random_mask, compute_unstructured_mask

import transformers  # noqa: E402  (the dev extra installs it)

MODES = ("sparse_to_dense", "sparse_to_sparse")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, SEQ = 64, 16


class CountingDataset(torch.utils.data.Dataset):
    """Sequences counting up mod VOCAB from a random start: the next token is learnable."""

    def __init__(self, n: int = 32) -> None:
        starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(7))
        self.ids = (starts + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def fresh_masks() -> dict[str, torch.Tensor]:
    return compute_unstructured_mask(tiny_llama(0), 0.5, progress=False)


def wrapped(mode: str, masks: dict[str, torch.Tensor]):
    model = tiny_llama(0)
    config = SparseLoRAConfig(r=8, alpha=16, target_modules=TARGETS, sparsity_mode=mode)  # dropout 0.05
    torch.manual_seed(1)
    return apply_sparse_lora(model, masks, config)


def make_trainer(model, out: Path, callbacks=()):
    with warnings.catch_warnings():
        # transformers 5 renames gradient_checkpointing to activation_checkpointing (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        args = transformers.TrainingArguments(
            output_dir=str(out), bf16=True, use_cpu=True, max_steps=6, per_device_train_batch_size=4,
            learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=3, logging_steps=1,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )
    return transformers.Trainer(model=model, args=args, train_dataset=CountingDataset(), callbacks=list(callbacks))


def adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@torch.no_grad()
def eval_logits_and_loss(model, ids):
    was_training = model.training
    model.eval()
    out = model(input_ids=ids, labels=ids)
    model.train(was_training)
    return out.logits.float(), float(out.loss)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 6-step Trainer run per mode, checkpoints at steps 3 and 6."""
    runs = {}
    masks = fresh_masks()
    ids = CountingDataset().ids
    for mode in MODES:
        out = tmp_path_factory.mktemp(mode)
        model = wrapped(mode, masks)
        initial = adapters(model)
        base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        _, loss_before = eval_logits_and_loss(model, ids)
        layer = model.model.layers[0].self_attn.q_proj
        calls = []
        hook = layer.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        trainer = make_trainer(model, out)
        trainer.train()
        hook.remove()
        # accelerate leaves model.forward wrapped in bf16 autocast; compare in fp32 without it
        assert trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False) is model
        assert "_original_forward" not in model.__dict__
        runs[mode] = {
            "model": model, "masks": masks, "out": out, "initial": initial, "base": base,
            "final": adapters(model), "loss_before": loss_before, "layer_calls": calls,
            "gradient_checkpointing": getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
            or model.is_gradient_checkpointing,
            "train_losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        }
    return runs


@pytest.mark.parametrize("mode", MODES)
def test_trainer_trains_merges_and_reloads(trained, mode, tmp_path):
    run = trained[mode]
    model, masks = run["model"], run["masks"]
    ids = CountingDataset().ids
    # the run: 6 steps, gradient checkpointing recomputing each layer in the backward
    assert len(run["train_losses"]) == 6 and all(torch.isfinite(torch.tensor(run["train_losses"])))
    assert run["gradient_checkpointing"]
    assert len(run["layer_calls"]) == 12, "forward + recomputation per step"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 was autocast only
    # only the adapters trained; the masked base stayed as it was
    assert all(not torch.equal(run["final"][n], run["initial"][n]) for n in run["final"] if n.endswith("lora_B"))
    assert all(torch.equal(p, run["base"][n]) for n, p in model.named_parameters() if not p.requires_grad)
    logits, loss_after = eval_logits_and_loss(model, ids)
    assert loss_after < run["loss_before"] - 0.05, (run["loss_before"], loss_after, run["train_losses"])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge_all_lora_weights(model, preserve_sparsity=True)
    merge_warnings = [w for w in caught if issubclass(w.category, UserWarning)]
    if mode == "sparse_to_dense":  # the masked merge drops the trained update's pruned part
        assert len(merge_warnings) == 1 and "preserve_sparsity" in str(merge_warnings[0].message)
    else:
        assert merge_warnings == []
    assert not any(isinstance(m, SparseLoRALinear) for m in merged.modules())
    ok, report = validate_sparsity_preserved(merged, masks, tolerance=0.0)
    assert ok and report["global"]["total_violations"] == 0 and report["global"]["num_layers"] == 14
    params = dict(merged.named_parameters())
    assert all(bool((params[n][~m] == 0).all()) for n, m in masks.items())

    merged_logits, _ = eval_logits_and_loss(merged, ids)
    if mode == "sparse_to_sparse":  # trained as (W + s·BA) ⊙ M: merging is exact
        torch.testing.assert_close(merged_logits, logits, atol=1e-5, rtol=0)
    else:  # W⊙M + s·BA was trained; the masked merge is another function
        assert not torch.allclose(merged_logits, logits, atol=1e-5, rtol=0)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, SparseLoRALinear) for m in reloaded.modules())
    reloaded_logits, _ = eval_logits_and_loss(reloaded, ids)
    torch.testing.assert_close(reloaded_logits, merged_logits, atol=0, rtol=0)
    ok, report = validate_sparsity_preserved(reloaded, masks, tolerance=0.0)
    assert ok and report["global"]["total_violations"] == 0


class StopAt(transformers.TrainerCallback):
    """Ends training after step ``step`` (after its checkpoint is written): an interrupted run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("mode", MODES)
def test_resume_from_checkpoint_matches_uninterrupted(trained, mode, tmp_path):
    run = trained[mode]
    first = wrapped(mode, run["masks"])
    interrupted = make_trainer(first, tmp_path, callbacks=[StopAt(3)])
    interrupted.train()
    assert interrupted.state.global_step == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]
    halfway = adapters(first)
    assert all(not torch.equal(halfway[n], run["final"][n]) for n in halfway if n.endswith("lora_B"))
    del interrupted, first

    model = wrapped(mode, run["masks"])  # a new process would start here
    resumed = make_trainer(model, tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.state.global_step == 6
    # steps 1-3 come from the checkpoint's log, steps 4-6 were trained here: all as uninterrupted
    losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(run["train_losses"]), atol=1e-6, rtol=0)
    final = adapters(model)
    assert list(final) == list(run["final"])
    for name in final:
        torch.testing.assert_close(final[name], run["final"][name], atol=1e-6, rtol=0, msg=name)
    ok, _ = validate_sparsity_preserved(model, run["masks"], tolerance=0.0)
    assert ok == (mode == "sparse_to_sparse")


def test_trainer_checkpoint_carries_masks(trained, tmp_path):
    run = trained["sparse_to_sparse"]
    checkpoint = run["out"] / "checkpoint-3"
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight_mask")}
    assert sorted(saved) == sorted(n + "_mask" for n in run["masks"])  # "<layer>.weight" -> "<layer>.weight_mask"
    for name, mask in run["masks"].items():
        assert saved[name + "_mask"].dtype == torch.uint8  # packed, 8 per byte
        assert torch.equal(unpack_bits(saved[name + "_mask"], mask.shape), mask)

    # resuming into a model wrapped with other masks is refused, naming the mask
    other = compute_random_mask(tiny_llama(0), 0.5, seed=3, progress=False)
    assert any(not torch.equal(other[n], run["masks"][n]) for n in other)
    trainer = make_trainer(wrapped("sparse_to_sparse", other), tmp_path)
    with pytest.raises(RuntimeError, match=r"weight_mask: the saved mask differs") as excinfo:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert str(excinfo.value).count("the saved mask differs") == len(other)  # every layer is named
