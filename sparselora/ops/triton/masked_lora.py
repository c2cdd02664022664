"""Masked LoRA linear on a GPU: ``y = x·((W + s·B@A) ⊙ M)ᵀ + b``.

The effective weight is built once per call in the compute dtype by one bandwidth-bound
Triton kernel (the fused merge, writing a new tensor), and cuBLAS does every GEMM
(``torch.matmul``), on tensor cores in fp16/bf16. Backward: ``dX`` from the same effective
weight; the masked weight gradient ``G = (dYᵀX) ⊙ M`` by cuBLAS, masked in place by a Triton
kernel, then contracted with ``A`` and ``B`` by cuBLAS. No atomics: gradients are the same
from run to run.
"""

import torch

from .._dispatch import register
from ..reference import adapter_grads, linear_through
from ._common import TRITON_PRIORITY, triton_reason
from .weight import apply_mask_, lora_weight

__all__ = ["effective_weight", "masked_lora_linear", "masked_lora_input_grad", "masked_lora_adapter_grad"]


def effective_weight(weight, lora_A, lora_B, scaling, mask, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """``(W + s·B@A) ⊙ M`` in ``dtype``, in the stored orientation ((in, out) when ``transposed``)."""
    a, b = lora_A.detach(), lora_B.detach()
    if transposed:  # (W_t + s·(BA)ᵀ) ⊙ M_t = (W_t + s·Aᵀ Bᵀ) ⊙ M_t: strides do the transposing
        a, b = b.t(), a.t()
    out = torch.empty(b.shape[0], a.shape[1], dtype=dtype, device=a.device)
    w = weight.detach().contiguous() if weight is not None else None
    return lora_weight(out, w, a, b, scaling, mask)


def _reason(x, weight, lora_A, lora_B, scaling, mask, bias, transposed=False):
    return triton_reason(x, weight, lora_A, lora_B, mask, bias)


@register("masked_lora_linear", "triton", priority=TRITON_PRIORITY, check=_reason)
def masked_lora_linear(x, weight, lora_A, lora_B, scaling, mask, bias, transposed=False):
    w_eff = effective_weight(weight, lora_A, lora_B, float(scaling), mask, transposed, x.dtype)
    return linear_through(x, w_eff, bias, transposed)


@register("masked_lora_input_grad", "triton", priority=TRITON_PRIORITY,
          check=lambda dy, weight, a, b, s, mask, t: _reason(dy, weight, a, b, s, mask, None, t))
def masked_lora_input_grad(dy, weight, lora_A, lora_B, scaling, mask, transposed):
    w_eff = effective_weight(weight, lora_A, lora_B, float(scaling), mask, transposed, dy.dtype)
    return dy @ (w_eff.t() if transposed else w_eff)


def _adapter_reason(dy, x, a, b, s, mask, transposed, weight_grad):
    return triton_reason(dy, x, a, b, mask)


@register("masked_lora_adapter_grad", "triton", priority=TRITON_PRIORITY, check=_adapter_reason)
def masked_lora_adapter_grad(dy, x, lora_A, lora_B, scaling, mask, transposed, weight_grad):
    return adapter_grads(dy, x, lora_A, lora_B, scaling, mask, transposed, weight_grad, apply_mask_)
