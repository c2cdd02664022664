"""Sparse LoRA: LoRA fine-tuning that keeps a pruned model sparse.

``config`` holds the settings and the LoRA argument rule, ``layer`` the adapter layer,
``model`` what acts on a whole model (apply, merge, validate, broadcast masks, count
parameters) and ``peft`` the conversion to and from PEFT LoRA adapters. This package sits
above the pruning core (it takes masks from it) and below ``sparselora.cerebras``.
"""

from .config import SPARSITY_MODES, SparseLoRAConfig, check_lora_args
from .layer import SparseLoRALinear
from .model import (
    apply_sparse_lora,
    broadcast_masks,
    merge_all_lora_weights,
    merge_report,
    print_trainable_parameters,
    sparse_lora_layers,
    trainable_parameters,
    validate_sparsity_preserved,
)
from .peft import export_peft_adapter, from_peft_adapter

__all__ = [
    "SparseLoRAConfig",
    "SparseLoRALinear",
    "apply_sparse_lora",
    "merge_all_lora_weights",
    "validate_sparsity_preserved",
    "merge_report",
    "broadcast_masks",
    "sparse_lora_layers",
    "trainable_parameters",
    "print_trainable_parameters",
    "export_peft_adapter",
    "from_peft_adapter",
    "check_lora_args",
    "SPARSITY_MODES",
]
