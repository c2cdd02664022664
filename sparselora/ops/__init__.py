"""The hot operations, each defined once; this package face only registers and re-exports.

:mod:`~sparselora.ops.api` holds the public functions, which check their arguments and call
the ops; :mod:`~sparselora.ops.library` defines each op once as a PyTorch custom operator;
:mod:`~sparselora.ops._dispatch` hands each call to a backend (:mod:`~sparselora.ops.cpp` for
CPU tensors, :mod:`~sparselora.ops.triton` for CUDA tensors when built,
:mod:`~sparselora.ops.reference` otherwise). :mod:`~sparselora.ops.keys` is the one
float-to-key codec (and the exact cut from key histograms), :mod:`~sparselora.ops.masks` the
one bit packing of keep-masks. The pruning API calls only these.
"""

from __future__ import annotations

from . import cpp, library, reference  # noqa: F401  - importing registers the backends and custom ops
from . import triton as _triton_backend  # noqa: F401
from . import keys, masks  # noqa: F401  - public modules: the key codec and the bit packing
from ._dispatch import BackendUnavailableError, last_backend, registered_backends
from ._types import PruneThreshold
from .api import (
    apply_mask_,
    key_histogram,
    masked_lora_linear,
    masked_lora_weight,
    merge_lora_,
    nm_prune_mask,
    prune_count,
    prune_threshold,
    row_prune_mask,
    select_prune_mask,
    streaming_threshold,
    write_prune_mask,
)

__all__ = [
    "PruneThreshold",
    "BackendUnavailableError",
    "prune_count",
    "prune_threshold",
    "write_prune_mask",
    "select_prune_mask",
    "nm_prune_mask",
    "row_prune_mask",
    "key_histogram",
    "streaming_threshold",
    "apply_mask_",
    "merge_lora_",
    "masked_lora_weight",
    "masked_lora_linear",
    "last_backend",
    "registered_backends",
]
