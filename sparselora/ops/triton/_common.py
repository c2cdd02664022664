"""When the Triton backend may take a call, and what every kernel launch shares."""

import contextlib
import os

import torch

from ..masks import as_bool_keep, check_keep_mask

__all__ = ["triton_reason", "TRITON_PRIORITY", "DTYPES", "round_for", "device_guard", "interpreting", "keep_bytes"]

TRITON_PRIORITY = 20
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None

    @triton.jit
    def round_for(x, dtype: tl.constexpr):
        """fp32 ``x`` rounded to nearest-even in ``dtype``, as a value of ``dtype``; NaN stays NaN.

        bf16 is rounded on the bits first (Triton's interpreter truncates fp32 -> bf16); a NaN
        becomes the canonical quiet NaN, since rounding its bits could carry into inf or -0.
        """
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            bits = tl.where(x != x, 0x7FC00000, rounded)
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

except ImportError as exc:
    _IMPORT_ERROR = f"triton is not installed ({exc})"


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_reason(*tensors: torch.Tensor | None) -> str | None:
    """None when every tensor can run here: CUDA tensors on one device, or CPU tensors under
    Triton's interpreter (``TRITON_INTERPRET=1``) when ``SPARSELORA_BACKEND=triton`` asks for it."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    interpret = interpreting() and os.environ.get("SPARSELORA_BACKEND") == "triton"
    devices = set()
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not interpret:
            return "CPU tensors run on Triton only under TRITON_INTERPRET=1 with SPARSELORA_BACKEND=triton"
        if t.device.type not in ("cpu", "cuda"):
            return f"tensor on {t.device}; the Triton backend runs CUDA tensors"
        if t.is_floating_point() and t.dtype not in DTYPES:
            return f"dtype {t.dtype}; the Triton backend takes float32, float16 and bfloat16"
        devices.add(t.device)
    if len(devices) > 1:
        return f"tensors on several devices ({', '.join(sorted(map(str, devices)))})"
    return None


def device_guard(tensor: torch.Tensor):
    """Launch on ``tensor``'s GPU, not on whichever device happens to be current."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def keep_bytes(mask: torch.Tensor, shape) -> torch.Tensor:
    """A keep-mask (bool, or packed uint8 bits) as contiguous uint8 bytes, one per weight.

    Anything else is an error: a float mask would be read as bytes and silently mean
    something else.
    """
    check_keep_mask(mask, tuple(shape))
    return as_bool_keep(mask, tuple(shape)).contiguous().view(torch.uint8)
