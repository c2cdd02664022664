"""Sparse LoRA: LoRA fine-tuning that keeps a pruned model sparse.

``config`` holds the settings and the LoRA argument rule, ``layer`` the adapter layer,
``model`` what acts on a whole model (apply, merge, validate, broadcast masks, count
parameters) and ``peft`` the conversion to and from PEFT LoRA adapters. This package sits
above the pruning core (it takes masks from it) and below ``sparselora.cerebras``.
"""

from .config import SPARSITY_MODES, SparseLoRAConfig, check_lora_args
from .layer import SparseLoRALinear
from . import model
from .model import *  # noqa: F401,F403 - apply / merge / validate, listed in model.__all__
from .peft import export_peft_adapter, from_peft_adapter

__all__ = ["SparseLoRAConfig", "SparseLoRALinear", *model.__all__, "export_peft_adapter", "from_peft_adapter",
           "check_lora_args", "SPARSITY_MODES"]
