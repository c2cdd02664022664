"""ModelZoo 2.10 trainer configs that carry sparse masks (and sparse LoRA)."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from ..io.atomic import atomic_write_bytes
from ..lora.config import SPARSITY_MODES, check_lora_args
from ..pruning.mask_ops import compute_sparsity_stats, load_mask
from ..rules import check_bool, check_choice
from .names import HF_PROJECTION_CLASSES, attention_class, name_map as hf_name_map
from .schema import check_trainer_config

__all__ = ["create_sparse_config", "save_config", "load_config"]

PathLike = Union[str, os.PathLike]


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


def _target_modules(targets: Any, model_config: Mapping[str, Any]) -> list[str]:
    """ModelZoo's target_modules: class names. ``Linear`` (the default) is every nn.Linear
    (never embeddings); Hugging Face projection names become the class that holds them."""
    if targets is None:
        return ["Linear"]
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, Sequence) or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"lora_config['target_modules']={targets!r} must be a list of names or None")
    if set(targets) <= {"Linear", "all-linear"}:
        return ["Linear"]
    translated: list[str] = []
    widened: set[str] = set()
    for name in targets:
        if name in HF_PROJECTION_CLASSES:
            kind = HF_PROJECTION_CLASSES[name]
            cls = attention_class(model_config) if kind == "attention" else kind
            widened.add(cls)
            name = cls
        elif not name[:1].isupper():
            raise ValueError(
                f"lora_config target module {name!r}: ModelZoo's LoRA matches module class names (e.g. "
                f"MultiQueryAttention, FeedForwardNetwork, Linear); {', '.join(HF_PROJECTION_CLASSES)} are mapped"
            )
        if name not in translated:
            translated.append(name)
    named = sorted(set(targets) & set(HF_PROJECTION_CLASSES))
    if widened and len(named) not in (4, 7):
        warnings.warn(
            f"ModelZoo's LoRA matches module classes: {named} become {sorted(widened)}, which adapts every "
            "projection of those classes (all of q/k/v/o, or all of gate/up/down)",
            UserWarning, stacklevel=3)
    return translated


def _lora_params(lora_config: Mapping[str, Any], model_config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(lora_config, Mapping):
        raise TypeError(f"lora_config must be a dict, got {type(lora_config).__name__}")
    unknown = sorted(set(lora_config) - {"r", "alpha", "dropout", "target_modules", "fan_in_fan_out"})
    if unknown:
        raise ValueError(f"lora_config has unknown keys {unknown}; accepted: r, alpha, dropout, target_modules, fan_in_fan_out")
    r, alpha, dropout = check_lora_args(lora_config.get("r", 16), lora_config.get("alpha", 32),
                                        lora_config.get("dropout", 0.0))
    # narrower than sparse LoRA's finite alpha on purpose: ModelZoo's Lora callback types alpha as an int
    if alpha <= 0 or alpha != int(alpha):
        raise ValueError(f"alpha={lora_config['alpha']!r} must be a whole number > 0 (ModelZoo's LoRA alpha is an int)")
    params: dict[str, Any] = {"r": r, "alpha": int(alpha), "dropout": dropout,
                              "fan_in_fan_out": check_bool(lora_config.get("fan_in_fan_out", False), "fan_in_fan_out"),
                              "merge_weights": False}  # merging would densify the pruned weights
    params["target_modules"] = _target_modules(lora_config.get("target_modules"), model_config)
    return params


def _escape_glob(name: str) -> str:
    # ModelZoo matches param_filter with fnmatch: make special characters literal
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _sparsity_groups(mask_path: PathLike, name_map: Mapping[str, str] | None) -> list[dict[str, Any]]:
    masks, _ = load_mask(mask_path)
    stats = compute_sparsity_stats(masks)["per_layer"]
    groups: dict[float, list[str]] = {}
    for name, layer in stats.items():
        value = float(layer["sparsity"])
        if value >= 1.0:
            raise ValueError(f"mask {name!r} prunes every weight; ModelZoo's static sparsity must be < 1")
        target = _escape_glob(name_map.get(name, name) if name_map else name)
        # the trainer's model may add a prefix ("model."): match the name alone or after a dot
        groups.setdefault(value, []).extend([target, f"*.{target}"])
    return [
        {"algorithm": "static", "sparsity": value, "init_method": "from_zeros", "param_filter": names}
        for value, names in groups.items()
        if value > 0.0
    ]


def _model_names(phases: list) -> set[str]:
    return {str(p.get("init", {}).get("model", {}).get("name", "")).lower() for p in phases if isinstance(p, dict)}


def _auto_name_map(mask_path: Path, phases: list) -> dict[str, str] | None:
    """HF → ModelZoo names when the masks carry Hugging Face llama names and the model is llama."""
    if "llama" not in _model_names(phases):
        return None
    names = list(load_mask(mask_path)[0])
    mapped = hf_name_map(names, "llama")
    return mapped or None


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

    ``base_config`` (a dict or a YAML path) is never changed; masks reach ModelZoo as zeros
    in the checkpoint's weights (``sparselora apply`` before ``cszoo checkpoint convert``).

    * With ``lora_config`` (``r``, ``alpha`` (a whole number), ``dropout``,
      ``target_modules``): ``sparse_to_dense`` gets ModelZoo's ``Lora`` callback
      (``merge_weights: false``); ``sparse_to_sparse`` gets sparselora's ``SparseLora``
      callback, whose layers compute ``((W + s·BA) ⊙ M) x``. Targets are ModelZoo class
      names: ``Linear`` (the default) is every ``nn.Linear``, HF projection names map to the
      class holding them (a warning says when that adapts more). A ``SparseMaskCallback``
      checks and keeps the masks; strict checkpoint loading is off (the base checkpoint has
      no adapters); no ``sparsity:`` block (ModelZoo fails with it and LoRA).
    * Without LoRA: a static ``sparsity:`` block, ``init_method: from_zeros``, one group
      per distinct layer sparsity, ``param_filter`` naming exactly the masked weights, strict
      loading off (the checkpoint carries zeros, not ``_mask`` tensors).

    ``name_map`` renames mask names to ModelZoo's; for a llama config and masks with Hugging
    Face names it is derived (``sparselora.cerebras.names``). Mask paths are made absolute.
    Writes YAML to ``output`` when given. Returns the new config.
    """
    check_choice(sparse_mode, "sparse_mode", SPARSITY_MODES)
    config = load_config(base_config)
    if "trainer" not in config:
        raise ValueError("base_config has no top-level 'trainer' key (a ModelZoo 2.x trainer config)")
    # absolute, since the trainer may run from another directory; links are kept (a hub cache's
    # masks.safetensors resolves to a blob whose name has no suffix to tell its format)
    mask_path = Path(os.path.abspath(mask_path))
    if not mask_path.exists():
        raise FileNotFoundError(f"mask_path {str(mask_path)!r} does not exist")
    phases = config["trainer"] if isinstance(config["trainer"], list) else [config["trainer"]]
    if name_map is None:
        name_map = _auto_name_map(mask_path, phases)
    groups = None if lora_config is not None else _sparsity_groups(mask_path, name_map)
    for phase in phases:
        if not isinstance(phase, dict) or not isinstance(phase.get("init"), dict):
            raise ValueError("every trainer phase needs an 'init' mapping")
        init = phase["init"]
        callbacks = [c for c in init.get("callbacks", []) or [] if not (
            isinstance(c, Mapping) and {k.lower() for k in c} & {"lora", "sparselora", "sparsemaskcallback"})]
        if lora_config is not None:
            params = _lora_params(lora_config, init.get("model", {}) or {})
            if "sparsity" in init:
                warnings.warn("removing the base config's sparsity block: it cannot be combined with LoRA",
                              UserWarning, stacklevel=2)
                init.pop("sparsity")
            if sparse_mode == "sparse_to_sparse":
                callbacks.append({"SparseLora": {"lora_params": dict(params), "sparsity_mode": sparse_mode}})
            else:
                callbacks.append({"Lora": {"lora_params": dict(params)}})
            mask_callback: dict[str, Any] = {"mask_path": str(mask_path), "apply_every_step": False}
            if name_map:
                # mapped names: masks come from the converted weights' zeros (q/k rows are reordered)
                mask_callback.update(name_map=dict(name_map), from_zeros=True)
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
