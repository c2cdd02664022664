"""The Cerebras routes on the real ModelZoo 2.10: its validator and its Trainer on the CPU backend.

Opt-in (marker ``modelzoo``, deselected by default): run in the environment that
``shared/cerebras/build_modelzoo_env.sh`` builds, with sparselora installed there::

    /tmp/cszoo/venv/bin/pip install --no-build-isolation --no-deps -e .
    /tmp/cszoo/venv/bin/python -m pytest -m modelzoo tests/cerebras/modelzoo -v

A tiny llama (ModelZoo's own model class) is built from a config, its initial state saved
as a ModelZoo checkpoint, pruned by sparselora (masks + zeros baked in), and trained for 4
steps through ``python -m sparselora.cerebras fit`` on each route the README shows, with the
configs exactly as ``create_sparse_config`` emits them. Checked in the checkpoints ModelZoo
writes: pruned weights exactly zero, frozen base weights unchanged, adapters trained, the
sparse_to_sparse merge exactly sparse and equal to the trained layers' weights.
"""

from __future__ import annotations

import copy
import glob
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.modelzoo

MODEL = {
    "name": "llama", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 4,
    "filter_size": 128, "max_position_embeddings": 128, "attention_module": "multiquery_attention",
    "extra_attention_params": {"num_kv_groups": 2}, "attention_type": "scaled_dot_product",
    "position_embedding_type": "rotary", "rotary_dim": 16, "rope_theta": 10000.0, "nonlinearity": "swiglu",
    "norm_type": "rmsnorm", "layer_norm_epsilon": 1.0e-05, "share_embedding_weights": False,
    "use_bias_in_output": False, "use_ffn_bias": False, "use_ffn_bias_in_attention": False,
    "use_projection_bias_in_attention": False, "embedding_layer_norm": False, "dropout_rate": 0.0,
    "attention_dropout_rate": 0.0, "embedding_dropout_rate": 0.0, "initializer_range": 0.02,
    "loss_scaling": "num_tokens", "loss_weight": 1.0,
}
SPARSITY, STEPS, MSL = 0.5, 4, 64
Q = "model.transformer_decoder.layers.0.self_attn.proj_q_dense_layer"


def base_config(data: Path) -> dict:
    loader = {"data_processor": "GptHDF5MapDataProcessor", "batch_size": 2, "shuffle": False, "num_workers": 0}
    return {"trainer": {
        "init": {
            "backend": {"backend_type": "CPU"}, "seed": 7, "model": copy.deepcopy(MODEL),
            "optimizer": {"AdamW": {"learning_rate": 1.0e-2, "betas": [0.9, 0.95], "correct_bias": True,
                                    "weight_decay": 0.0}},
            "precision": {"enabled": False, "max_gradient_norm": 1.0},
            "loop": {"max_steps": STEPS},
            "checkpoint": {"steps": 2, "save_initial_checkpoint": False, "autoload_last_checkpoint": False},
            "logging": {"log_steps": 1},
        },
        "fit": {"train_dataloader": {**loader, "data_dir": str(data / "train")}},
    }}


def write_data(folder: Path, n: int = 32) -> None:
    """ModelZoo's HDF5 'sample' layout: (n, 3, msl) int32 = input ids, loss mask, labels."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    starts, steps = rng.integers(0, MODEL["vocab_size"], (n, 1)), rng.integers(1, 4, (n, 1))
    tokens = (starts + steps * np.arange(MSL + 1)[None, :]) % MODEL["vocab_size"]
    data = np.stack([tokens[:, :-1], np.ones((n, MSL), dtype=np.int64), tokens[:, 1:]], axis=1).astype(np.int32)
    folder.mkdir(parents=True)
    with h5py.File(folder / "data-0.h5", "w") as handle:
        handle.create_dataset("data", data=data, dtype="i4", chunks=(1, 3, MSL))
        handle.attrs["n_examples"] = n


def load(path) -> dict:
    from sparselora.io.modelzoo import load_modelzoo_checkpoint

    return load_modelzoo_checkpoint(path)


def losses(model_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(sorted(glob.glob(f"{model_dir}/events/events.out.tfevents.*"))[-1])
    events.Reload()
    return [e.value for e in events.Scalars("loss")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Data, the pruned starting checkpoint (zeros baked in) and its masks."""
    import cerebras.pytorch as cstorch
    from cerebras.modelzoo.trainer.validate import validate_trainer_params

    from sparselora.pruning.mask_generator import compute_masks_for_state_dict
    from sparselora.pruning.mask_ops import save_mask

    root = tmp_path_factory.mktemp("zoo")
    write_data(root / "data" / "train")
    base = base_config(root / "data")
    torch.manual_seed(0)
    model = validate_trainer_params(copy.deepcopy(base))[0].init.model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = compute_masks_for_state_dict(state, SPARSITY, progress=False)
    for name, mask in masks.items():
        state[name] = state[name] * mask
    cstorch.save({"model": state}, str(root / "pruned.mdl"))
    save_mask(masks, root / "masks.safetensors", packed=True)
    return {"root": root, "base": base, "masks": masks, "state": state}


