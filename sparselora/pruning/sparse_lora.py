"""The seed's import path of sparse LoRA; the code lives in :mod:`sparselora.lora`.

LoRA fine-tuning that keeps a pruned model sparse, in two modes: ``sparse_to_dense``
(``W⊙M + s·BA``) and ``sparse_to_sparse`` (``((W + s·BA) ⊙ M) x``, exactly sparse at every
step and after merging). See :mod:`sparselora.lora.model` and :mod:`sparselora.lora.peft`.
"""

from ..lora import *  # noqa: F401,F403 - the seed's path re-exports the whole package
from ..lora import __all__  # noqa: F401
