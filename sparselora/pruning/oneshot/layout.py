"""Where a model's in-memory tensors sit in its checkpoint, read from transformers' own mapping.

transformers (5.x) converts some checkpoints as it loads them: a mixture-of-experts block
stored expert by expert (``mlp.experts.3.gate_proj.weight``; Mixtral's
``block_sparse_moe.experts.3.w1.weight``) becomes one fused 3-D parameter in memory
(``mlp.experts.gate_up_proj``), and some modules are renamed. It says how in its checkpoint
conversion mapping (``transformers.conversion_mapping``): renamings, and converters made of
operations. :class:`StoredLayout` reads that mapping for the model type and runs it both ways
for the forms used by these checkpoints (literal renamings; experts stacked along dim 0, then
optionally concatenated along dim 1), so that pruning from disk reads each block in the stored
layout and writes the output (weights and masks) in it again. A mapping it cannot run is an
error naming it, never a silent misreading.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["StoredLayout"]

_REGEX_SIGNS = set("()[]{}?*+^$|\\")


class StoredLayout:
    """How in-memory tensor names map onto the stored tensors of one checkpoint.

    ``model_type`` is the config's; ``stored`` the checkpoint's tensor names; ``read(name)``
    reads one stored tensor. Names outside any conversion map to themselves.
    """

    def __init__(self, model_type: str | None, stored: Iterable[str], read: Callable[[str], torch.Tensor]) -> None:
        self.stored = set(stored)
        self._read = read
        self.renames: list[tuple[str, str]] = []  # (stored text, in-memory text)
        self.converters: list[tuple[list[str], str, bool]] = []  # (stored patterns, in-memory pattern, concatenated)
        for rule in _mapping(model_type):
            kind = type(rule).__name__
            sources, targets = _patterns(rule, "source_patterns"), _patterns(rule, "target_patterns")
            if kind == "WeightRenaming" and len(sources) == 1 and len(targets) == 1 and _literal(sources + targets):
                self.renames.append((sources[0], targets[0]))
            elif kind == "WeightConverter" and len(targets) == 1:
                operations = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(rule, "operations", [])]
                if operations == [("MergeModulelist", 0)]:
                    self.converters.append((sources, targets[0], False))
                elif operations == [("MergeModulelist", 0), ("Concatenate", 1)]:
                    self.converters.append((sources, targets[0], True))
                else:
                    self._unsupported(model_type, rule)
            else:
                self._unsupported(model_type, rule)

    @staticmethod
    def _unsupported(model_type: str | None, rule: object) -> None:
        raise ValueError(f"the checkpoint layout of model_type={model_type!r} uses a conversion sparselora cannot "
                         f"run both ways ({rule!r}); pruning it from disk is not supported yet")

    def to_stored(self, name: str) -> str:
        """The stored name of a plain (unconverted) in-memory tensor."""
        for stored, memory in self.renames:
            name = name.replace(memory, stored)
        return name

    def _parts(self, name: str) -> tuple[list[list[str]], bool] | None:
        """For a converted tensor: per stored pattern, its stored names expert by expert, and
        whether the patterns are concatenated."""
        for sources, target, concatenated in self.converters:
            bare = target.lstrip(".")
            if not (name == bare or name.endswith("." + bare)):
                continue
            prefix = name[: len(name) - len(bare)]
            parts = []
            for pattern in sources:
                names = []
                while (stored := self.to_stored(prefix + pattern.lstrip(".").replace("*", str(len(names))))) \
                        in self.stored:
                    names.append(stored)
                parts.append(names)
            if parts and parts[0] and all(len(p) == len(parts[0]) for p in parts):
                return parts, concatenated
        return None

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds in-memory tensor ``name`` (directly or converted)."""
        return self._parts(name) is not None or self.to_stored(name) in self.stored

    def read(self, name: str) -> torch.Tensor:
        """In-memory tensor ``name``, assembled from the stored tensors as transformers loads it."""
        found = self._parts(name)
        if found is None:
            return self._read(self.to_stored(name))
        parts, concatenated = found
        stacked = [torch.stack([self._read(n) for n in names]) for names in parts]
        return torch.cat(stacked, dim=1) if concatenated else stacked[0]

    def split(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``(stored name, tensor)`` of in-memory tensor ``name`` (views of ``tensor``): the
        inverse of :meth:`read`, for writing in the stored layout. Works on meta tensors."""
        found = self._parts(name)
        if found is None:
            return [(self.to_stored(name), tensor)]
        parts, concatenated = found
        pieces = tensor.chunk(len(parts), dim=1) if concatenated else [tensor]
        out = []
        for names, piece in zip(parts, pieces):
            out.extend(zip(names, piece.unbind(0)))
        return out


def _mapping(model_type: str | None) -> list:
    if not model_type:
        return []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # an older transformers converts nothing
        return []
    return list(get_checkpoint_conversion_mapping(model_type) or [])


def _patterns(rule: object, attribute: str) -> list[str]:
    value = getattr(rule, attribute, None)
    return [value] if isinstance(value, str) else list(value or [])


def _literal(patterns: list[str]) -> bool:
    return all(isinstance(p, str) and not (set(p) & _REGEX_SIGNS) for p in patterns)
