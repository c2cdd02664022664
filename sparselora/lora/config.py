"""Settings of sparse LoRA (one dataclass, validated on construction) and the LoRA argument rule.

:func:`check_lora_args` is the one check of ``r``, ``alpha`` and ``dropout``: the config here,
the Cerebras trainer configs and the ``SparseLora`` ModelZoo callback all call it, so a bad
value is refused with the same message wherever it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..rules import check_bool, check_choice, check_dropout, check_finite, check_positive_int, check_sparsity

__all__ = ["SparseLoRAConfig", "SPARSITY_MODES", "DEFAULT_TARGET_MODULES", "check_lora_args"]

SPARSITY_MODES = ("sparse_to_dense", "sparse_to_sparse")
ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# class names: transformers' Conv1D is a Linear stored transposed, adapted alike
DEFAULT_TARGET_MODULES = ("Linear", "Conv1D")


def check_lora_args(r: object, alpha: object, dropout: object) -> tuple[int, float, float]:
    """``(r, alpha, dropout)`` checked: an int rank >= 1, a finite alpha, a dropout in [0, 1).

    Raises TypeError (wrong type, ``True`` included) or ValueError (out of range) with the
    messages of :mod:`sparselora.rules`.
    """
    return check_positive_int(r, "r"), check_finite(alpha, "alpha"), check_dropout(dropout, "dropout")


@dataclass
class SparseLoRAConfig:
    """Settings of sparse LoRA.

    Args:
        r: adapter rank (> 0).
        alpha: LoRA alpha; the adapter output is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter input, in [0, 1).
        target_modules: module class names (``"Linear"``) or name suffixes (``"q_proj"``); the
            default adapts every ``nn.Linear`` and every transformers ``Conv1D`` (GPT-2's
            projections), the LM head and embedding-tied layers excepted.
        sparsity_mode: ``"sparse_to_dense"`` or ``"sparse_to_sparse"``.
        initial_sparsity: sparsity of the magnitude masks made when ``apply_sparse_lora``
            is given no masks.
        preserve_sparsity_on_merge: multiply merged weights by the mask.
        maintain_sparsity: keep the adapter delta masked during training; follows the mode
            when None (on for sparse_to_sparse, off for sparse_to_dense).
        adapter_dtype: dtype of ``lora_A``/``lora_B`` (``torch.float32`` keeps fp32 adapters
            on a bf16/fp16 base, as PEFT's autocast_adapter_dtype does); None: the base's dtype.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Sequence[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    sparsity_mode: str = "sparse_to_dense"
    initial_sparsity: float = 0.5
    preserve_sparsity_on_merge: bool = True
    maintain_sparsity: Optional[bool] = None
    adapter_dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        check_lora_args(self.r, self.alpha, self.dropout)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules={self.target_modules!r} must be a non-empty list of names")
        self.target_modules = list(self.target_modules)
        check_choice(self.sparsity_mode, "sparsity_mode", SPARSITY_MODES)
        self.initial_sparsity = check_sparsity(self.initial_sparsity, "initial_sparsity")
        check_bool(self.preserve_sparsity_on_merge, "preserve_sparsity_on_merge")
        implied = self.sparsity_mode == "sparse_to_sparse"
        if self.maintain_sparsity is None:
            self.maintain_sparsity = implied
        elif check_bool(self.maintain_sparsity, "maintain_sparsity") is not implied:
            raise ValueError(
                f"maintain_sparsity={self.maintain_sparsity!r} contradicts sparsity_mode={self.sparsity_mode!r}; "
                "sparse_to_sparse keeps the adapter delta masked during training, sparse_to_dense does not "
                "(leave maintain_sparsity=None to follow the mode)"
            )

        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(
                f"adapter_dtype={self.adapter_dtype!r} is not supported; accepted: None (the base's dtype), "
                "torch.float32, torch.float16, torch.bfloat16"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
