"""The hot ops as PyTorch custom operators (``torch.ops.sparselora.*``).

Each op is defined once here with its schema, a fake (meta) implementation that
``torch.compile`` traces with, and, where it is differentiable, its autograd formula. The
kernels behind it are the backends' (:mod:`sparselora.ops._dispatch`): the CPU and CUDA
kernels pick the first backend whose check accepts the call (the C++ extension for CPU
tensors, Triton for CUDA tensors, the pure-PyTorch reference otherwise); any other device
runs the reference. ``SPARSELORA_BACKEND`` forces one backend as before.

Kernels run below autograd and below the compiler's tracing, so nothing in them (thread
counts, pybind calls) ever breaks a graph. No ``from __future__ import annotations``:
``torch.library`` reads the schema from these annotations.
"""

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._dispatch import resolve

OPS = (
    "apply_mask_",
    "masked_copy",
    "merge_lora_",
    "lora_update_norms",
    "masked_lora_weight",
    "masked_lora_linear",
    "masked_lora_input_grad",
    "masked_lora_adapter_grad",
    "select_prune_mask",
    "key_histogram",
    "nm_prune_mask",
    "row_prune_mask",
)
__all__ = ["call", "OPS", *OPS]

NAMESPACE = "sparselora"


def _run(op: str, *args):
    """The default kernel (any device the others do not cover): the reference."""
    device = next((a.device.type for a in _tensors(args)), "cpu")
    with torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext():
        return resolve(op, *args, allowed=("reference",))(*args)


def _dispatching(op: str, device: str, returns_none: bool):
    def kernel(*args):
        # the op's dtypes were settled by its caller: autocast must not recast inside a kernel
        with torch.autocast(device, enabled=False):
            out = resolve(op, *args)(*args)
        return None if returns_none else (tuple(out) if isinstance(out, tuple) else out)

    return kernel


_DEFINED: dict = {}  # custom op -> its eager kernel per device ("cpu", "cuda", None: any other)


def call(op, *args):
    """Run custom op ``op``: through the PyTorch dispatcher while tracing (torch.compile), or
    straight to its kernel in eager mode, for the ops without an autograd formula. The first
    eager call of a custom op imports torch._dynamo (about 1 s and 75 MB, once per process),
    which a pruning script or the CLI need not pay."""
    if torch.compiler.is_compiling():
        return op(*args)
    device = next((a.device.type for a in _tensors(args)), "cpu")
    kernels = _DEFINED[op]
    return kernels.get(device, kernels[None])(*args)


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _define(name: str, prototype, mutates_args=(), kernel=None):
    """Custom op ``sparselora::name``: ``prototype`` gives the schema and runs the reference
    on other devices; the CPU and CUDA kernels go through the backends' dispatcher
    (``kernel(device)`` builds them, device None for the others, where the op's arguments
    differ from the backends')."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(prototype)

    def dispatching(device: Optional[str]):
        if device is None:  # any other device: the reference
            return lambda *args: _run(name, *args)
        return _dispatching(name, device, returns_none=bool(mutates_args))

    make = kernel or dispatching
    _DEFINED[op] = {device: make(device) for device in ("cpu", "cuda", None)}
    for device in ("cpu", "cuda"):
        op.register_kernel(device)(_DEFINED[op][device])
    return op


# ----- masks -------------------------------------------------------------------------------

def _apply_mask_(weight: Tensor, mask: Tensor) -> None:
    _run("apply_mask_", weight, mask)


apply_mask_ = _define("apply_mask_", _apply_mask_, mutates_args=("weight",))


@apply_mask_.register_fake
def _(weight, mask):
    return None


def _masked_copy(tensor: Tensor, mask: Tensor) -> Tensor:
    return _run("masked_copy", tensor, mask)


masked_copy = _define("masked_copy", _masked_copy)


@masked_copy.register_fake
def _(tensor, mask):
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


def _counted_select(device: Optional[str]):
    """The kernel of ``select_prune_mask``: the backends write each mask's pruned count into an
    out argument, which the op returns (an op may not both mutate and return)."""
    allowed = None if device else ("reference",)

    def kernel(scores: List[Tensor], k: int, absolute: bool, count: bool) -> Tuple[List[Tensor], Tensor]:
        where = scores[0].device if scores else torch.device("cpu")
        # -1: not counted; a backend whose pass counts a mask's pruned weights writes them here
        pruned = torch.full((len(scores) if count else 0,), -1, dtype=torch.int64, device=where)
        args = (scores, k, absolute, pruned if count else None)
        kind = device or where.type
        with torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else contextlib.nullcontext():
            masks = resolve("select_prune_mask", *args, allowed=allowed)(*args)
        if count:
            _count_the_rest(masks, pruned)
        return list(masks), pruned

    return kernel


def _count_the_rest(masks: List[Tensor], pruned: Tensor) -> None:
    """The pruned count of each mask the backend's own pass left uncounted (-1)."""
    for i, value in enumerate(pruned.tolist()):
        if value < 0:
            pruned[i] = masks[i].numel() - int(masks[i].count_nonzero())


