"""Settings of sparse LoRA (one dataclass, validated on construction)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..rules import check_sparsity

__all__ = ["SparseLoRAConfig", "SPARSITY_MODES"]

SPARSITY_MODES = ("sparse_to_dense", "sparse_to_sparse")
ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class SparseLoRAConfig:
    """Settings of sparse LoRA.

    Args:
        r: adapter rank (> 0).
        alpha: LoRA alpha; the adapter output is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter input, in [0, 1).
        target_modules: module class names (``"Linear"``) or name suffixes (``"q_proj"``).
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
    target_modules: Sequence[str] = field(default_factory=lambda: ["Linear"])
    sparsity_mode: str = "sparse_to_dense"
    initial_sparsity: float = 0.5
    preserve_sparsity_on_merge: bool = True
    maintain_sparsity: Optional[bool] = None
    adapter_dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be an int > 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha={self.alpha!r} must be a finite number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be a float in [0, 1)")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules={self.target_modules!r} must be a non-empty list of names")
        self.target_modules = list(self.target_modules)
        if self.sparsity_mode not in SPARSITY_MODES:
            raise ValueError(f"sparsity_mode={self.sparsity_mode!r} is unknown; accepted: {', '.join(SPARSITY_MODES)}")
        self.initial_sparsity = check_sparsity(self.initial_sparsity, "initial_sparsity")
        if not isinstance(self.preserve_sparsity_on_merge, bool):
            raise TypeError(f"preserve_sparsity_on_merge={self.preserve_sparsity_on_merge!r} must be a bool")
        implied = self.sparsity_mode == "sparse_to_sparse"
        if self.maintain_sparsity is None:
            self.maintain_sparsity = implied
        elif self.maintain_sparsity is not implied:
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
