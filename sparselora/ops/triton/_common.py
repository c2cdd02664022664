"""When the Triton backend may take a call, and why not otherwise."""

import os

import torch

__all__ = ["triton_reason", "TRITON_PRIORITY", "DTYPES", "round_for"]

TRITON_PRIORITY = 20
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None

    @triton.jit
    def round_for(x, dtype: tl.constexpr):
        """fp32 ``x`` rounded to nearest-even in ``dtype``, as a value of ``dtype``.

        bf16 is rounded on the bits first: Triton's interpreter truncates fp32 -> bf16.
        """
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

except ImportError as exc:
    _IMPORT_ERROR = f"triton is not installed ({exc})"


def triton_reason(*tensors: torch.Tensor | None) -> str | None:
    """None when every tensor can run here: CUDA tensors, or CPU tensors under Triton's
    interpreter (``TRITON_INTERPRET=1``) when ``SPARSELORA_BACKEND=triton`` asks for it."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SPARSELORA_BACKEND") == "triton"
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not interpret:
            return "CPU tensors run on Triton only under TRITON_INTERPRET=1 with SPARSELORA_BACKEND=triton"
        if t.device.type not in ("cpu", "cuda"):
            return f"tensor on {t.device}; the Triton backend runs CUDA tensors"
        if t.is_floating_point() and t.dtype not in DTYPES:
            return f"dtype {t.dtype}; the Triton backend takes float32, float16 and bfloat16"
    return None
