"""The pruning API: importance scores, mask generation, one-shot LLM pruning, mask operations, and
sparse LoRA (handed on from :mod:`sparselora.lora` through the seed's path ``pruning.sparse_lora``)."""

from .importance import (
    collect_activation_norms,
    collect_taylor_importance,
    compute_layer_importance,
    magnitude_importance,
    taylor_importance,
    wanda_importance,
)
from .mask_generator import (
    MaskGenerator,
    compute_masks_for_state_dict,
    compute_nm_mask,
    compute_random_mask,
    compute_structured_mask,
    compute_unstructured_mask,
    prune_gradually,
    sparsity_schedule,
)
from .mask_ops import (
    apply_masks_to_model,
    compute_sparsity_stats,
    load_mask,
    plot_sparsity_histogram,
    save_mask,
    validate_mask,
    validate_nm_mask,
)
from .calibration import calibration_batches
from .llm_checkpoint import prune_checkpoint
from .owl import owl_sparsities
from .sequential import prune_model
from .sparsegpt import sparsegpt_prune_
from .sparse_lora import (
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
    "magnitude_importance",
    "taylor_importance",
    "wanda_importance",
    "collect_activation_norms",
    "collect_taylor_importance",
    "compute_layer_importance",
    "MaskGenerator",
    "compute_unstructured_mask",
    "compute_structured_mask",
    "compute_random_mask",
    "compute_nm_mask",
    "compute_masks_for_state_dict",
    "sparsity_schedule",
    "prune_gradually",
    "validate_mask",
    "validate_nm_mask",
    "save_mask",
    "load_mask",
    "compute_sparsity_stats",
    "plot_sparsity_histogram",
    "apply_masks_to_model",
    "prune_model",
    "prune_checkpoint",
    "sparsegpt_prune_",
    "owl_sparsities",
    "calibration_batches",
    "SparseLoRAConfig",
    "SparseLoRALinear",
    "apply_sparse_lora",
    "merge_all_lora_weights",
    "validate_sparsity_preserved",
    "merge_report",
    "broadcast_masks",
    "export_peft_adapter",
    "from_peft_adapter",
    "trainable_parameters",
    "print_trainable_parameters",
]
