"""Which weights are pruned, and how user-given names map onto parameter names."""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Mapping, Sequence, Union

import torch
import torch.nn as nn

from ..rules import check_sparsity

__all__ = [
    "Target",
    "SparsitySpec",
    "model_targets",
    "state_dict_targets",
    "described_targets",
    "config_embedding_names",
    "is_default_target",
    "is_fused_experts",
    "split_experts",
    "join_experts",
    "expert_slice_name",
    "expert_of",
    "EXPERTS_MODULE",
    "filter_targets",
    "resolve_sparsity",
    "normalise_mask_keys",
    "is_peft_model",
    "is_hf_conv1d",
    "warn_overpruned",
    "DENSE_MODULES",
    "refuse_peft_model",
]

SparsitySpec = Union[float, Mapping[str, float]]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# substrings that mark a state-dict tensor as not prunable by default (as ModelZoo does)
_DENSE_BY_NAME = ("embed", "norm", "lm_head", "pe_helper")
# task heads, poolers and mixture-of-experts routers: small, and a global threshold would prune them away
DENSE_MODULES = ("lm_head", "pooler", "classifier", "score", "gate", "router", "shared_expert_gate")
# transformers keeps a mixture-of-experts block's experts as 3-D parameters of a module named so:
# mlp.experts.gate_up_proj (experts, 2·ffn, hidden), mlp.experts.down_proj (experts, hidden, ffn)
EXPERTS_MODULE = "experts"
OVERPRUNED = 0.95  # a tensor above this sparsity under a global threshold is reported


@dataclass(frozen=True)
class Target:
    """One prunable weight: its parameter name, owning module name and output dimension."""

    name: str
    module_name: str
    weight: torch.Tensor | None  # None when the target is only described (a file on disk)
    out_dim: int = 0  # dimension that indexes output channels / filters
    experts: int = 0  # > 0: a fused-experts weight, one matrix per index of dim 0 (see split_experts)


def is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight as (in, out); matched by name so that
    # transformers stays optional.
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), nn.Parameter)


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def model_targets(model: nn.Module) -> list[Target]:
    """Default targets: weights of Linear, Conv1d/2d/3d and transformers' Conv1D.

    The LM head (a module named ``lm_head`` or a weight tied to an embedding) stays dense.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    refuse_peft_model(model, "mask generation")
    tied = _embedding_weights(model)
    targets, seen = [], set()
    for module_name, module in model.named_modules():
        if module_name.rsplit(".", 1)[-1] == EXPERTS_MODULE and not _is_dense_module(module_name):
            targets.extend(_expert_targets(module_name, module, seen))
            continue
        is_linear = isinstance(module, nn.Linear)
        is_conv = isinstance(module, _CONV_TYPES)
        is_conv1d = is_hf_conv1d(module)
        if not (is_linear or is_conv or is_conv1d):
            continue
        weight = module.weight
        if not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        if _is_dense_module(module_name) or id(weight) in tied:
            continue
        seen.add(id(weight))
        name = f"{module_name}.weight" if module_name else "weight"
        targets.append(Target(name, module_name, weight, 1 if is_conv1d else 0))
    return targets


def is_fused_experts(name: str, shape: Sequence[int]) -> bool:
    """Whether tensor ``name`` is a fused-experts weight: 3-D, of a module named ``experts``."""
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    return len(shape) == 3 and owner.rsplit(".", 1)[-1] == EXPERTS_MODULE


def _expert_targets(module_name: str, module: nn.Module, seen: set[int]) -> list[Target]:
    """The 3-D floating parameters of an experts module: each expert's matrix is pruned as a
    matrix of its own. transformers marks a module storing them ``(experts, in, out)`` with
    ``is_transposed``."""
    out_dim = 2 if getattr(module, "is_transposed", False) else 1
    found = []
    for param_name, weight in module.named_parameters(recurse=False):
        name = f"{module_name}.{param_name}"
        if weight.is_floating_point() and is_fused_experts(name, weight.shape) and id(weight) not in seen:
            seen.add(id(weight))
            found.append(Target(name, module_name, weight, out_dim, experts=weight.shape[0]))
    return found


def expert_slice_name(name: str, expert: int) -> str:
    """The name of expert ``expert``'s matrix of fused-experts weight ``name``."""
    return f"{name}[{expert}]"


def expert_of(name: str) -> tuple[str, int] | None:
    """``(fused weight name, expert)`` of a name made by :func:`expert_slice_name`, else None."""
    if not name.endswith("]") or "[" not in name:
        return None
    weight, _, index = name[:-1].rpartition("[")
    return (weight, int(index)) if index.isdigit() else None


