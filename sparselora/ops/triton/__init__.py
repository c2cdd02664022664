"""The Triton backend: CUDA tensors (and CPU tensors under TRITON_INTERPRET=1 when
SPARSELORA_BACKEND=triton). Importing registers the kernels when Triton is installed."""

from ._common import triton_reason

__all__ = ["triton_reason", "available"]

try:
    from . import histogram, masked_lora, rows, select, weight  # noqa: F401 - registers the kernels

    available = True
except ImportError:  # triton missing: the other backends serve every call
    available = False
