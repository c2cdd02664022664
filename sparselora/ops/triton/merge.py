"""Fused merge-with-mask on Triton: ``W ← (W + s·B@A) ⊙ M`` tile by tile, in place."""

import torch
import triton
import triton.language as tl

from .._bits import as_bool_keep
from .._dispatch import register
from ._common import TRITON_PRIORITY, round_for, triton_reason

__all__ = ["merge_lora_"]

BLOCK_M = BLOCK_N = 32


@triton.jit
def _merge_kernel(
    w_ptr,  # weight (out, in), contiguous, updated in place
    a_ptr,  # lora_A (r, in), contiguous
    b_ptr,  # lora_B (out, r), contiguous
    keep_ptr,  # uint8 keep-mask (out, in), or a dummy when HAS_MASK is False
    rows,  # out
    cols,  # in
    r,  # adapter rank
    scaling,  # LoRA scaling alpha / r
    HAS_MASK: tl.constexpr,  # apply the mask
    R_PAD: tl.constexpr,  # r rounded up to a power of two >= 16 (tl.dot's minimum)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    p = tl.arange(0, R_PAD)
    b = tl.load(b_ptr + row[:, None] * r + p[None, :], mask=(row[:, None] < rows) & (p[None, :] < r), other=0.0)
    a = tl.load(a_ptr + p[:, None] * cols + col[None, :], mask=(p[:, None] < r) & (col[None, :] < cols), other=0.0)
    delta = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")  # fp32 accumulation
    inside = (row[:, None] < rows) & (col[None, :] < cols)
    at = row[:, None] * cols + col[None, :]
    w = tl.load(w_ptr + at, mask=inside, other=0.0)
    merged = w.to(tl.float32) + scaling * delta
    if HAS_MASK:
        keep = tl.load(keep_ptr + at, mask=inside, other=0)
        merged = tl.where(keep != 0, merged, 0.0)  # NaN/inf in pruned slots become 0
    tl.store(w_ptr + at, round_for(merged, w.dtype), mask=inside)


def _reason(weight, lora_A, lora_B, scaling, mask):
    if not weight.is_contiguous():
        return "weight is not contiguous; the Triton merge writes contiguous weights in place"
    return triton_reason(weight, lora_A, lora_B, mask)


@register("merge_lora_", "triton", priority=TRITON_PRIORITY, check=_reason)
def merge_lora_(weight, lora_A, lora_B, scaling, mask):
    rows, cols = weight.shape
    r = lora_A.shape[0]
    a, b = lora_A.detach().contiguous(), lora_B.detach().contiguous()
    keep = as_bool_keep(mask, weight.shape).contiguous().view(torch.uint8) if mask is not None else weight  # dummy pointer
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols, BLOCK_N))
    _merge_kernel[grid](weight, a, b, keep, rows, cols, r, float(scaling), HAS_MASK=mask is not None,
                        R_PAD=max(16, triton.next_power_of_2(r)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return weight
