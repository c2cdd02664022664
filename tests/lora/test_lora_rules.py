"""One LoRA argument rule: every entry point that takes r, alpha and dropout (the sparse LoRA
config, the Cerebras trainer config, the ``SparseLora`` ModelZoo callback and its checkpoint
merge) refuses the same bad value with the same exception and the same message."""

from __future__ import annotations

import math

import pytest
import torch

from sparselora.cerebras import SparseLora, SparseMaskCallback, check_trainer_config, create_sparse_config, merge_state_dict
from sparselora.lora import SparseLoRAConfig
from sparselora.pruning.mask_ops import save_mask

GOOD = {"r": 4, "alpha": 8, "dropout": 0.0}
BASE_CONFIG = {"trainer": {"init": {"model": {"name": "gpt2"}}}}

# (argument, bad value, exception, the one message every entry point gives)
BAD = [
    ("r", 0, ValueError, "r=0 must be an int >= 1"),
    ("r", True, TypeError, "r=True must be an int >= 1"),
    ("r", 2.0, TypeError, "r=2.0 must be an int >= 1"),
    ("alpha", math.nan, ValueError, "alpha=nan must be a finite number"),
    ("alpha", math.inf, ValueError, "alpha=inf must be a finite number"),
    ("alpha", True, TypeError, "alpha=True must be a finite number"),
    ("dropout", 1.0, ValueError, "dropout=1.0 must be a float in [0, 1)"),
    ("dropout", -0.1, ValueError, "dropout=-0.1 must be a float in [0, 1)"),
    ("dropout", True, TypeError, "dropout=True must be a float in [0, 1)"),
]


@pytest.fixture(scope="module")
def mask_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("masks") / "masks.safetensors"
    save_mask({"fc.weight": torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) > 0.5}, path)
    return path


def _lora_config(params, mask_path):
    return create_sparse_config(BASE_CONFIG, mask_path, params)


def _lora_config_s2s(params, mask_path):
    return create_sparse_config(BASE_CONFIG, mask_path, params, sparse_mode="sparse_to_sparse")


def _sparse_lora_config(params, _):
    return SparseLoRAConfig(**params)


def _callback(params, _):
    return SparseLora(params, "sparse_to_sparse")


def _merge(params, _):
    state = {"fc.weight": torch.ones(2, 2), "fc.lora_A": torch.ones(1, 2), "fc.lora_B": torch.ones(2, 1)}
    return merge_state_dict(state, params, "sparse_to_sparse")


ENTRY_POINTS = [_sparse_lora_config, _lora_config, _lora_config_s2s, _callback, _merge]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("arg, value, error, message", BAD, ids=[f"{a}={v!r}" for a, v, _, _ in BAD])
def test_same_bad_value_same_message(entry, arg, value, error, message, mask_path):
    with pytest.raises(error) as info:
        entry({**GOOD, arg: value}, mask_path)
    assert type(info.value) is error
    assert str(info.value) == message


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__.strip("_"))
def test_good_values_pass_everywhere(entry, mask_path):
    entry(dict(GOOD), mask_path)


@pytest.mark.parametrize("callback", ["Lora", "SparseLora"])
@pytest.mark.parametrize("arg, value, error, message", BAD, ids=[f"{a}={v!r}" for a, v, _, _ in BAD])
def test_trainer_schema_gives_the_rule_message(callback, arg, value, error, message):
    config = {"trainer": {"init": {"model": {}, "callbacks": [{callback: {"lora_params": {**GOOD, arg: value}}}]}}}
    with pytest.raises(ValueError) as info:
        check_trainer_config(config)
    assert str(info.value) == f"trainer config trainer.init.callbacks[0].Lora: {message}"


def test_modelzoo_alpha_is_narrower_on_purpose(mask_path):
    # ModelZoo's Lora callback takes alpha as an int: a trainer config refuses what sparse LoRA
    # and the SparseLora callback (both of this library) accept
    assert SparseLoRAConfig(r=4, alpha=1.5).scaling == 1.5 / 4
    assert SparseLora({"r": 4, "alpha": 1.5}).lora_params["alpha"] == 1.5
    for alpha in (1.5, 0, -2):
        with pytest.raises(ValueError, match=rf"^alpha={alpha!r} must be a whole number > 0 \(ModelZoo's"):
            create_sparse_config(BASE_CONFIG, mask_path, {"r": 4, "alpha": alpha})
    params = create_sparse_config(BASE_CONFIG, mask_path, {"r": 4, "alpha": 16.0})["trainer"]["init"]["callbacks"]
    assert params[0]["Lora"]["lora_params"]["alpha"] == 16 and isinstance(params[0]["Lora"]["lora_params"]["alpha"], int)


@pytest.mark.parametrize("make", [
    lambda: SparseLoRAConfig(sparsity_mode="dense"),
    lambda: SparseLora({"r": 4}, "dense"),
])
def test_sparsity_mode_one_message(make):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == "sparsity_mode='dense' is unknown; accepted: sparse_to_dense, sparse_to_sparse"


@pytest.mark.parametrize("make, arg", [
    (lambda v: SparseLoRAConfig(preserve_sparsity_on_merge=v), "preserve_sparsity_on_merge"),
    (lambda v: SparseLoRAConfig(sparsity_mode="sparse_to_sparse", maintain_sparsity=v), "maintain_sparsity"),
    (lambda v: SparseMaskCallback("masks.pt", apply_every_step=v), "apply_every_step"),
    (lambda v: SparseMaskCallback("masks.pt", strict=v), "strict"),
    (lambda v: SparseMaskCallback("masks.pt", from_zeros=v), "from_zeros"),
])
def test_bool_settings_refuse_truthy_values(make, arg):
    with pytest.raises(TypeError) as info:
        make(1)
    assert str(info.value) == f"{arg}=1 must be True or False"


def test_trainer_config_fan_in_fan_out_is_a_bool(mask_path):
    with pytest.raises(TypeError) as info:
        create_sparse_config(BASE_CONFIG, mask_path, {"r": 4, "fan_in_fan_out": 1})
    assert str(info.value) == "fan_in_fan_out=1 must be True or False"
