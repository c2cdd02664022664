"""The pruning API: importance scores, mask generation, mask operations and sparse LoRA."""

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
from .sparse_lora import (
    SparseLoRAConfig,
    SparseLoRALinear,
    apply_sparse_lora,
    merge_all_lora_weights,
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
    "SparseLoRAConfig",
    "SparseLoRALinear",
    "apply_sparse_lora",
    "merge_all_lora_weights",
    "validate_sparsity_preserved",
]
