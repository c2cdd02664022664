"""What Cerebras ModelZoo 2.10's trainer-config validator accepts, checked before emitting.

ModelZoo rejects unknown keys but does not range-check sparsity or LoRA settings; these
checks cover both, so a config that passes here does not fail later at run time for them.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..lora.config import check_lora_args
from ..rules import check_number, is_int

__all__ = ["TRAINER_KEYS", "INIT_KEYS", "LOOP_KEYS", "CHECKPOINT_KEYS", "SPARSITY_KEYS", "check_trainer_config"]

TRAINER_KEYS = {"init", "fit", "validate", "validate_all"}
INIT_KEYS = {
    "model", "device", "backend", "model_dir", "optimizer", "schedulers", "precision", "sparsity", "loop",
    "checkpoint", "logging", "callbacks", "loggers", "seed", "autorestart",
}
FIT_KEYS = {"train_dataloader", "val_dataloader", "ckpt_path"}
LOOP_KEYS = {"num_steps", "max_steps", "num_epochs", "steps_per_epoch", "eval_frequency", "eval_steps", "grad_accum_steps"}
CHECKPOINT_KEYS = {"steps", "autoload_last_checkpoint", "disable_strict_checkpoint_loading", "save_initial_checkpoint",
                   "checkpoint_name", "checkpoint_root", "strict_version"}
SPARSITY_KEYS = {"algorithm", "sparsity", "init_method", "param_filter", "update", "schedule", "drop_fraction",
                 "balance_in_groups", "balance_out_groups"}
SPARSITY_ALGORITHMS = {"static", "gmp", "set", "rigl"}
INIT_METHODS = {"random", "topk", "from_zeros", "checkerboard"}
LORA_KEYS = {"r", "alpha", "dropout", "fan_in_fan_out", "merge_weights", "target_modules"}


def _fail(where: str, message: str) -> None:
    raise ValueError(f"trainer config {where}: {message}") from None  # a rule's own error is the message


def _check_keys(block: Any, allowed: set[str], where: str) -> None:
    if not isinstance(block, Mapping):
        _fail(where, f"must be a mapping, got {type(block).__name__}")
    unknown = sorted(set(block) - allowed)
    if unknown:
        _fail(where, f"unknown keys {unknown}; ModelZoo accepts {sorted(allowed)}")


def _check_sparsity_group(group: Any, where: str) -> None:
    if is_int(group) or isinstance(group, float):  # a bare number is a static group's sparsity
        group = {"sparsity": group}
    _check_keys(group, SPARSITY_KEYS, where)
    algorithm = group.get("algorithm", "static")
    if algorithm not in SPARSITY_ALGORITHMS:
        _fail(where, f"algorithm={algorithm!r}; accepted: {sorted(SPARSITY_ALGORITHMS)}")
    if "init_method" in group and group["init_method"] not in INIT_METHODS:
        _fail(where, f"init_method={group['init_method']!r}; accepted: {sorted(INIT_METHODS)}")
    if algorithm == "static":
        # [0, 1), not check_sparsity's [0, 1], on purpose: ModelZoo refuses a static sparsity of 1
        try:
            check_number(group.get("sparsity"), "sparsity", low=0.0, high=1.0, high_open=True, wanted="a float in [0, 1)")
        except (TypeError, ValueError) as exc:
            _fail(where, str(exc))


def _check_callbacks(callbacks: Any, where: str) -> list[str]:
    if not isinstance(callbacks, list):
        _fail(where, "must be a list of one-key mappings {ClassName: {kwargs}}")
    names = []
    for i, entry in enumerate(callbacks):
        if not isinstance(entry, Mapping) or len(entry) != 1:
            _fail(f"{where}[{i}]", "each callback is a one-key mapping {ClassName: {kwargs}}")
        (name, kwargs), = entry.items()
        if kwargs is not None and not isinstance(kwargs, Mapping):
            _fail(f"{where}[{i}]", f"arguments of {name} must be a mapping")
        if name.lower() in ("lora", "sparselora"):
            params = (kwargs or {}).get("lora_params", {})
            params_list = params if isinstance(params, list) else [params]
            for p in params_list:
                _check_keys(p, LORA_KEYS, f"{where}[{i}].Lora.lora_params")
                try:  # ModelZoo's defaults: r=8, alpha=1
                    check_lora_args(p.get("r", 8), p.get("alpha", 1), p.get("dropout", 0.0))
                except (TypeError, ValueError) as exc:
                    _fail(f"{where}[{i}].Lora", str(exc))
        names.append(name.lower())
    return names


def check_trainer_config(config: Mapping[str, Any]) -> None:
    """Raise ValueError naming the offending key unless ``config`` follows ModelZoo 2.10's
    trainer schema (and the range checks ModelZoo leaves to run time)."""
    if not isinstance(config, Mapping) or "trainer" not in config:
        _fail("", "must be a mapping with a top-level 'trainer' key")
    phases = config["trainer"] if isinstance(config["trainer"], list) else [config["trainer"]]
    for p, phase in enumerate(phases):
        where = f"trainer[{p}]" if isinstance(config["trainer"], list) else "trainer"
        _check_keys(phase, TRAINER_KEYS, where)
        if "init" not in phase:
            _fail(where, "has no 'init' block (required)")
        init = phase["init"]
        _check_keys(init, INIT_KEYS, f"{where}.init")
        if "model" not in init:
            _fail(f"{where}.init", "has no 'model' (required)")
        if "fit" in phase:
            _check_keys(phase["fit"], FIT_KEYS, f"{where}.fit")
        if "loop" in init:
            _check_keys(init["loop"], LOOP_KEYS, f"{where}.init.loop")
        if "checkpoint" in init:
            _check_keys(init["checkpoint"], CHECKPOINT_KEYS, f"{where}.init.checkpoint")
        callbacks = _check_callbacks(init.get("callbacks", []), f"{where}.init.callbacks")
        sparsity = init.get("sparsity")
        if sparsity is not None:
            for g, group in enumerate(sparsity if isinstance(sparsity, list) else [sparsity]):
                _check_sparsity_group(group, f"{where}.init.sparsity[{g}]")
            if {"lora", "sparselora"} & set(callbacks):
                _fail(f"{where}.init", "a Lora callback together with a sparsity block fails at the first optimizer "
                      "step (LoRA freezes the sparse weights); bring masks as zeros in the weights instead")
