"""PEFT interoperability: sparse LoRA to and from PEFT LoRA adapters.

A sparse_to_dense model is PEFT's LoRA on a pruned base (``W⊙M + s·BA``), so it is written
as a PEFT adapter that ``peft.PeftModel.from_pretrained(pruned_base, directory)`` loads with
the same outputs. sparse_to_sparse computes ``((W + s·BA) ⊙ M) x``, which PEFT's LoRA cannot
express: ship it merged. The other way, an existing PEFT LoRA adapter (a directory or a
``PeftModel``) becomes the starting point of sparse LoRA in either mode.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from ..io.atomic import atomic_write_bytes
from ..pruning.targets import is_peft_model
from .config import SparseLoRAConfig
from .model import apply_sparse_lora, sparse_lora_layers

__all__ = ["export_peft_adapter", "from_peft_adapter", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
AdapterSource = Union[str, os.PathLike, nn.Module]


def export_peft_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write ``model``'s sparse_to_dense adapters as a PEFT LoRA adapter in ``directory``.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (atomically; the
    directory is created). Load it with ``peft.PeftModel.from_pretrained(base, directory)``
    where ``base`` is the model with the same masks applied (``apply_masks_to_model``, or
    the merged-free pruned checkpoint). Returns the directory.
    """
    layers = sparse_lora_layers(model)
    if not layers:
        raise ValueError("model has no sparse LoRA layers to export (apply_sparse_lora first)")
    s2s = [n for n, m in layers if m.masks_delta]
    if s2s:
        raise ValueError(
            f"{len(s2s)} layers (first {s2s[0]!r}) are sparse_to_sparse: they compute ((W + s·BA) ⊙ M) x, which a "
            "PEFT LoRA adapter cannot express. Merge instead (merge_all_lora_weights(model)) and save the merged, "
            "exactly sparse model with save_pretrained / save_file."
        )
    first = layers[0][1]
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    rank_pattern = {n: m.r for n, m in layers if m.r != first.r}
    alpha_pattern = {n: m.alpha for n, m in layers if m.alpha != first.alpha}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": [n for n, _ in layers],
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    tensors = {}
    for name, layer in layers:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(out / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return out


def _read_adapter_dir(directory: Path) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist; a PEFT adapter directory holds {CONFIG_FILE} "
                                    f"and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(config_path)!r} is not a readable JSON adapter config ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object")
    tensors = load_file(str(weights_path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
                pairs.setdefault(name, {})[part] = value
                break
        else:
            raise ValueError(f"{str(weights_path)!r} holds {key!r}, which is no LoRA weight; only lora_A / lora_B "
                             "adapters are supported")
    weights = {}
    for name, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{str(weights_path)!r}: layer {name!r} lacks lora_A or lora_B")
        weights[name] = (pair["lora_A"], pair["lora_B"])
    return config, weights


def _read_peft_model(peft_model: nn.Module) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    adapter = getattr(peft_model, "active_adapter", None)
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(adapter, str) or not isinstance(configs, Mapping) or adapter not in configs:
        raise TypeError("adapter must be a PEFT adapter directory or a peft.PeftModel with one active LoRA adapter")
    peft_config = configs[adapter]
    config = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(vars(peft_config))
    inner = peft_model.get_base_model()
    weights = {}
    for name, module in inner.named_modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(lora_A, nn.ModuleDict) and adapter in lora_A:
            weights[name] = (lora_A[adapter].weight.detach().clone(), lora_B[adapter].weight.detach().clone())
    return config, weights


def _check_supported(config: Mapping[str, Any], where: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).split(".")[-1].upper()
    if peft_type != "LORA":
        raise ValueError(f"{where} is a {peft_type} adapter; only LoRA adapters are supported")
    if config.get("use_dora"):
        raise ValueError(f"{where} is a DoRA adapter (use_dora=True); sparse LoRA supports plain LoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{where} has per-layer rank_pattern/alpha_pattern; sparse LoRA uses one r and alpha")


def from_peft_adapter(
    model: nn.Module,
    adapter: AdapterSource | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    config: SparseLoRAConfig | None = None,
) -> nn.Module:
    """Start sparse LoRA from an existing PEFT LoRA adapter; returns the sparse LoRA model.

    Args:
        model: the base model (plain), or a ``peft.PeftModel`` (then ``adapter`` may be
            omitted: its active adapter is taken and the PEFT wrapping is removed).
        adapter: a PEFT adapter directory (``adapter_config.json`` +
            ``adapter_model.safetensors``) or a ``peft.PeftModel``.
        masks: as for :func:`apply_sparse_lora` (None: magnitude masks at
            ``config.initial_sparsity``).
        config: sparse LoRA settings; None takes ``r``, ``lora_alpha``, ``lora_dropout``
            and the adapted layers from the adapter, in sparse_to_dense mode. A given
            config must have the adapter's ``r`` and scaling.

    The adapters start from the PEFT weights; in sparse_to_sparse mode the function is
    ``((W + s·BA) ⊙ M) x`` from the first step.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if adapter is None:
        adapter = model
    if isinstance(adapter, nn.Module):
        if not is_peft_model(adapter):
            raise TypeError("adapter is a module without PEFT adapters; pass a peft.PeftModel or an adapter directory")
        where = "the PeftModel"
        peft_config, weights = _read_peft_model(adapter)
    elif isinstance(adapter, (str, os.PathLike)):
        where = repr(str(adapter))
        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"adapter directory {where} does not exist")
        peft_config, weights = _read_adapter_dir(Path(adapter))
    else:
        raise TypeError(f"adapter must be a directory path or a peft.PeftModel, got {type(adapter).__name__}")
    _check_supported(peft_config, where)
    if not weights:
        raise ValueError(f"{where} holds no LoRA weights")
    r, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
    if peft_config.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r); sparse LoRA by alpha/r
    if is_peft_model(model):
        if not hasattr(model, "unload"):
            raise TypeError("model is wrapped by PEFT but has no unload(); pass the plain base model")
        model = model.unload()
    if config is None:
        config = SparseLoRAConfig(r=r, alpha=alpha, dropout=float(peft_config.get("lora_dropout") or 0.0),
                                  target_modules=sorted(weights))
    elif config.r != r or not math.isclose(config.scaling, alpha / r, rel_tol=1e-6):
        raise ValueError(
            f"config (r={config.r}, alpha={config.alpha}) does not match the adapter (r={r}, lora_alpha={alpha:g}); "
            "pass config=None to take the adapter's settings"
        )
    model = apply_sparse_lora(model, masks, config)
    layers = dict(sparse_lora_layers(model))
    missing = sorted(set(weights) - set(layers))
    if missing:
        raise ValueError(f"the adapter adapts {missing[:3]} ({len(missing)} layers) that config.target_modules "
                         "does not wrap; include them or pass config=None")
    with torch.no_grad():
        for name, (lora_A, lora_B) in weights.items():
            layer = layers[name]
            if lora_A.shape != layer.lora_A.shape or lora_B.shape != layer.lora_B.shape:
                raise ValueError(f"adapter weights of {name!r} have shapes {tuple(lora_A.shape)}, "
                                 f"{tuple(lora_B.shape)}; the layer needs {tuple(layer.lora_A.shape)}, "
                                 f"{tuple(layer.lora_B.shape)}")
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
    return model