def _select_prune_mask(scores: List[Tensor], k: int, absolute: bool, count: bool) -> Tuple[List[Tensor], Tensor]:
    return _counted_select(None)(scores, k, absolute, count)


select_prune_mask = _define("select_prune_mask", _select_prune_mask, kernel=_counted_select)


@select_prune_mask.register_fake
def _(scores, k, absolute, count):
    where = scores[0].device if scores else torch.device("cpu")
    masks = [torch.empty(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    return masks, torch.empty(len(scores) if count else 0, dtype=torch.int64, device=where)


def _key_histogram(score: Tensor, absolute: bool, high: int) -> Tensor:
    return _run("key_histogram", score, absolute, high)


key_histogram = _define("key_histogram", _key_histogram)


@key_histogram.register_fake
def _(score, absolute, high):
    return torch.empty(65536, dtype=torch.int64, device=score.device)


def _nm_prune_mask(score: Tensor, n: int, m: int, absolute: bool) -> Tensor:
    return _run("nm_prune_mask", score, n, m, absolute)


nm_prune_mask = _define("nm_prune_mask", _nm_prune_mask)


@nm_prune_mask.register_fake
def _(score, n, m, absolute):
    return torch.empty(score.shape, dtype=torch.bool, device=score.device)


def _row_prune_mask(score: Tensor, k: int, absolute: bool, prior: Optional[Tensor]) -> Tensor:
    return _run("row_prune_mask", score, k, absolute, prior)


row_prune_mask = _define("row_prune_mask", _row_prune_mask)


@row_prune_mask.register_fake
def _(score, k, absolute, prior):
    return torch.empty(score.shape, dtype=torch.bool, device=score.device)


# ----- merge ------------------------------------------------------------------------------

def _merge_lora_(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, mask: Optional[Tensor], norms: Optional[Tensor]
) -> None:
    _run("merge_lora_", weight, lora_A, lora_B, scaling, mask, norms)


merge_lora_ = _define("merge_lora_", _merge_lora_, mutates_args=("weight", "norms"))


@merge_lora_.register_fake
def _(weight, lora_A, lora_B, scaling, mask, norms):
    return None


def _lora_update_norms(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, mask: Optional[Tensor]) -> Tensor:
    return _run("lora_update_norms", weight, lora_A, lora_B, scaling, mask)


lora_update_norms = _define("lora_update_norms", _lora_update_norms)


@lora_update_norms.register_fake
def _(weight, lora_A, lora_B, scaling, mask):
    return weight.new_empty(3, dtype=torch.float64)


# ----- masked LoRA: the effective weight (W + s·B@A) ⊙ M ----------------------------------

def _masked_lora_weight(weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float, mask: Tensor) -> Tensor:
    return _run("masked_lora_weight", weight, lora_A, lora_B, scaling, mask)


masked_lora_weight = _define("masked_lora_weight", _masked_lora_weight)


@masked_lora_weight.register_fake
def _(weight, lora_A, lora_B, scaling, mask):
    dtype = lora_A.dtype if weight is None else weight.dtype
    return lora_A.new_empty(lora_B.shape[0], lora_A.shape[1], dtype=dtype)


def _weight_setup(ctx, inputs, output):
    weight, lora_A, lora_B, scaling, mask = inputs
    ctx.save_for_backward(lora_A, lora_B, mask)
    ctx.scaling, ctx.has_weight = scaling, weight is not None


def _weight_backward(ctx, grad):
    lora_A, lora_B, mask = ctx.saved_tensors
    g = masked_copy(grad, mask)
    s = ctx.scaling
    d_a = (s * (lora_B.to(g.dtype).t() @ g)).to(lora_A.dtype) if ctx.needs_input_grad[1] else None
    d_b = (s * (g @ lora_A.to(g.dtype).t())).to(lora_B.dtype) if ctx.needs_input_grad[2] else None
    d_w = g if ctx.has_weight and ctx.needs_input_grad[0] else None
    return d_w, d_a, d_b, None, None


masked_lora_weight.register_autograd(_weight_backward, setup_context=_weight_setup)


# ----- masked LoRA linear: y = x·W_effᵀ + b ------------------------------------------------
# ``transposed``: weight and mask are stored (in, out), as transformers' Conv1D keeps them,
# and y = x·W_eff + b; lora_A (r, in) and lora_B (out, r) keep the nn.Linear convention.

def _masked_lora_linear(
    x: Tensor, weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float, mask: Tensor,
    bias: Optional[Tensor], transposed: bool,
) -> Tensor:
    return _run("masked_lora_linear", x, weight, lora_A, lora_B, scaling, mask, bias, transposed)


masked_lora_linear = _define("masked_lora_linear", _masked_lora_linear)


@masked_lora_linear.register_fake
def _(x, weight, lora_A, lora_B, scaling, mask, bias, transposed):
    return x.new_empty(*x.shape[:-1], lora_B.shape[0])


def _masked_lora_input_grad(
    dy: Tensor, weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float, mask: Tensor,
    transposed: bool,
) -> Tensor:
    return _run("masked_lora_input_grad", dy, weight, lora_A, lora_B, scaling, mask, transposed)


masked_lora_input_grad = _define("masked_lora_input_grad", _masked_lora_input_grad)


@masked_lora_input_grad.register_fake
def _(dy, weight, lora_A, lora_B, scaling, mask, transposed):
    return dy.new_empty(*dy.shape[:-1], lora_A.shape[1])


def _masked_lora_adapter_grad(
    dy: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, mask: Tensor, transposed: bool,
    weight_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(_run("masked_lora_adapter_grad", dy, x, lora_A, lora_B, scaling, mask, transposed, weight_grad))


masked_lora_adapter_grad = _define("masked_lora_adapter_grad", _masked_lora_adapter_grad)


@masked_lora_adapter_grad.register_fake
def _(dy, x, lora_A, lora_B, scaling, mask, transposed, weight_grad):
    out_features, in_features = lora_B.shape[0], lora_A.shape[1]
    stored = (in_features, out_features) if transposed else (out_features, in_features)
    d_w = dy.new_empty(stored) if weight_grad else dy.new_empty(0)
    return torch.empty_like(lora_A), torch.empty_like(lora_B), d_w


def _linear_setup(ctx, inputs, output):
    x, weight, lora_A, lora_B, scaling, mask, bias, transposed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask)
    ctx.scaling, ctx.transposed, ctx.has_bias = scaling, transposed, bias is not None


def _linear_backward(ctx, dy):
    x, weight, lora_A, lora_B, mask = ctx.saved_tensors
    s, transposed, needs = ctx.scaling, ctx.transposed, ctx.needs_input_grad
    d_x = d_w = d_a = d_b = d_bias = None
    if needs[0]:
        d_x = masked_lora_input_grad(dy, weight, lora_A, lora_B, s, mask, transposed)
    if needs[1] or needs[2] or needs[3]:
        d_a, d_b, d_w = masked_lora_adapter_grad(dy, x, lora_A, lora_B, s, mask, transposed, bool(needs[1]))
        d_a = d_a if needs[2] else None
        d_b = d_b if needs[3] else None
        d_w = d_w if needs[1] else None
    if ctx.has_bias and needs[6]:
        d_bias = dy.reshape(-1, dy.shape[-1]).sum(0)
    return d_x, d_w, d_a, d_b, None, None, d_bias, None


masked_lora_linear.register_autograd(_linear_backward, setup_context=_linear_setup)
