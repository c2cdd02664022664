"""sparselora: pruning masks for large PyTorch models and LoRA fine-tuning that keeps them sparse."""

from .pruning import *  # noqa: F401,F403 - the public API, listed in pruning.__all__
from .pruning import __all__ as _pruning_all
from .utils.cerebras_sparse_callback import SparseMaskCallback, create_sparse_config

__version__ = "0.1.0"

__all__ = list(_pruning_all) + ["SparseMaskCallback", "create_sparse_config", "__version__"]
