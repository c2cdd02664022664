"""ModelZoo 2.10 trainer configs that carry sparse masks (and sparse LoRA)."""

from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from ..io.atomic import atomic_write_bytes
from .schema import check_trainer_config

__all__ = ["create_sparse_config", "save_config", "load_config", "LLAMA_ATTENTION_CLASS"]

PathLike = Union[str, os.PathLike]
LLAMA_ATTENTION_CLASS = "MultiQueryAttention"
# Hugging Face attribute names of attention projections; ModelZoo's LoRA matches module
# *class* names, and these projections live in its attention class.
_HF_ATTENTION_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "c_attn"}
_MODES = ("sparse_to_dense", "sparse_to_sparse")


def load_config(config: Union[Mapping[str, Any], PathLike]) -> dict[str, Any]:
    """A trainer config as a new dict, from a mapping or a YAML file (``yaml.safe_load``)."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"base_config {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"base_config {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"base_config {str(path)!r} does not hold a YAML mapping")
    return loaded


def save_config(config: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``config`` as YAML (``safe_dump``, keys in insertion order) atomically."""
    text = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    atomic_write_bytes(path, text.encode())
    return Path(path)


def _target_modules(targets: Any) -> list[str] | None:
    """ModelZoo's target_modules: None converts every nn.Linear."""
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, Sequence) or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"lora_config['target_modules']={targets!r} must be a list of names or None")
    if set(targets) <= {"Linear", "all-linear"}:
        return None
    translated: list[str] = []
    for name in targets:
        if name in _HF_ATTENTION_NAMES:
            name = LLAMA_ATTENTION_CLASS
        elif not name[:1].isupper():
            raise ValueError(
                f"lora_config target module {name!r}: ModelZoo's Lora matches module class names "
                f"(e.g. {LLAMA_ATTENTION_CLASS!r}); attention projections q_proj/k_proj/v_proj/o_proj map to it"
            )
        if name not in translated:
            translated.append(name)
    return translated


def _lora_params(lora_config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(lora_config, Mapping):
        raise TypeError(f"lora_config must be a dict, got {type(lora_config).__name__}")
    unknown = sorted(set(lora_config) - {"r", "alpha", "dropout", "target_modules", "fan_in_fan_out"})
    if unknown:
        raise ValueError(f"lora_config has unknown keys {unknown}; accepted: r, alpha, dropout, target_modules, fan_in_fan_out")
    r = lora_config.get("r", 16)
    alpha = lora_config.get("alpha", 32)
    dropout = lora_config.get("dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"lora_config['r']={r!r} must be an int > 0")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or float(alpha) != int(alpha) or alpha <= 0:
        raise ValueError(f"lora_config['alpha']={alpha!r} must be a whole number > 0 (ModelZoo's LoRA alpha is an int)")
    alpha = int(alpha)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_config['dropout']={dropout!r} must be a float in [0, 1)")
    params: dict[str, Any] = {"r": r, "alpha": alpha, "dropout": float(dropout),
                              "fan_in_fan_out": bool(lora_config.get("fan_in_fan_out", False)),
                              "merge_weights": False}  # merging would densify the pruned weights
    targets = _target_modules(lora_config.get("target_modules"))
    if targets is not None:
        params["target_modules"] = targets
    return params


def _escape_glob(name: str) -> str:
    # ModelZoo matches param_filter with fnmatch: make special characters literal
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _sparsity_groups(mask_path: PathLike, name_map: Mapping[str, str] | None) -> list[dict[str, Any]]:
    from ..pruning.mask_ops import compute_sparsity_stats, load_mask

    masks, _ = load_mask(mask_path)
    stats = compute_sparsity_stats(masks)["per_layer"]
    groups: dict[float, list[str]] = {}
    for name, layer in stats.items():
        value = float(layer["sparsity"])
        if value >= 1.0:
            raise ValueError(f"mask {name!r} prunes every weight; ModelZoo's static sparsity must be < 1")
        target = name_map.get(name, name) if name_map else name
        groups.setdefault(value, []).append(_escape_glob(target))
    return [
        {"algorithm": "static", "sparsity": value, "init_method": "from_zeros", "param_filter": names}
        for value, names in groups.items()
        if value > 0.0
    ]


def create_sparse_config(
    base_config: Union[Mapping[str, Any], PathLike],
    mask_path: PathLike,
    lora_config: Mapping[str, Any] | None = None,
    sparse_mode: str = "sparse_to_dense",
    *,
    output: PathLike | None = None,
    name_map: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A ModelZoo 2.10 trainer config that trains with ``mask_path``'s sparsity.

    ``base_config`` (a dict or a YAML path) is never changed. With ``lora_config``
    (``r``, ``alpha``, ``dropout``, ``target_modules``), the config gets ModelZoo's ``Lora``
    callback (``merge_weights: false``) and a ``SparseMaskCallback`` that keeps the masks
    applied (after every step in ``sparse_to_sparse``); masks travel as zeros in the frozen
    base weights, so no built-in ``sparsity:`` block is emitted (ModelZoo fails with both).
    Without LoRA, a static ``sparsity:`` block with ``init_method: from_zeros`` and one
    group per distinct layer sparsity, and strict checkpoint loading off (the checkpoint
    carries zeros, not ``_mask`` tensors). ``name_map`` renames Hugging Face parameter names
    to ModelZoo's. Writes YAML to ``output`` when given. Returns the new config.
    """
    if sparse_mode not in _MODES:
        raise ValueError(f"sparse_mode={sparse_mode!r} is unknown; accepted: {', '.join(_MODES)}")
    config = load_config(base_config)
    if "trainer" not in config:
        raise ValueError("base_config has no top-level 'trainer' key (a ModelZoo 2.x trainer config)")
    mask_path = Path(mask_path).resolve()  # the trainer may run from another directory
    if not mask_path.exists():
        raise FileNotFoundError(f"mask_path {str(mask_path)!r} does not exist")
    phases = config["trainer"] if isinstance(config["trainer"], list) else [config["trainer"]]
    groups = None if lora_config is not None else _sparsity_groups(mask_path, name_map)
    params = None if lora_config is None else _lora_params(lora_config)
    for phase in phases:
        if not isinstance(phase, dict) or not isinstance(phase.get("init"), dict):
            raise ValueError("every trainer phase needs an 'init' mapping")
        init = phase["init"]
        callbacks = [c for c in init.get("callbacks", []) or []
                     if not (isinstance(c, Mapping) and {k.lower() for k in c} & {"lora", "sparsemaskcallback"})]
        if params is not None:
            if "sparsity" in init:
                warnings.warn("removing the base config's sparsity block: it cannot be combined with Lora", UserWarning, stacklevel=2)
                init.pop("sparsity")
            callbacks.append({"Lora": {"lora_params": dict(params)}})
            mask_callback: dict[str, Any] = {"mask_path": str(mask_path), "apply_every_step": sparse_mode == "sparse_to_sparse"}
            if name_map:
                mask_callback["name_map"] = dict(name_map)
            callbacks.append({"SparseMaskCallback": mask_callback})
            # the base checkpoint has no lora_A / lora_B: ModelZoo's strict loading would refuse it
            init.setdefault("checkpoint", {})["disable_strict_checkpoint_loading"] = True
        else:
            init["sparsity"] = groups if len(groups) != 1 else groups[0]
            init.setdefault("checkpoint", {})["disable_strict_checkpoint_loading"] = True
        if callbacks:
            init["callbacks"] = callbacks
    check_trainer_config(config)
    if output is not None:
        save_config(config, output)
    return config
