"""Weight-sized kernels on Triton, bound by memory bandwidth: the LoRA weight
``(W + s·B@A) ⊙ M`` (in place, as the fused merge, or into a new tensor, as the effective
weight of a sparse_to_sparse layer) and applying a keep-mask.

Offsets are 64-bit, so tensors of 2^31 elements and more are addressed correctly. The rank
is walked in slices of at most 64, so any rank fits in shared memory. With fp16/bf16
adapters on a GPU the ``B@A`` slices run on tensor cores (fp32 accumulation); fp32 adapters
and the CPU interpreter multiply in fp32.
"""

import os

import torch
import triton
import triton.language as tl

from .._dispatch import register
from ._common import TRITON_PRIORITY, device_guard, interpreting, keep_bytes, round_for, triton_reason

__all__ = ["lora_weight", "merge_lora_", "lora_update_norms", "masked_lora_weight", "apply_mask_", "masked_copy", "tiles"]

MASK_BLOCK = 4096
GPU_TILE = 64  # rows and columns of a weight tile on a GPU
CPU_TILE = 16  # under the interpreter: small tiles keep it quick
WARPS = 8  # a 64 x 64 tile over 8 warps: 16 accumulators per thread


def tiles(t: torch.Tensor) -> int:
    """Weight tile side for ``t``: the GPU's on CUDA, or when SPARSELORA_TRITON_GPU_TILES=1 asks
    the interpreter to run exactly what a GPU would."""
    return GPU_TILE if t.is_cuda or os.environ.get("SPARSELORA_TRITON_GPU_TILES") == "1" else CPU_TILE


