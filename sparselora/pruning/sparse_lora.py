"""The seed's import path of sparse LoRA; the code lives in :mod:`sparselora.lora`.

LoRA fine-tuning that keeps a pruned model sparse, in two modes: ``sparse_to_dense``
(``W⊙M + s·BA``) and ``sparse_to_sparse`` (``((W + s·BA) ⊙ M) x``, exactly sparse at every
step and after merging). See :mod:`sparselora.lora.model` and :mod:`sparselora.lora.peft`.
"""

from ..lora import (
    SPARSITY_MODES,
    SparseLoRAConfig,
    SparseLoRALinear,
    apply_sparse_lora,
    broadcast_masks,
    export_peft_adapter,
    from_peft_adapter,
    merge_all_lora_weights,
    merge_report,
    print_trainable_parameters,
    trainable_parameters,
    validate_sparsity_preserved,
)

__all__ = [
    "SparseLoRAConfig",
    "SparseLoRALinear",
    "apply_sparse_lora",
    "merge_all_lora_weights",
    "validate_sparsity_preserved",
    "merge_report",
    "broadcast_masks",
    "trainable_parameters",
    "print_trainable_parameters",
    "export_peft_adapter",
    "from_peft_adapter",
    "SPARSITY_MODES",
]
