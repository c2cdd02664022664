"""Cerebras CS-3 backend: no kernels; ModelZoo 2.10 configs, a mask callback, a launcher.

Imports and works without any Cerebras package; uses ModelZoo's classes when present.
"""

from .callback import MODELZOO_AVAILABLE, SparseMaskCallback
from .config import create_sparse_config, load_config, save_config
from .schema import check_trainer_config
from .sparse_lora_callback import SparseLora, merge_state_dict

__all__ = ["SparseMaskCallback", "SparseLora", "merge_state_dict", "create_sparse_config", "save_config", "load_config",
           "check_trainer_config", "MODELZOO_AVAILABLE"]