def split_experts(targets: Sequence[Target]) -> list[Target]:
    """Every fused-experts target as one 2-D target per expert (``weight[e]``, named by
    :func:`expert_slice_name`, output dim shifted down by one); other targets as they are.
    Pruning the slices is pruning each expert as its own matrix."""
    out = []
    for t in targets:
        if not t.experts:
            out.append(t)
            continue
        for e in range(t.experts):
            out.append(Target(expert_slice_name(t.name, e), t.module_name, t.weight[e], t.out_dim - 1))
    return out


def join_experts(targets: Sequence[Target], per_slice: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_experts` for results keyed by name (masks, scores): the slices of
    each fused-experts target stacked back into one tensor under its parameter name."""
    out = {}
    for t in targets:
        if not t.experts:
            if t.name in per_slice:
                out[t.name] = per_slice[t.name]
            continue
        names = [expert_slice_name(t.name, e) for e in range(t.experts)]
        if all(n in per_slice for n in names):
            out[t.name] = torch.stack([per_slice[n] for n in names])
    return out


def state_dict_targets(state_dict: Mapping[str, torch.Tensor]) -> list[Target]:
    """Default targets of a bare state dict: floating ``*weight`` tensors with ≥ 2 dims
    whose names do not mark them as embeddings, norms or the LM head."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    targets = []
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is {type(tensor).__name__}; expected a tensor")
        if is_default_target(name, tuple(tensor.shape), tensor.dtype):
            targets.append(Target(name, _module_of(name), tensor, 0))
    return targets


def _is_dense_module(module_name: str) -> bool:
    """Heads and poolers stay dense by default: any path component named in DENSE_MODULES."""
    return any(part in DENSE_MODULES for part in module_name.split("."))


def warn_overpruned(pruned: Mapping[str, int], numel: Mapping[str, int], where: str = "") -> list[str]:
    """Warn (UserWarning) naming the tensors a global threshold left above OVERPRUNED
    sparsity; returns their names."""
    heavy = [n for n, count in pruned.items() if numel.get(n) and count / numel[n] > OVERPRUNED]
    if heavy:
        shown = ", ".join(f"{n} ({pruned[n] / numel[n]:.2%})" for n in heavy[:5])
        more = f" and {len(heavy) - 5} more" if len(heavy) > 5 else ""
        warnings.warn(
            f"the global threshold{where} prunes {len(heavy)} tensor(s) above {OVERPRUNED:.0%}: {shown}{more}; their "
            "weights are small next to the others. Exclude them (exclude=/--exclude) or use scope='layer'.",
            UserWarning,
            stacklevel=3,
        )
    return heavy


def _module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def is_default_target(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether a named tensor of a checkpoint is pruned by default."""
    lowered = name.lower()
    return (
        len(shape) >= 2
        and dtype.is_floating_point
        and name.endswith("weight")
        and not any(word in lowered for word in _DENSE_BY_NAME)
        and not _is_dense_module(_module_of(name))
    )


def described_targets(names: list[str], shape_of, dtype_of, embeddings: Collection[str] = ()) -> list[Target]:
    """Default targets of a checkpoint known only by names, shapes and dtypes.

    ``embeddings`` are weight names known to belong to embeddings (see
    :func:`config_embedding_names`): they stay dense whatever they are called (GPT-2's
    ``wte`` / ``wpe``). A name matches one when either ends with the other at a ``.``
    boundary, so a checkpoint saved without the model's prefix (``wte.weight``) matches too.
    """
    return [Target(n, _module_of(n), None, 0) for n in names
            if is_default_target(n, shape_of(n), dtype_of(n)) and not _is_embedding(n, embeddings)]


def _is_embedding(name: str, embeddings: Collection[str]) -> bool:
    return any(name == e or name.endswith("." + e) or e.endswith("." + name) for e in embeddings)


def config_embedding_names(checkpoint: Union[str, os.PathLike]) -> tuple[str, ...]:
    """Weight names of the ``nn.Embedding`` modules of the model that the ``config.json``
    beside ``checkpoint`` (a folder, or a file in one) describes, built on the meta device.

    Empty when there is no ``config.json``, transformers is not installed, or it cannot
    build a model from that config: the name rule of :func:`is_default_target` alone then
    decides. Costs transformers' import; no weight is allocated.
    """
    folder = Path(checkpoint)
    folder = folder if folder.is_dir() else folder.parent
    if not (folder / "config.json").is_file():
        return ()
    try:
        import transformers
    except ImportError:
        return ()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):  # not a transformers config
        return ()
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
        except (ValueError, KeyError, TypeError):  # no such head (or model) for this config
            continue
        return tuple(f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Embedding))
    return ()


def _matches(target: Target, pattern: str) -> bool:
    return (
        pattern in (target.name, target.module_name)
        or fnmatch.fnmatchcase(target.name, pattern)
        or fnmatch.fnmatchcase(target.module_name, pattern)
    )


def _as_pattern_list(value: Union[str, Sequence[str], None], arg: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{arg} must be a glob string or a list of them, got {value!r}")


def filter_targets(
    targets: list[Target],
    include: Union[str, Sequence[str], None] = None,
    exclude: Union[str, Sequence[str], None] = None,
    *,
    require_matches: bool = True,
) -> list[Target]:
    """Keep targets matching any ``include`` glob (all when None) and no ``exclude`` glob.

    Globs match the parameter name or the module name (``"*.attention.*"``, ``"lm_head"``).
    An ``include`` glob matching none of ``targets`` is refused unless ``require_matches``
    is False (``targets`` is then a part of the model, checked whole elsewhere).
    """
    inc = _as_pattern_list(include, "include")
    exc = _as_pattern_list(exclude, "exclude")
    for p in inc if require_matches else []:
        if not any(_matches(t, p) for t in targets):
            raise ValueError(f"include pattern {p!r} matches no prunable weight")
    kept = [t for t in targets if (not inc or any(_matches(t, p) for p in inc))]
    return [t for t in kept if not any(_matches(t, p) for p in exc)]


def resolve_sparsity(spec: SparsitySpec, targets: list[Target]) -> dict[str, float]:
    """Sparsity for each target given a float or a mapping of names/globs to floats.

    In a mapping, an exact parameter or module name wins over a glob; among globs the first
    that matches wins. Targets matched by no key are left out (they stay dense); a key that
    matches no target is an error.
    """
    if not isinstance(spec, Mapping):
        value = check_sparsity(spec)
        return {t.name: value for t in targets}
    if not spec:
        raise ValueError("sparsity mapping is empty; give a float or {name or glob: float}")
    values = {key: check_sparsity(v, f"sparsity[{key!r}]") for key, v in spec.items()}
    used: set[str] = set()
    result: dict[str, float] = {}
    for t in targets:
        exact = next((k for k in values if k in (t.name, t.module_name)), None)
        key = exact or next((k for k in values if _matches(t, k)), None)
        if key is not None:
            used.add(key)
            result[t.name] = values[key]
    unused = [k for k in values if k not in used]
    if unused:
        raise ValueError(
            f"sparsity keys {unused} match no prunable weight; keys are parameter names, "
            f"module names or globs (e.g. {targets[0].module_name!r})" if targets else
            f"sparsity keys {unused} match no prunable weight (the model has none)"
        )
    return result


def normalise_mask_keys(
    masks: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor], arg: str = "masks"
) -> dict[str, torch.Tensor]:
    """Map mask keys to parameter names (``"layer1"`` → ``"layer1.weight"``) and check shapes.

    Raises ValueError naming every key that matches no parameter or has the wrong shape.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"{arg} must be a dict of parameter name -> bool tensor, got {type(masks).__name__}")
    resolved: dict[str, torch.Tensor] = {}
    unknown, bad_shape = [], []
    for key, mask in masks.items():
        name = key if key in parameters else f"{key}.weight"
        if name not in parameters:
            unknown.append(key)
            continue
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{arg}[{key!r}] is {type(mask).__name__}; expected a tensor")
        if tuple(mask.shape) != tuple(parameters[name].shape):
            bad_shape.append(f"{key}: mask {tuple(mask.shape)} vs parameter {tuple(parameters[name].shape)}")
            continue
        resolved[name] = mask
    if unknown:
        sample = ", ".join(list(parameters)[:3])
        raise ValueError(f"{arg} keys {unknown} match no parameter (parameter names look like: {sample})")
    if bad_shape:
        raise ValueError(f"{arg} shapes differ from their parameters: {'; '.join(bad_shape)}")
    return resolved


def is_peft_model(model: nn.Module) -> bool:
    """True when PEFT has injected its adapters into ``model`` (a PeftModel or its LoRA layers)."""
    return any(type(m).__module__.split(".")[0] == "peft" for m in model.modules())


def refuse_peft_model(model: nn.Module, what: str) -> None:
    """Raise a ValueError that says what to do when ``model`` is wrapped by PEFT."""
    if is_peft_model(model):
        raise ValueError(
            f"{what} got a model wrapped by PEFT; its adapter weights would be treated as model weights. "
            "Compute masks on the base model before get_peft_model (or on peft_model.merge_and_unload()), "
            "and start sparse LoRA from a PEFT adapter with "
            "sparselora.pruning.sparse_lora.from_peft_adapter(base_model, adapter_dir_or_peft_model, masks)"
        )