def train(zoo, name: str, config: dict) -> Path:
    """Train ``config`` from the pruned checkpoint through sparselora's launcher; the model dir."""
    config = copy.deepcopy(config)
    config["trainer"]["fit"]["ckpt_path"] = str(zoo["root"] / "pruned.mdl")
    path, out = zoo["root"] / f"{name}.yaml", zoo["root"] / f"out_{name}"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    validated = subprocess.run([sys.executable, "-m", "sparselora.cerebras", "config", "validate", str(path)],
                               capture_output=True, text=True, timeout=600)
    assert validated.returncode == 0, validated.stdout[-3000:] + validated.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "sparselora.cerebras", "fit", str(path), "--target_device", "CPU",
                          "--model_dir", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return out


def assert_pruned_zero(zoo, model_state: dict) -> None:
    for name, mask in zoo["masks"].items():
        assert bool((model_state[name][~mask] == 0).all()), name


@pytest.fixture(scope="module")
def lora_runs(zoo):
    from sparselora.cerebras import create_sparse_config

    runs = {}
    for mode in ("sparse_to_dense", "sparse_to_sparse"):
        config = create_sparse_config(zoo["base"], zoo["root"] / "masks.safetensors",
                                      {"r": 4, "alpha": 8, "target_modules": ["Linear"]}, mode)
        runs[mode] = (config, train(zoo, mode, config))
    return runs


@pytest.mark.parametrize("mode", ["sparse_to_dense", "sparse_to_sparse"])
def test_sparse_lora_trains_on_modelzoo(zoo, lora_runs, mode):
    config, out = lora_runs[mode]
    trained = load(out / f"checkpoint_{STEPS}.mdl")["model"]
    first = load(out / "checkpoint_2.mdl")["model"]
    adapters = [k for k in trained if k.endswith((".lora_A", ".lora_B"))]
    assert len(adapters) == 2 * 15  # [Linear]: q, k, v, o, up, gate, down of 2 blocks, and the LM head
    assert all(not torch.equal(trained[k], first[k]) for k in adapters if k.endswith("lora_B"))
    for name, value in zoo["state"].items():  # frozen base, zeros included
        assert torch.equal(trained[name], value), name
    assert_pruned_zero(zoo, trained)
    assert all(math.isfinite(v) for v in losses(out)) and len(losses(out)) == STEPS


def test_sparse_to_sparse_and_sparse_to_dense_are_different_functions(lora_runs):
    dense, sparse = (losses(lora_runs[m][1]) for m in ("sparse_to_dense", "sparse_to_sparse"))
    print(f"losses sparse_to_dense {dense}\nlosses sparse_to_sparse {sparse}")
    assert dense[0] == pytest.approx(sparse[0], abs=1e-6)  # a fresh adapter (B = 0) changes nothing
    assert dense[1:] != sparse[1:]


