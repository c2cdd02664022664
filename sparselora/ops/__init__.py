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
from . import api
from .api import *  # noqa: F401,F403 - the checked public functions, listed in api.__all__

__all__ = ["PruneThreshold", "BackendUnavailableError", *api.__all__, "last_backend", "registered_backends"]
