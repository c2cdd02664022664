"""Masked LoRA linear on Triton: ``y = x·((W + s·B@A) ⊙ M)ᵀ + b``.

The effective weight is built tile by tile inside the GEMMs (2r extra FLOPs per weight
element), never as a whole ``out×in`` tensor. Backward: ``dX`` the same way, and the masked
weight gradient ``G = (dYᵀX) ⊙ M`` computed tile-wise and contracted at once with ``A``
and ``B`` (``dB = s·G Aᵀ``, ``dA = s·Bᵀ G``, accumulated with fp32 atomics), never stored.
"""

import torch
import triton
import triton.language as tl

from .._dispatch import register
from .._bits import as_bool_keep
from ._common import TRITON_PRIORITY, round_for, triton_reason

__all__ = ["masked_lora_linear", "masked_lora_input_grad", "masked_lora_adapter_grad"]

def _block(t: torch.Tensor) -> int:
    # tile side: 64 on a GPU; 16 (tl.dot's minimum) keeps the CPU interpreter quick
    return 64 if t.is_cuda else 16


@triton.jit
def _effective_tile(w_ptr, a_ptr, b_ptr, keep_ptr, n_idx, k_idx, rows, cols, r, scaling,
                    HAS_W: tl.constexpr, R_PAD: tl.constexpr):
    """((W + s·B A) ⊙ M)[n_idx, k_idx] in fp32, zero outside the matrix."""
    p = tl.arange(0, R_PAD)
    inside = (n_idx[:, None] < rows) & (k_idx[None, :] < cols)
    b = tl.load(b_ptr + n_idx[:, None] * r + p[None, :], mask=(n_idx[:, None] < rows) & (p[None, :] < r), other=0.0)
    a = tl.load(a_ptr + p[:, None] * cols + k_idx[None, :], mask=(p[:, None] < r) & (k_idx[None, :] < cols), other=0.0)
    tile = scaling * tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    at = n_idx[:, None] * cols + k_idx[None, :]
    if HAS_W:
        tile += tl.load(w_ptr + at, mask=inside, other=0.0).to(tl.float32)
    keep = tl.load(keep_ptr + at, mask=inside, other=0)
    return tl.where(keep != 0, tile, 0.0)


@triton.jit
def _forward_kernel(
    x_ptr,  # (tokens, in) input
    w_ptr,  # (out, in) base weight (ignored unless HAS_W)
    a_ptr,  # (r, in) lora_A
    b_ptr,  # (out, r) lora_B
    keep_ptr,  # (out, in) uint8 keep-mask
    bias_ptr,  # (out,) bias (ignored unless HAS_BIAS)
    y_ptr,  # (tokens, out) output
    tokens, rows, cols, r,  # sizes: tokens, out, in, rank
    scaling,  # alpha / r
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    m_idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, cols, BLOCK):
        k_idx = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + m_idx[:, None] * cols + k_idx[None, :], mask=(m_idx[:, None] < tokens) & (k_idx[None, :] < cols), other=0.0)
        w_eff = _effective_tile(w_ptr, a_ptr, b_ptr, keep_ptr, n_idx, k_idx, rows, cols, r, scaling, HAS_W, R_PAD)
        acc += tl.dot(x.to(tl.float32), tl.trans(w_eff), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n_idx, mask=n_idx < rows, other=0.0).to(tl.float32)[None, :]
    out = m_idx[:, None] * rows + n_idx[None, :]
    tl.store(y_ptr + out, round_for(acc, y_ptr.dtype.element_ty), mask=(m_idx[:, None] < tokens) & (n_idx[None, :] < rows))


