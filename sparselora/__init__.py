"""sparselora: pruning masks for large PyTorch models and LoRA fine-tuning that keeps them sparse."""

from .pruning import *  # noqa: F401,F403 - the public API, listed in pruning.__all__
from .pruning import __all__ as _pruning_all

__version__ = "0.1.0"

_CEREBRAS = ("SparseMaskCallback", "create_sparse_config")
__all__ = list(_pruning_all) + [*_CEREBRAS, "__version__"]


def __getattr__(name: str):
    # the Cerebras names load on first use: importing ModelZoo (when installed) takes seconds
    if name in _CEREBRAS:
        from .utils import cerebras_sparse_callback

        return getattr(cerebras_sparse_callback, name)
    raise AttributeError(f"module 'sparselora' has no attribute {name!r}")