def test_sparse_to_sparse_merge_is_exactly_sparse(zoo, lora_runs, tmp_path):
    from sparselora.cerebras.sparse_lora_callback import merged_weight

    config, out = lora_runs["sparse_to_sparse"]
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    merged_path = tmp_path / "merged.mdl"
    run = subprocess.run([sys.executable, "-m", "sparselora.cerebras", "merge", str(out / f"checkpoint_{STEPS}.mdl"),
                          "--config", str(config_path), "-o", str(merged_path)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    trained, merged = load(out / f"checkpoint_{STEPS}.mdl")["model"], load(merged_path)["model"]
    assert not any(k.endswith((".lora_A", ".lora_B")) for k in merged)
    assert_pruned_zero(zoo, merged)
    expected = merged_weight(trained[f"{Q}.weight"], trained[f"{Q}.lora_A"], trained[f"{Q}.lora_B"], 8 / 4,
                             "sparse_to_sparse")
    assert torch.equal(merged[f"{Q}.weight"], expected)
    assert not torch.equal(merged[f"{Q}.weight"], trained[f"{Q}.weight"])  # the adapter's work is in it
    # and back to Hugging Face with ModelZoo's converter: exactly as sparse
    import transformers

    model_config = tmp_path / "model.yaml"
    model_config.write_text(yaml.safe_dump({"model": MODEL}))
    run = subprocess.run([str(Path(sys.executable).parent / "cszoo"), "checkpoint", "convert", "--model", "llama",
                          "--src-fmt", "cs-2.9", "--tgt-fmt", "hf", "--config", str(model_config),
                          "--export-safetensors", "--output-dir", str(tmp_path / "hf"), str(merged_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf" / "merged_to_hf")
    zeros = sum(int((p == 0).sum()) for n, p in hf.named_parameters() if n.endswith("proj.weight"))
    assert zeros == sum(int((~m).sum()) for m in zoo["masks"].values())


def test_sparse_full_finetuning_static_block(zoo):
    from sparselora.cerebras import create_sparse_config

    config = create_sparse_config(zoo["base"], zoo["root"] / "masks.safetensors")
    out = train(zoo, "static", config)
    trained = load(out / f"checkpoint_{STEPS}.mdl")["model"]
    assert_pruned_zero(zoo, trained)
    name = f"{Q}.weight"
    kept = zoo["masks"][name]
    assert not torch.equal(trained[name][kept], zoo["state"][name][kept])  # the kept weights trained


def test_sparse_full_finetuning_with_the_mask_callback(zoo):
    config = copy.deepcopy(zoo["base"])
    config["trainer"]["init"]["callbacks"] = [{"SparseMaskCallback": {
        "mask_path": str(zoo["root"] / "masks.safetensors"), "apply_every_step": True}}]
    out = train(zoo, "callback", config)
    trained = load(out / f"checkpoint_{STEPS}.mdl")["model"]
    assert_pruned_zero(zoo, trained)
    name = f"{Q}.weight"
    kept = zoo["masks"][name]
    assert not torch.equal(trained[name][kept], zoo["state"][name][kept])


def test_cli_reads_and_writes_modelzoo_checkpoints(zoo, tmp_path):
    """sparselora masks / stats / apply / validate on a ModelZoo .mdl checkpoint."""
    def run(*command, expect=0):
        proc = subprocess.run([sys.executable, "-m", "sparselora", *map(str, command)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == expect, proc.stderr[-3000:]
        return proc.stdout

    source = zoo["root"] / "pruned.mdl"
    run("masks", source, "--sparsity", 0.7, "-o", tmp_path / "m70.safetensors")
    assert "70.0" in run("stats", tmp_path / "m70.safetensors")
    run("validate", source, tmp_path / "m70.safetensors", expect=1)  # 50% zeros, not 70%
    run("apply", source, tmp_path / "m70.safetensors", "-o", tmp_path / "out")
    assert "valid" in run("validate", tmp_path / "out" / "pruned.mdl", tmp_path / "m70.safetensors")
    assert load(tmp_path / "out" / "pruned.mdl")["model"].keys() == zoo["state"].keys()


class _Stored:
    """An arbitrary object: cstorch stores it pickled (dill)."""


def test_modelzoo_checkpoints_are_never_unpickled(zoo, tmp_path, monkeypatch):
    import cerebras.pytorch as cstorch
    import dill

    from sparselora.io.modelzoo import load_modelzoo_checkpoint, save_modelzoo_checkpoint

    path = tmp_path / "object.mdl"
    cstorch.save({"model": {"w": torch.ones(2)}, "extra": _Stored()}, str(path))
    calls = []
    original = dill.loads
    monkeypatch.setattr(dill, "loads", lambda *a, **k: calls.append(1) or original(*a, **k))
    state = load_modelzoo_checkpoint(path)  # tensors read, the object left deferred
    assert torch.equal(state["model"]["w"], torch.ones(2))
    try:
        save_modelzoo_checkpoint(state, tmp_path / "copy.mdl")
    except ValueError as exc:  # carrying the object over would need it unpickled
        assert "never unpickled" in str(exc)
    assert calls == []


def test_every_shipped_trainer_config_passes_the_schema_check():
    import cerebras.modelzoo

    from sparselora.cerebras import check_trainer_config

    root = Path(cerebras.modelzoo.__file__).parent / "models"
    checked = 0
    for path in sorted(root.rglob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if isinstance(config, dict) and "trainer" in config:
            try:
                check_trainer_config(config)
            except ValueError as exc:
                raise AssertionError(f"{path.relative_to(root)}: {exc}") from None
            checked += 1
    print(f"{checked} shipped trainer configs pass")
    assert checked > 100


@pytest.fixture(scope="module")
def hf_route(zoo):
    """The README's Hugging Face route up to the converted checkpoint: an HF llama →
    ``sparselora masks`` → ``sparselora apply`` → ``cszoo checkpoint convert``."""
    import transformers

    root = zoo["root"] / "hf"
    hf_config = transformers.LlamaConfig(
        vocab_size=MODEL["vocab_size"], hidden_size=MODEL["hidden_size"], intermediate_size=MODEL["filter_size"],
        num_hidden_layers=MODEL["num_hidden_layers"], num_attention_heads=MODEL["num_heads"], num_key_value_heads=2,
        max_position_embeddings=MODEL["max_position_embeddings"], rope_theta=MODEL["rope_theta"],
        rms_norm_eps=MODEL["layer_norm_epsilon"], tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(root / "model", safe_serialization=True)

    def run(*command):
        proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sparselora = [sys.executable, "-m", "sparselora"]
    run(*sparselora, "masks", root / "model", "--sparsity", SPARSITY, "-o", root / "masks.safetensors")
    run(*sparselora, "apply", root / "model", root / "masks.safetensors", "-o", root / "pruned")
    cszoo = Path(sys.executable).parent / "cszoo"
    run(cszoo, "checkpoint", "convert", "--model", "llama", "--src-fmt", "hf", "--tgt-fmt", "cs-2.9",
        "--config", root / "pruned" / "config.json", "--output-dir", root / "cs",
        root / "pruned" / "model.safetensors.index.json")
    converted = yaml.safe_load((root / "cs" / "config_to_cs-2.9.yaml").read_text())
    base = copy.deepcopy(zoo["base"])
    # the converter writes cs-2.9 model keys that 2.10's trainer schema no longer accepts
    model = {k: v for k, v in converted["model"].items() if k not in ("norm_first", "use_ff_layer1_dropout")}
    base["trainer"]["init"]["model"] = model
    (root / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    start = load(root / "cs" / "model_to_cs-2.9.mdl")["model"]
    return {"root": root, "checkpoint": root / "cs" / "model_to_cs-2.9.mdl", "start": start, "run": run}


@pytest.mark.parametrize("lora", [None, "sparse_to_sparse"], ids=["full-finetuning", "sparse-lora"])
def test_hugging_face_route(hf_route, lora):
    from sparselora.pruning.mask_ops import load_mask

    root = hf_route["root"]
    out_yaml = root / f"sparse-{lora}.yaml"
    extra = [] if lora is None else ["--lora-r", 4, "--lora-alpha", 8, "--mode", lora]
    hf_route["run"](sys.executable, "-m", "sparselora", "cerebras-config", root / "base.yaml", "--masks",
                    root / "masks.safetensors", *extra, "-o", out_yaml)
    config = yaml.safe_load(out_yaml.read_text())
    config["trainer"]["fit"]["ckpt_path"] = str(hf_route["checkpoint"])
    out = root / f"out-{lora}"
    out_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "sparselora.cerebras", "fit", str(out_yaml), "--target_device", "CPU",
                           "--model_dir", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    trained = load(out / f"checkpoint_{STEPS}.mdl")["model"]
    masks, _ = load_mask(root / "masks.safetensors")
    checked = 0
    for name, value in hf_route["start"].items():
        pruned = value == 0
        if value.dim() == 2 and pruned.any():  # the converted weights carry the masks as zeros
            assert bool((trained[f"model.{name}"][pruned] == 0).all()), name
            checked += int(pruned.sum())
    assert checked == sum(int((~m).sum()) for m in masks.values())  # every pruned weight, under ModelZoo's names