@triton.jit
def _grad_input_kernel(
    dy_ptr,  # (tokens, out) output gradient
    w_ptr, a_ptr, b_ptr, keep_ptr,  # as in the forward
    dx_ptr,  # (tokens, in) input gradient out
    tokens, rows, cols, r, scaling,
    HAS_W: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    m_idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k_idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for n0 in range(0, rows, BLOCK):
        n_idx = n0 + tl.arange(0, BLOCK)
        dy = tl.load(dy_ptr + m_idx[:, None] * rows + n_idx[None, :], mask=(m_idx[:, None] < tokens) & (n_idx[None, :] < rows), other=0.0)
        w_eff = _effective_tile(w_ptr, a_ptr, b_ptr, keep_ptr, n_idx, k_idx, rows, cols, r, scaling, HAS_W, R_PAD)
        acc += tl.dot(dy.to(tl.float32), w_eff, input_precision="ieee")
    tl.store(dx_ptr + m_idx[:, None] * cols + k_idx[None, :], round_for(acc, dx_ptr.dtype.element_ty),
             mask=(m_idx[:, None] < tokens) & (k_idx[None, :] < cols))


@triton.jit
def _grad_adapter_kernel(
    dy_ptr,  # (tokens, out) output gradient
    x_ptr,  # (tokens, in) input
    a_ptr, b_ptr, keep_ptr,  # lora_A, lora_B, keep-mask
    da_ptr,  # (r, in) fp32 gradient of lora_A, accumulated atomically
    db_ptr,  # (out, r) fp32 gradient of lora_B, accumulated atomically
    tokens, rows, cols, r, scaling,
    R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    n_idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k_idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # a tile of dYᵀX
    for m0 in range(0, tokens, BLOCK):
        m_idx = m0 + tl.arange(0, BLOCK)
        dy = tl.load(dy_ptr + m_idx[:, None] * rows + n_idx[None, :], mask=(m_idx[:, None] < tokens) & (n_idx[None, :] < rows), other=0.0)
        x = tl.load(x_ptr + m_idx[:, None] * cols + k_idx[None, :], mask=(m_idx[:, None] < tokens) & (k_idx[None, :] < cols), other=0.0)
        g += tl.dot(tl.trans(dy.to(tl.float32)), x.to(tl.float32), input_precision="ieee")
    inside = (n_idx[:, None] < rows) & (k_idx[None, :] < cols)
    keep = tl.load(keep_ptr + n_idx[:, None] * cols + k_idx[None, :], mask=inside, other=0)
    g = tl.where(keep != 0, g, 0.0)
    p = tl.arange(0, R_PAD)
    a = tl.load(a_ptr + p[:, None] * cols + k_idx[None, :], mask=(p[:, None] < r) & (k_idx[None, :] < cols), other=0.0).to(tl.float32)
    b = tl.load(b_ptr + n_idx[:, None] * r + p[None, :], mask=(n_idx[:, None] < rows) & (p[None, :] < r), other=0.0).to(tl.float32)
    db = scaling * tl.dot(g, tl.trans(a), input_precision="ieee")  # (BLOCK out, R_PAD)
    da = scaling * tl.dot(tl.trans(b), g, input_precision="ieee")  # (R_PAD, BLOCK in)
    tl.atomic_add(db_ptr + n_idx[:, None] * r + p[None, :], db, mask=(n_idx[:, None] < rows) & (p[None, :] < r))
    tl.atomic_add(da_ptr + p[:, None] * cols + k_idx[None, :], da, mask=(p[:, None] < r) & (k_idx[None, :] < cols))


def _sizes(x2, lora_A, lora_B):
    return x2.shape[0], lora_B.shape[0], lora_A.shape[1], lora_A.shape[0]


def _keep_bytes(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # the kernels read one byte per weight; a packed mask is unpacked on the device first
    return as_bool_keep(mask, (rows, cols)).contiguous().view(torch.uint8)


def _operands(weight, lora_A, lora_B, mask):
    a, b = lora_A.contiguous(), lora_B.contiguous()
    keep = _keep_bytes(mask, b.shape[0], a.shape[1])
    w = weight.contiguous() if weight is not None else keep  # dummy pointer when there is no base
    return w, a, b, keep


def _forward(x, weight, lora_A, lora_B, scaling, mask, bias):
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w, a, b, keep = _operands(weight, lora_A, lora_B, mask)
    tokens, rows, cols, r = _sizes(x2, a, b)
    y = torch.empty(tokens, rows, dtype=x.dtype, device=x.device)
    block = _block(x2)
    grid = (triton.cdiv(tokens, block), triton.cdiv(rows, block))
    _forward_kernel[grid](x2, w, a, b, keep, bias if bias is not None else keep, y, tokens, rows, cols, r, scaling,
                          HAS_W=weight is not None, HAS_BIAS=bias is not None,
                          R_PAD=max(16, triton.next_power_of_2(r)), BLOCK=block)
    return y.reshape(*x.shape[:-1], rows)


def _input_grad(dy, weight, lora_A, lora_B, scaling, mask):
    dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
    w, a, b, keep = _operands(weight, lora_A, lora_B, mask)
    tokens, rows, cols, r = dy2.shape[0], b.shape[0], a.shape[1], a.shape[0]
    d_x = torch.empty(tokens, cols, dtype=dy.dtype, device=dy.device)
    block = _block(dy2)
    _grad_input_kernel[(triton.cdiv(tokens, block), triton.cdiv(cols, block))](
        dy2, w, a, b, keep, d_x, tokens, rows, cols, r, scaling, HAS_W=weight is not None,
        R_PAD=max(16, triton.next_power_of_2(r)), BLOCK=block)
    return d_x.reshape(*dy.shape[:-1], cols)


def _adapter_grad(dy, x, lora_A, lora_B, scaling, mask):
    dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    _, a, b, keep = _operands(None, lora_A, lora_B, mask)
    tokens, rows, cols, r = _sizes(x2, a, b)
    da32 = torch.zeros(r, cols, dtype=torch.float32, device=x2.device)
    db32 = torch.zeros(rows, r, dtype=torch.float32, device=x2.device)
    block = _block(x2)
    _grad_adapter_kernel[(triton.cdiv(rows, block), triton.cdiv(cols, block))](
        dy2, x2, a, b, keep, da32, db32, tokens, rows, cols, r, scaling,
        R_PAD=max(16, triton.next_power_of_2(r)), BLOCK=block)
    return da32.to(lora_A.dtype), db32.to(lora_B.dtype), da32.new_empty(0, dtype=dy.dtype)


def _reason(x, weight, lora_A, lora_B, scaling, mask, bias, transposed=False):
    if transposed:
        return "the Triton masked LoRA kernels take the nn.Linear layout (transposed=False)"
    return triton_reason(x, weight, lora_A, lora_B, mask, bias)


@register("masked_lora_linear", "triton", priority=TRITON_PRIORITY, check=_reason)
def masked_lora_linear(x, weight, lora_A, lora_B, scaling, mask, bias, transposed=False):
    return _forward(x, weight, lora_A, lora_B, float(scaling), mask, bias)


@register("masked_lora_input_grad", "triton", priority=TRITON_PRIORITY,
          check=lambda dy, weight, a, b, s, mask, t: _reason(dy, weight, a, b, s, mask, None, t))
def masked_lora_input_grad(dy, weight, lora_A, lora_B, scaling, mask, transposed):
    return _input_grad(dy, weight, lora_A, lora_B, float(scaling), mask)


def _adapter_reason(dy, x, a, b, s, mask, transposed, weight_grad):
    if weight_grad:
        return "the Triton masked LoRA kernels train the adapters only (the weight's gradient was asked for)"
    return _reason(x, None, a, b, s, mask, dy, transposed)


@register("masked_lora_adapter_grad", "triton", priority=TRITON_PRIORITY, check=_adapter_reason)
def masked_lora_adapter_grad(dy, x, lora_A, lora_B, scaling, mask, transposed, weight_grad):
    return _adapter_grad(dy, x, lora_A, lora_B, float(scaling), mask)
