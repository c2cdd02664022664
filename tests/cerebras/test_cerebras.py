"""Cerebras backend without any Cerebras package: emitted configs follow ModelZoo 2.10's
schema, and the callback works through ModelZoo's hook sequence on a real model."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import yaml

from sparselora.cerebras import SparseMaskCallback, check_trainer_config, create_sparse_config, save_config
from sparselora.cerebras.schema import CHECKPOINT_KEYS, INIT_KEYS, LORA_KEYS, SPARSITY_KEYS, TRAINER_KEYS
from sparselora.pruning.mask_generator import compute_unstructured_mask
from sparselora.pruning.mask_ops import save_mask
from conftest import LLAMA_BASE_CONFIG


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.fixture
def mask_file(tmp_path, model):
    masks = compute_unstructured_mask(model, {"0": 0.5, "2": 0.75})
    path = tmp_path / "masks.safetensors"
    save_mask(masks, path, packed=True)
    return path, masks


def assert_schema(config):
    trainer = config["trainer"]
    assert set(trainer) <= TRAINER_KEYS
    init = trainer["init"]
    assert set(init) <= INIT_KEYS and "model" in init
    assert set(init.get("checkpoint", {})) <= CHECKPOINT_KEYS
    for entry in init.get("callbacks", []):
        assert isinstance(entry, dict) and len(entry) == 1
        if "Lora" in entry:
            assert set(entry["Lora"]["lora_params"]) <= LORA_KEYS
    groups = init.get("sparsity", [])
    for group in groups if isinstance(groups, list) else [groups]:
        assert set(group) <= SPARSITY_KEYS
        assert isinstance(group["sparsity"], float) and 0.0 <= group["sparsity"] < 1.0
    assert not ("sparsity" in init and any("Lora" in c for c in init.get("callbacks", [])))


def test_lora_config(mask_file, tmp_path):
    path, _ = mask_file
    base = copy.deepcopy(LLAMA_BASE_CONFIG)
    base["trainer"]["init"]["model"]["attention_module"] = "multiquery_attention"
    with pytest.warns(UserWarning, match="adapts every projection"):
        config = create_sparse_config(base, path, {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                                      "sparse_to_sparse", output=tmp_path / "out.yaml")
    assert base["trainer"]["init"].get("callbacks") is None  # the input is not changed
    assert_schema(config)
    lora, mask_cb = config["trainer"]["init"]["callbacks"]
    # sparse_to_sparse: sparselora's own callback, whose layers mask the adapter's delta
    assert lora["SparseLora"]["sparsity_mode"] == "sparse_to_sparse"
    params = lora["SparseLora"]["lora_params"]
    assert params["target_modules"] == ["MultiQueryAttention"] and params["merge_weights"] is False
    assert mask_cb["SparseMaskCallback"]["apply_every_step"] is False
    assert yaml.safe_load((tmp_path / "out.yaml").read_text()) == config
    # what ModelZoo needs to load a base checkpoint without lora_A/lora_B, from any directory
    assert config["trainer"]["init"]["checkpoint"]["disable_strict_checkpoint_loading"] is True
    assert os.path.isabs(mask_cb["SparseMaskCallback"]["mask_path"])
    assert params["alpha"] == 16 and type(params["alpha"]) is int


def test_lora_targets_follow_the_model_config(mask_file):
    path, _ = mask_file
    base = copy.deepcopy(LLAMA_BASE_CONFIG)  # no attention_module: ModelZoo builds MultiheadAttention
    qkvo = ["q_proj", "k_proj", "v_proj", "o_proj"]
    config = create_sparse_config(base, path, {"r": 8, "alpha": 16, "target_modules": qkvo})
    assert config["trainer"]["init"]["callbacks"][0]["Lora"]["lora_params"]["target_modules"] == ["MultiheadAttention"]
    config = create_sparse_config(base, path, {"r": 8, "alpha": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"]})
    assert config["trainer"]["init"]["callbacks"][0]["Lora"]["lora_params"]["target_modules"] == ["FeedForwardNetwork"]
    for linear in (None, ["Linear"]):  # every nn.Linear, never the embeddings (None would convert those)
        config = create_sparse_config(base, path, {"r": 8, "alpha": 16, "target_modules": linear})
        assert config["trainer"]["init"]["callbacks"][0]["Lora"]["lora_params"]["target_modules"] == ["Linear"]


def test_hugging_face_llama_names_map_to_modelzoo(tmp_path):
    from sparselora.cerebras.names import modelzoo_name

    assert modelzoo_name("model.layers.3.self_attn.q_proj.weight") == \
        "transformer_decoder.layers.3.self_attn.proj_q_dense_layer.weight"
    assert modelzoo_name("layers.0.mlp.gate_proj.weight") == "transformer_decoder.layers.0.ffn.ffn.0.linear_layer_for_glu.weight"
    assert modelzoo_name("model.layers.0.mlp.down_proj.weight") == "transformer_decoder.layers.0.ffn.ffn.1.linear_layer.weight"
    assert modelzoo_name("model.embed_tokens.weight") is None
    masks = {"model.layers.0.self_attn.q_proj.weight": torch.rand(8, 8) > 0.5,
             "model.layers.0.mlp.up_proj.weight": torch.rand(16, 8) > 0.25}
    save_mask(masks, tmp_path / "hf.safetensors")
    config = create_sparse_config(copy.deepcopy(LLAMA_BASE_CONFIG), tmp_path / "hf.safetensors")
    filters = [f for group in config["trainer"]["init"]["sparsity"] for f in group["param_filter"]]
    assert "*.transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight" in filters
    assert not any("q_proj" in f for f in filters)
    config = create_sparse_config(copy.deepcopy(LLAMA_BASE_CONFIG), tmp_path / "hf.safetensors", {"r": 4, "alpha": 8})
    mask_cb = config["trainer"]["init"]["callbacks"][1]["SparseMaskCallback"]
    assert mask_cb["from_zeros"] is True and mask_cb["name_map"]["model.layers.0.mlp.up_proj.weight"] == \
        "transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"


@pytest.mark.parametrize("alpha", [16.5, 0, -2, float("nan")])
def test_lora_alpha_must_be_a_whole_number(mask_file, alpha):
    with pytest.raises(ValueError, match="alpha"):
        create_sparse_config(copy.deepcopy(LLAMA_BASE_CONFIG), mask_file[0], {"r": 8, "alpha": alpha})


def test_sparse_full_finetune_config(mask_file, tmp_path):
    path, masks = mask_file
    config = create_sparse_config(str(save_config(LLAMA_BASE_CONFIG, tmp_path / "base.yaml")), path)
    assert_schema(config)
    groups = config["trainer"]["init"]["sparsity"]
    assert [g["sparsity"] for g in groups] == [0.5, 0.75]
    assert [g["param_filter"] for g in groups] == [["0.weight", "*.0.weight"], ["2.weight", "*.2.weight"]]
    assert all(g["algorithm"] == "static" and g["init_method"] == "from_zeros" for g in groups)
    assert config["trainer"]["init"]["checkpoint"] == {"steps": 50, "disable_strict_checkpoint_loading": True}


def test_lora_removes_a_sparsity_block_and_keeps_user_keys(mask_file):
    path, _ = mask_file
    base = copy.deepcopy(LLAMA_BASE_CONFIG)
    base["trainer"]["init"]["sparsity"] = {"sparsity": 0.5}
    base["trainer"]["init"]["callbacks"] = [{"CheckLoss": {}}]
    with pytest.warns(UserWarning, match="sparsity block"):
        config = create_sparse_config(base, path, {"r": 4})
    init = config["trainer"]["init"]
    assert "sparsity" not in init and init["callbacks"][0] == {"CheckLoss": {}}
    assert init["optimizer"] == {"AdamW": {"lr": 1e-4}}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"trainer": {"init": {"model": {}}, "bogus": 1}}, "unknown keys"),
        ({"trainer": {"init": {"model": {}, "sparsity": {"sparsity": 1.5}}}}, r"\[0, 1\)"),
        ({"trainer": {"init": {"model": {}, "sparsity": 0.5, "callbacks": [{"Lora": {"lora_params": {"r": 4}}}]}}}, "Lora"),
        ({"trainer": {"init": {"model": {}, "callbacks": [{"A": {}, "B": {}}]}}}, "one-key"),
        ({"trainer": {"init": {}}}, "'model'"),
    ],
)
def test_schema_checks(bad, match):
    with pytest.raises(ValueError, match=match):
        check_trainer_config(bad)


@pytest.mark.parametrize(
    "lora, match",
    [({"r": 0}, r"^r=0 must be an int >= 1$"), ({"dropout": 1.0}, "dropout"), ({"rank": 4}, "unknown keys"), ({"target_modules": ["fc1"]}, "class names")],
)
def test_bad_lora_config(mask_file, lora, match):
    with pytest.raises(ValueError, match=match):
        create_sparse_config(LLAMA_BASE_CONFIG, mask_file[0], lora)


def test_bad_mode_and_missing_masks(mask_file, tmp_path):
    with pytest.raises(ValueError, match="sparse_mode"):
        create_sparse_config(LLAMA_BASE_CONFIG, mask_file[0], sparse_mode="dense")
    with pytest.raises(FileNotFoundError, match="mask_path"):
        create_sparse_config(LLAMA_BASE_CONFIG, tmp_path / "none.pt")


class FakeTrainer:
    """Drives callbacks in ModelZoo 2.10's hook order over a real model and optimizer."""

    def __init__(self, model, callbacks):
        self.model, self.callbacks = model, callbacks
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def call(self, hook, *args):
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def fit(self, steps):
        self.call("pre_setup")
        self.call("setup")
        self.call("post_setup")
        self.call("on_fit_start", None, None, None)
        self.call("on_train_start", self.model, None, None, 0)
        for step in range(steps):
            x = torch.randn(4, 16)
            self.call("on_train_batch_start", self.model, x, step)
            loss = self.model(x).pow(2).sum()
            self.optimizer.zero_grad()
            loss.backward()
            self.call("on_before_optimizer_step", self.model, self.optimizer)
            self.optimizer.step()
            self.call("on_after_optimizer_step", self.model, self.optimizer)
            self.call("on_train_batch_end", self.model, loss, x, step)
        state = {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
        self.call("on_save_checkpoint", state)
        self.call("postprocess_checkpoint", state)
        self.call("on_train_end", self.model, None, 0)
        return state


@pytest.mark.parametrize("every_step", [True, False])
def test_callback_through_the_hook_sequence(model, mask_file, every_step):
    path, masks = mask_file
    callback = SparseMaskCallback(str(path), apply_every_step=every_step)
    state = FakeTrainer(model, [callback]).fit(steps=3)
    for name, mask in masks.items():
        weight = dict(model.named_parameters())[name]
        pruned_zero = bool((weight[~mask] == 0).all())
        assert pruned_zero == every_step  # without re-applying, SGD regrows pruned weights
        assert bool((state["model"][name][~mask] == 0).all())  # saved checkpoints stay masked


def test_callback_rejects_masks_that_do_not_fit(model, tmp_path):
    save_mask({"encoder.q.weight": torch.ones(3, 3, dtype=torch.bool)}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="encoder.q.weight"):
        FakeTrainer(model, [SparseMaskCallback(str(tmp_path / "m.pt"))]).fit(1)
    renamed = SparseMaskCallback(str(tmp_path / "m.pt"), name_map={"encoder.q.weight": "0.weight"})
    with pytest.raises(ValueError, match="shape"):
        FakeTrainer(model, [renamed]).fit(1)


def test_launcher_explains_itself_and_says_when_modelzoo_is_missing():
    from sparselora.cerebras import MODELZOO_AVAILABLE

    help_run = subprocess.run([sys.executable, "-m", "sparselora.cerebras", "--help"], capture_output=True, text=True,
                              timeout=120)
    assert help_run.stdout.startswith("usage: python -m sparselora.cerebras")
    if MODELZOO_AVAILABLE:  # the ModelZoo environment: cszoo's help follows ours
        assert "cszoo's own help follows" in help_run.stdout
    else:
        proc = subprocess.run([sys.executable, "-m", "sparselora.cerebras", "fit", "x.yaml"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and "ModelZoo is not installed" in proc.stderr


def test_cli_cerebras_config(mask_file, tmp_path):
    base = save_config(LLAMA_BASE_CONFIG, tmp_path / "base.yaml")
    out = tmp_path / "sparse.yaml"
    proc = subprocess.run([sys.executable, "-m", "sparselora", "cerebras-config", str(base), "--masks", str(mask_file[0]),
                           "--lora-r", "8", "--lora-alpha", "16", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(out.read_text())
    assert_schema(config)
    assert config["trainer"]["init"]["callbacks"][0]["Lora"]["lora_params"]["r"] == 8


def test_base_config_that_is_not_yaml_names_the_file(tmp_path):
    from sparselora.cerebras.config import load_config

    bad = tmp_path / "base.yaml"
    bad.write_text("a: [1\nb: }")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_config(bad)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8, bias=False)
        self.o = nn.Linear(8, 8)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()
        self.ffn = nn.Linear(8, 8)


def _pruned_block() -> _Block:
    torch.manual_seed(0)
    block = _Block()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) > 0.5)  # zeros baked in, as sparselora apply leaves them
    return block


def test_sparse_lora_callback_layers_compute_the_masked_function():
    from sparselora.cerebras.sparse_lora_callback import SparseLora, merge_state_dict

    block = _pruned_block()
    zeros = {n: (p == 0) for n, p in block.named_parameters() if n.endswith("weight")}
    callback = SparseLora({"r": 2, "alpha": 4, "target_modules": ["_Attention"]}, "sparse_to_sparse")
    callback.convert(block)
    assert callback.converted == ["attn.q", "attn.o"]  # ModelZoo's rule: the enclosing class names
    assert [n for n, p in block.named_parameters() if p.requires_grad] == [
        "attn.q.lora_A", "attn.q.lora_B", "attn.o.lora_A", "attn.o.lora_B"]
    q = block.attn.q
    with torch.no_grad():
        q.lora_B.normal_()
    x = torch.randn(5, 8, requires_grad=True)
    expected = x @ ((q.weight + 2.0 * q.lora_B @ q.lora_A) * (q.weight != 0)).t()
    torch.testing.assert_close(q(x), expected)
    q(x).sum().backward()
    assert q.lora_A.grad is not None and q.weight.grad is None
    # merged checkpoint: exactly as sparse as the base, and the same function
    state = {k: v.detach().clone() for k, v in block.state_dict().items()}
    merged = merge_state_dict(state, {"r": 2, "alpha": 4}, "sparse_to_sparse")
    assert not any(k.endswith(("lora_A", "lora_B")) for k in merged)
    for name, zero in zeros.items():
        assert bool((merged[name][zero] == 0).all()), name
    torch.testing.assert_close(x @ merged["attn.q.weight"].t(), q(x))
    dense = merge_state_dict(state, {"r": 2, "alpha": 4}, "sparse_to_dense")
    assert bool((dense["attn.q.weight"][zeros["attn.q.weight"]] != 0).any())  # sparse_to_dense densifies


def test_sparse_lora_callback_refuses_what_it_cannot_do():
    from sparselora.cerebras.sparse_lora_callback import SparseLora

    with pytest.raises(ValueError, match="sparsity_mode"):
        SparseLora({"r": 2}, "dense")
    with pytest.raises(ValueError, match="merge_weights"):
        SparseLora({"r": 2, "merge_weights": True})
    with pytest.raises(ValueError, match="match no nn.Linear"):
        SparseLora({"r": 2, "target_modules": ["MultiQueryAttention"]}).convert(_pruned_block())


def test_modelzoo_checkpoint_without_cerebras_pytorch_is_a_clear_error(tmp_path):
    from sparselora.cerebras import MODELZOO_AVAILABLE
    from sparselora.io.checkpoints import Checkpoint

    path = tmp_path / "model.mdl"
    path.write_bytes(b"not read")
    if MODELZOO_AVAILABLE:  # the ModelZoo environment reads .mdl files (tests/cerebras/modelzoo)
        with pytest.raises(ValueError, match="could not be read"):
            Checkpoint(path)
    else:
        with pytest.raises(ValueError, match="needs cerebras-pytorch"):
            Checkpoint(path)