@triton.jit
def _lora_weight_kernel(
    w_ptr,  # (rows, cols) base weight, contiguous (ignored unless HAS_W)
    out_ptr,  # (rows, cols) output, contiguous; may be w_ptr (in-place merge)
    a_ptr,  # lora_A-like factor (r, cols), any strides
    b_ptr,  # lora_B-like factor (rows, r), any strides
    keep_ptr,  # (rows, cols) uint8 keep-mask (ignored unless HAS_MASK)
    norms_ptr,  # 3 fp32 sums (ignored unless NORMS): ‖(s·BA) ⊙ ¬M‖², ‖s·BA‖², ‖W + s·BA‖²
    rows, cols, r,
    stride_ar, stride_ac, stride_br, stride_bc,
    scaling,  # alpha / r
    HAS_W: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE: tl.constexpr,  # write the merged tile (False: the norms alone)
    NORMS: tl.constexpr,  # add this tile's squared norms to norms_ptr
    NATIVE_DOT: tl.constexpr,  # multiply fp16/bf16 factors as they are (tensor cores)
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # the tile's origin in 64 bits; offsets inside the tile stay 32-bit (fewer registers)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_N
    ri = tl.arange(0, BLOCK_M)
    ci = tl.arange(0, BLOCK_N)
    rows_left = tl.minimum(rows - row0, BLOCK_M).to(tl.int32)
    cols_left = tl.minimum(cols - col0, BLOCK_N).to(tl.int32)
    b_tile = b_ptr + row0 * stride_br
    a_tile = a_ptr + col0 * stride_ac
    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, r, R_BLOCK):
        p = p0 + tl.arange(0, R_BLOCK)
        b = tl.load(b_tile + ri[:, None] * stride_br + p[None, :] * stride_bc,
                    mask=(ri[:, None] < rows_left) & (p[None, :] < r), other=0.0)
        a = tl.load(a_tile + p[:, None] * stride_ar + ci[None, :] * stride_ac,
                    mask=(p[:, None] < r) & (ci[None, :] < cols_left), other=0.0)
        if NATIVE_DOT:
            delta += tl.dot(b, a)
        else:
            delta += tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    delta = scaling * delta  # 0 outside the tile: the factors' loads are masked
    inside = (ri[:, None] < rows_left) & (ci[None, :] < cols_left)
    tile = row0 * cols + col0
    at = ri[:, None] * cols + ci[None, :]
    merged = delta
    if HAS_W:
        merged += tl.load(w_ptr + tile + at, mask=inside, other=0.0).to(tl.float32)
    if NORMS:
        tl.atomic_add(norms_ptr + 1, tl.sum(tl.sum(delta * delta, axis=1), axis=0))
        tl.atomic_add(norms_ptr + 2, tl.sum(tl.sum(merged * merged, axis=1), axis=0))
    if HAS_MASK:
        keep = tl.load(keep_ptr + tile + at, mask=inside, other=0)
        if NORMS:
            lost = tl.where(keep != 0, 0.0, delta)
            tl.atomic_add(norms_ptr, tl.sum(tl.sum(lost * lost, axis=1), axis=0))
        merged = tl.where(keep != 0, merged, 0.0)  # NaN/inf in pruned slots become 0
    if STORE:
        tl.store(out_ptr + tile + at, round_for(merged, out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mask_kernel(
    src_ptr,  # values, contiguous
    dst_ptr,  # output, contiguous; may be src_ptr (in place)
    keep_ptr,  # uint8 keep-mask
    n,  # number of values
    IN_PLACE: tl.constexpr,  # only the pruned slots need a write
    BLOCK: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    at = tl.arange(0, BLOCK)
    inside = at < tl.minimum(n - base, BLOCK).to(tl.int32)
    keep = tl.load(keep_ptr + base + at, mask=inside, other=1)
    if IN_PLACE:
        zero = tl.zeros((BLOCK,), dtype=dst_ptr.dtype.element_ty)
        tl.store(dst_ptr + base + at, zero, mask=inside & (keep == 0))
    else:
        x = tl.load(src_ptr + base + at, mask=inside, other=0.0)
        tl.store(dst_ptr + base + at, tl.where(keep != 0, x, tl.zeros_like(x)), mask=inside)


def _rank_slice(r: int, native: bool) -> int:
    # tl.dot needs 16; fp32 factors on CUDA cores spill registers beyond 16 (compile_report)
    return min(64 if native else 16, max(16, triton.next_power_of_2(r)))


def lora_weight(
    out: torch.Tensor | None,
    weight: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
    norms: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Write ``(weight + scaling·b@a) ⊙ mask`` into ``out`` (contiguous; may be ``weight``;
    None: nothing is written). ``norms`` (float64, 3) receives the merge report's squared
    norms from the same pass."""
    rows, cols = b.shape[0], a.shape[1]
    r = a.shape[0]
    anchor = out if out is not None else weight
    keep = keep_bytes(mask, (rows, cols)) if mask is not None else anchor  # dummy pointer
    sums = torch.zeros(3, dtype=torch.float32, device=anchor.device) if norms is not None else anchor
    native = (not interpreting()) and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)
    tile = tiles(anchor)
    grid = (triton.cdiv(rows, tile), triton.cdiv(cols, tile))
    with device_guard(anchor):
        _lora_weight_kernel[grid](
            weight if weight is not None else anchor, anchor, a, b, keep, sums, rows, cols, r,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), float(scaling),
            HAS_W=weight is not None, HAS_MASK=mask is not None, STORE=out is not None, NORMS=norms is not None,
            NATIVE_DOT=native, R_BLOCK=_rank_slice(r, native), BLOCK_M=tile, BLOCK_N=tile, num_warps=WARPS,
        )
    if norms is not None:
        norms.copy_(sums)
    return out


def _merge_reason(weight, lora_A, lora_B, scaling, mask, norms=None):
    if not weight.is_contiguous():
        return "weight is not contiguous; the Triton merge writes contiguous weights in place"
    return triton_reason(weight, lora_A, lora_B, mask)


@register("merge_lora_", "triton", priority=TRITON_PRIORITY, check=_merge_reason)
def merge_lora_(weight, lora_A, lora_B, scaling, mask, norms=None):
    return lora_weight(weight, weight, lora_A.detach(), lora_B.detach(), scaling, mask, norms)


@register("lora_update_norms", "triton", priority=TRITON_PRIORITY, check=_merge_reason)
def lora_update_norms(weight, lora_A, lora_B, scaling, mask):
    norms = torch.empty(3, dtype=torch.float64, device=weight.device)
    lora_weight(None, weight, lora_A.detach(), lora_B.detach(), scaling, mask, norms)
    return norms


def _weight_reason(weight, lora_A, lora_B, scaling, mask):
    return triton_reason(weight, lora_A, lora_B, mask)


@register("masked_lora_weight", "triton", priority=TRITON_PRIORITY, check=_weight_reason)
def masked_lora_weight(weight, lora_A, lora_B, scaling, mask):
    like = lora_A if weight is None else weight
    out = torch.empty(lora_B.shape[0], lora_A.shape[1], dtype=like.dtype, device=like.device)
    w = weight.detach().contiguous() if weight is not None else None
    return lora_weight(out, w, lora_A.detach(), lora_B.detach(), scaling, mask)


def _mask(src: torch.Tensor, dst: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = keep_bytes(mask, src.shape)
    n = src.numel()
    if n:
        with device_guard(src):
            _mask_kernel[(triton.cdiv(n, MASK_BLOCK),)](src, dst, keep, n, IN_PLACE=src is dst, BLOCK=MASK_BLOCK)
    return dst


def _apply_reason(weight, mask):
    if not weight.is_contiguous():
        return "weight is not contiguous; the Triton kernel masks contiguous weights in place"
    return triton_reason(weight, mask) if weight.is_floating_point() else f"dtype {weight.dtype} is not a float"


@register("apply_mask_", "triton", priority=TRITON_PRIORITY, check=_apply_reason)
def apply_mask_(weight, mask):
    return _mask(weight, weight, mask)


def _copy_reason(tensor, mask):
    return triton_reason(tensor, mask) if tensor.is_floating_point() else f"dtype {tensor.dtype} is not a float"


@register("masked_copy", "triton", priority=TRITON_PRIORITY, check=_copy_reason)
def masked_copy(tensor, mask):
    src = tensor.detach().contiguous()
    return _mask(src, torch.empty_like(src), mask)
