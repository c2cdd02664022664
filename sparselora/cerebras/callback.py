"""``SparseMaskCallback``: keeps pruned weights at zero inside a ModelZoo trainer.

It subclasses ModelZoo's ``Callback`` when ``cerebras.modelzoo`` is importable (so YAML can
name it), and a local base with the same hook names and signatures otherwise. Hooks that
run inside the traced step use tensor ops only.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Union

import torch

from ..pruning.mask_ops import load_mask
from ..rules import check_bool
from .names import match_parameter

__all__ = ["SparseMaskCallback", "ModelZooCallback", "MODELZOO_AVAILABLE"]

log = logging.getLogger("sparselora.cerebras")

try:  # the real base class when ModelZoo is installed
    from cerebras.modelzoo.trainer.callbacks import Callback as ModelZooCallback

    MODELZOO_AVAILABLE = True
except ImportError:
    MODELZOO_AVAILABLE = False

    class ModelZooCallback:  # type: ignore[no-redef]
        """Local stand-in with ModelZoo 2.10's hook names and signatures (all no-ops)."""

        def pre_setup(self, trainer): ...
        def setup(self, trainer): ...
        def post_setup(self, trainer): ...
        def on_fit_start(self, trainer, train_dataloader, val_dataloader, loop): ...
        def on_fit_end(self, trainer, loop): ...
        def on_train_start(self, trainer, model, train_dataloader, loop, loop_idx): ...
        def on_train_end(self, trainer, model, loop, loop_idx): ...
        def on_train_batch_start(self, trainer, model, batch, batch_idx): ...
        def on_train_batch_end(self, trainer, model, outputs, batch, batch_idx): ...
        def on_before_optimizer_step(self, trainer, model, optimizer): ...
        def on_after_optimizer_step(self, trainer, model, optimizer): ...
        def on_save_checkpoint(self, trainer, state_dict): ...
        def postprocess_checkpoint(self, trainer, state_dict): ...
        def preprocess_checkpoint(self, trainer, state_dict): ...
        def on_load_checkpoint(self, trainer, state_dict): ...
        def finalize(self): ...


PathLike = Union[str, os.PathLike]


class SparseMaskCallback(ModelZooCallback):
    """Applies pruning masks to a model trained by ModelZoo's trainer.

    Args:
        mask_path: masks saved by ``save_mask`` or ``sparselora masks`` (any format, packed
            included).
        apply_every_step: re-apply the masks after every optimizer step (sparse_to_sparse;
            also for full fine-tuning without ModelZoo's sparsity block).
        name_map: optional renaming of mask names (Hugging Face) to the model's parameter
            names (ModelZoo).
        strict: every mask must match a parameter (else a ValueError lists mismatches).
        from_zeros: take each mask from its weight's non-zeros as loaded (ModelZoo's
            ``from_zeros``); the mask file then names the weights and gives the sparsity
            to check. For masks made from Hugging Face checkpoints, whose q/k rows
            ``cszoo checkpoint convert`` reorders.

    A mask name matches the parameter of that name or the one ending in ``.name`` (the
    trainer's model adds a ``model.`` prefix).
    """

    def __init__(self, mask_path: str, apply_every_step: bool = False, name_map: dict | None = None,
                 strict: bool = True, from_zeros: bool = False) -> None:
        if not isinstance(mask_path, (str, os.PathLike)):
            raise TypeError(f"mask_path must be a path, got {type(mask_path).__name__}")
        check_bool(apply_every_step, "apply_every_step")
        check_bool(strict, "strict")
        check_bool(from_zeros, "from_zeros")
        if name_map is not None and not isinstance(name_map, Mapping):
            raise TypeError(f"name_map must be a dict of mask name -> parameter name, got {type(name_map).__name__}")
        self.mask_path = str(mask_path)
        self.apply_every_step = apply_every_step
        self.name_map = dict(name_map or {})
        self.strict = strict
        self.from_zeros = from_zeros
        self._keep_by_name: dict[str, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] | None = None
        self._bound: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    # --- loading and binding ---------------------------------------------------------

    def _load(self) -> dict[str, torch.Tensor]:
        if self._masks is None:
            masks, _ = load_mask(self.mask_path)
            self._masks = {self.name_map.get(n, n): m for n, m in masks.items()}
        return self._masks

    def bind(self, model: torch.nn.Module) -> None:
        """Match masks to ``model``'s parameters and zero the pruned weights."""
        masks = self._load()
        params = dict(model.named_parameters())
        found = {n: match_parameter(n, params) or match_parameter(f"{n}.weight", params) for n in masks}
        missing = [n for n, p in found.items() if p is None]
        wrong = [n for n, p in found.items() if p is not None and tuple(params[p].shape) != tuple(masks[n].shape)]
        if (missing and self.strict) or wrong:
            sample = ", ".join(list(params)[:4])
            raise ValueError(
                f"SparseMaskCallback: masks that match no parameter: {missing[:10]}; shape mismatches: {wrong[:10]} "
                f"(model parameters look like: {sample}; pass name_map to rename)"
            )
        self._bound, self._keep_by_name = [], {}
        for name, mask in masks.items():
            if found[name] is None:
                continue
            param = params[found[name]]
            if self.from_zeros:
                keep = (param.detach() != 0).to(param.dtype)
                pruned, expected = int((keep == 0).sum()), int((~mask).sum())
                if pruned < expected:
                    log.warning("SparseMaskCallback: %s has %d zeros, its mask prunes %d (zeros not baked in?)",
                                found[name], pruned, expected)
            else:
                keep = mask.to(device=param.device, dtype=param.dtype)  # multiply: a plain tensor op
            self._bound.append((param, keep))
            self._keep_by_name[found[name]] = keep
        self.apply()
        log.info("SparseMaskCallback: %d masks bound, %s", len(self._bound), self.describe())

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights (tensor ops only: safe inside a traced step)."""
        for param, keep in self._bound:
            param.mul_(keep)

    def describe(self) -> str:
        total = sum(p.numel() for p, _ in self._bound)
        zeros = sum(int((p == 0).sum()) for p, _ in self._bound)
        return f"sparsity of masked weights {zeros / total:.2%}" if total else "no masked weights"

    # --- ModelZoo hooks --------------------------------------------------------------

    def setup(self, trainer) -> None:
        self._load()

    def on_train_start(self, trainer, model, train_dataloader, loop, loop_idx) -> None:
        self.bind(model)
        log.info("SparseMaskCallback at train start: %s", self.describe())

    def on_after_optimizer_step(self, trainer, model, optimizer) -> None:
        if self.apply_every_step:
            self.apply()

    def postprocess_checkpoint(self, trainer, state_dict) -> None:
        """Checkpoints it saves stay masked, whatever the optimizer did since the last step."""
        model_state = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else None
        if not isinstance(model_state, dict):
            return
        keys = [k for k, v in model_state.items() if isinstance(v, torch.Tensor)]
        if self._keep_by_name:  # bound at train start: the masks the step used
            pairs = [(match_parameter(name, keys), keep) for name, keep in self._keep_by_name.items()]
        else:
            pairs = [(match_parameter(n, keys) or match_parameter(f"{n}.weight", keys), m)
                     for n, m in (self._masks or {}).items()]
        for key, keep in pairs:
            if key is not None:
                model_state[key] = model_state[key] * keep.to(model_state[key].device, model_state[key].dtype)

    def on_train_end(self, trainer, model, loop, loop_idx) -> None:
        log.info("SparseMaskCallback at train end: %s", self.describe())
