"""The seed's import path of the Cerebras integration (see :mod:`sparselora.cerebras`)."""

from ..cerebras.callback import SparseMaskCallback
from ..cerebras.config import create_sparse_config, save_config

__all__ = ["SparseMaskCallback", "create_sparse_config", "save_config"]
