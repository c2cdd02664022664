"""The cpp backend: CPU kernels of ``sparselora._C`` behind the ops' signatures.

Tensors cross into C++ as (address, element count, dtype code). Each op's ``check``
says why a call cannot run here (extension missing, CUDA tensor, float64, ...); the
dispatcher then falls back to the reference, or raises when this backend was forced.
"""

from __future__ import annotations

import threading
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import register
from ._types import PruneThreshold, raise_nonfinite
from .masks import pack_bits, packed_size

__all__ = ["available", "unavailable_reason", "pack_mask", "unpack_mask", "apply_packed_mask_", "release_workspaces"]

CPP_PRIORITY = 10
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# the N:M and row kernels also read float64 (as 64-bit keys)
_SELECT_DTYPE_CODES = {**_DTYPE_CODES, torch.float64: 3}

try:
    from .. import _C
except ImportError as exc:  # no compiler at install time, or a broken build
    _C = None
    _IMPORT_ERROR = f"sparselora._C could not be imported ({exc})"
    warnings.warn(f"{_IMPORT_ERROR}; every op runs on the slower reference backend", RuntimeWarning, stacklevel=2)
else:
    _IMPORT_ERROR = None


def available() -> bool:
    """True when the compiled extension loaded."""
    return _C is not None


def unavailable_reason() -> str | None:
    """Why the extension is unavailable, or None."""
    return _IMPORT_ERROR


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _tensor_reason(t: torch.Tensor | None, what: str) -> str | None:
    if t is None:
        return None
    if t.device.type != "cpu":
        return f"{what} is on {t.device}; the cpp backend runs CPU tensors"
    if t.dtype not in _DTYPE_CODES:
        return f"{what} has dtype {t.dtype}; the cpp backend takes float32, float16 and bfloat16"
    return None


def _first_reason(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r is not None), None)


def _scores_reason(scores: Sequence[torch.Tensor], *_args) -> str | None:
    if _C is None:
        return _IMPORT_ERROR
    return _first_reason(*(_tensor_reason(s, f"scores[{i}]") for i, s in enumerate(scores)))


def _layout(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], list[int], list[int], list[int]]:
    # contiguous views (a copy only for non-contiguous input) kept alive by the caller
    flat = [t.detach().contiguous() for t in tensors]
    return flat, [t.data_ptr() for t in flat], [t.numel() for t in flat], [_DTYPE_CODES[t.dtype] for t in flat]



@register("prune_threshold", "cpp", priority=CPP_PRIORITY, check=_scores_reason)
def prune_threshold(scores: Sequence[torch.Tensor], k: int, absolute: bool) -> PruneThreshold:
    keep_alive, addresses, sizes, dtypes = _layout(*scores)
    if k == 0:
        counts = torch.empty(65536, dtype=torch.int64)
        raise_nonfinite(_C.key_histogram(addresses, sizes, dtypes, absolute, -1, counts.data_ptr(), _threads()))
        return PruneThreshold(float("-inf"), 0)
    value, ties, nonfinite = _C.find_cut(addresses, sizes, dtypes, k, absolute, _threads())
    raise_nonfinite(nonfinite)
    del keep_alive
    return PruneThreshold(value, ties)


@register("key_histogram", "cpp", priority=CPP_PRIORITY, check=lambda score, *a: _scores_reason([score]))
def key_histogram(score: torch.Tensor, absolute: bool, high: int) -> torch.Tensor:
    (flat,), (address,), (size,), (dtype,) = _layout(score)
    counts = torch.empty(65536, dtype=torch.int64)
    raise_nonfinite(_C.key_histogram([address], [size], [dtype], absolute, high, counts.data_ptr(), _threads()))
    return counts


def _write_reason(score: torch.Tensor, *_args) -> str | None:
    return _IMPORT_ERROR if _C is None else _tensor_reason(score, "score")


@register("write_prune_mask", "cpp", priority=CPP_PRIORITY, check=_write_reason)
def write_prune_mask(
    score: torch.Tensor, threshold: PruneThreshold, ties_left: int, absolute: bool, packed: bool = False
) -> tuple[torch.Tensor, int]:
    if threshold.value == float("-inf"):  # nothing pruned in this group
        keep = torch.ones(score.shape, dtype=torch.bool)
        return (pack_bits(keep) if packed else keep), 0
    (flat,), (address,), (size,), (dtype,) = _layout(score)
    out = torch.empty((packed_size(size),) if packed else score.shape, dtype=torch.uint8 if packed else torch.bool)
    layout = _C.PACKED_BITS if packed else _C.BOOL_BYTES
    used = _C.write_mask(address, size, dtype, threshold.value, ties_left, absolute, out.data_ptr(), layout, _threads())
    return out, used


@register("select_prune_mask", "cpp", priority=CPP_PRIORITY, check=_scores_reason)
def select_prune_mask(
    scores: Sequence[torch.Tensor], k: int, absolute: bool, pruned: torch.Tensor | None = None
) -> list[torch.Tensor]:
    keep_alive, addresses, sizes, dtypes = _layout(*scores)
    outs = [torch.empty(s.shape, dtype=torch.bool) for s in scores]
    # the fused pass writes each mask's pruned count; its fallbacks leave -1 (the caller counts)
    nonfinite = _C.select_masks(addresses, sizes, dtypes, k, absolute, [o.data_ptr() for o in outs], _C.BOOL_BYTES,
                                _threads(), 0 if pruned is None else pruned.data_ptr())
    raise_nonfinite(nonfinite)
    del keep_alive
    return outs


def _rows_reason(score: torch.Tensor, *args) -> str | None:
    if _C is None:
        return _IMPORT_ERROR
    if score.device.type != "cpu":
        return f"score is on {score.device}; the cpp backend runs CPU tensors"
    prior = args[-1] if args and isinstance(args[-1], torch.Tensor) else None
    return _mask_reason(prior)


@register("nm_prune_mask", "cpp", priority=CPP_PRIORITY, check=_rows_reason)
def nm_prune_mask(score: torch.Tensor, n: int, m: int, absolute: bool) -> torch.Tensor:
    flat = score.detach().contiguous()
    out = torch.empty(score.shape, dtype=torch.bool)
    code = _SELECT_DTYPE_CODES[flat.dtype]
    raise_nonfinite(_C.nm_mask(flat.data_ptr(), code, flat.numel(), n, m, absolute, out.data_ptr(), _threads()))
    return out


@register("row_prune_mask", "cpp", priority=CPP_PRIORITY, check=_rows_reason)
def row_prune_mask(score: torch.Tensor, k: int, absolute: bool, prior: torch.Tensor | None) -> torch.Tensor:
    flat = score.detach().contiguous()
    live = None if prior is None else prior.contiguous()
    out = torch.empty(score.shape, dtype=torch.bool)
    rows, cols = score.shape
    nonfinite, bad_row, bad_count = _C.row_mask(
        flat.data_ptr(), _SELECT_DTYPE_CODES[flat.dtype], rows, cols, k, absolute,
        0 if live is None else live.data_ptr(), out.data_ptr(), _threads(),
    )
    if bad_row >= 0:
        raise ValueError(f"prior already prunes {bad_count} weights of row {bad_row}, more than k={k}")
    raise_nonfinite(nonfinite)
    return out


def _inplace_reason(weight: torch.Tensor, mask: torch.Tensor | None, *_args) -> str | None:
    if _C is None:
        return _IMPORT_ERROR
    if not weight.is_contiguous():
        return "weight is not contiguous; the cpp backend writes contiguous weights in place"
    return _first_reason(_tensor_reason(weight, "weight"), _mask_reason(mask))


def _mask_reason(mask: torch.Tensor | None) -> str | None:
    if mask is not None and mask.device.type != "cpu":
        return f"mask is on {mask.device}; the cpp backend runs CPU tensors"
    return None


def _mask_layout(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(contiguous mask, its layout code): bool bytes, or packed bits (uint8)."""
    return mask.contiguous(), (_C.BOOL_BYTES if mask.dtype == torch.bool else _C.PACKED_BITS)


def _mask_in_place(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep, layout = _mask_layout(mask)
    _C.apply_mask(t.data_ptr(), _DTYPE_CODES[t.dtype], t.numel(), keep.data_ptr(), layout, _threads())
    return t


@register("apply_mask_", "cpp", priority=CPP_PRIORITY, check=_inplace_reason)
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _mask_in_place(weight, mask)


@register("masked_copy", "cpp", priority=CPP_PRIORITY,
          check=lambda t, mask: _first_reason(_IMPORT_ERROR, _tensor_reason(t, "tensor"), _mask_reason(mask)))
def masked_copy(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _mask_in_place(tensor.contiguous().clone(), mask)


_workspaces = threading.local()


def _workspace(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A reusable ``rows x cols`` buffer, one per shape and dtype in each thread.

    The effective weight of a sparse_to_sparse layer lives only inside one forward or
    backward call; a fresh out x in tensor per call costs more in first-touch page faults
    than building it. Never hand one out beyond the call that filled it.
    """
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = {}
    key = (rows, cols, dtype)
    if key not in cache:
        cache[key] = torch.empty(rows, cols, dtype=dtype)
    return cache[key]


def release_workspaces() -> int:
    """Free this thread's sparse_to_sparse workspaces (they are rebuilt on the next call);
    returns the bytes released."""
    cache = getattr(_workspaces, "buffers", None) or {}
    released = sum(t.numel() * t.element_size() for t in cache.values())
    cache.clear()
    return released


def _merge_reason(weight, lora_A, lora_B, scaling, mask, norms=None) -> str | None:
    return _first_reason(_inplace_reason(weight, mask), _tensor_reason(lora_A, "lora_A"), _tensor_reason(lora_B, "lora_B"))


def _matrix(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(address, dtype code, row stride, column stride) of a 2-D tensor, in elements."""
    return t.data_ptr(), _DTYPE_CODES[t.dtype], t.stride(0), t.stride(1)


def _effective_weight(
    weight: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
    mask: torch.Tensor | None, out: torch.Tensor | None, transposed: bool = False,
    norms: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``out ← (W + s·B@A) ⊙ M`` in one pass; ``transposed``: W, M and out are (in, out).

    ``out=None`` stores nothing; ``norms`` (float64, 3) receives the merge report's squared
    norms from the same pass."""
    if transposed:  # (W_t + s·Aᵀ Bᵀ) ⊙ M_t
        lora_A, lora_B = lora_B.t(), lora_A.t()
    rows, cols = lora_B.shape[0], lora_A.shape[1]
    keep, layout = (None, _C.BOOL_BYTES) if mask is None else _mask_layout(mask)
    base = None if weight is None else weight.detach().contiguous()
    dtype = (out if out is not None else base).dtype
    sums = None if norms is None else torch.zeros(3, dtype=torch.float64)
    # the adapters go as they are (any dtype the kernel reads, any strides): converting them here
    # would run a torch op, whose worker threads keep spinning on the cores the kernel then needs
    _C.merge_lora(
        0 if base is None else base.data_ptr(), _DTYPE_CODES[dtype], rows, cols, _matrix(lora_A), _matrix(lora_B),
        lora_A.shape[0], scaling, 0 if keep is None else keep.data_ptr(), layout,
        0 if out is None else out.data_ptr(), _threads(), 0 if sums is None else sums.data_ptr(),
    )
    if norms is not None:
        norms.copy_(sums)
    return out


@register("merge_lora_", "cpp", priority=CPP_PRIORITY, check=_merge_reason)
def merge_lora_(weight, lora_A, lora_B, scaling, mask, norms=None):
    return _effective_weight(weight, lora_A, lora_B, scaling, mask, weight, norms=norms)


def _lora_reason(weight, lora_A, lora_B, scaling, mask, *_args) -> str | None:
    if _C is None:
        return _IMPORT_ERROR
    return _first_reason(
        _tensor_reason(weight, "weight"), _tensor_reason(lora_A, "lora_A"), _tensor_reason(lora_B, "lora_B"),
        _mask_reason(mask),
    )


@register("lora_update_norms", "cpp", priority=CPP_PRIORITY, check=_lora_reason)
def lora_update_norms(weight, lora_A, lora_B, scaling, mask):
    norms = torch.empty(3, dtype=torch.float64)
    _effective_weight(weight, lora_A, lora_B, scaling, mask, None, norms=norms)
    return norms


@register("masked_lora_weight", "cpp", priority=CPP_PRIORITY, check=_lora_reason)
def masked_lora_weight(weight, lora_A, lora_B, scaling, mask):
    dtype = lora_A.dtype if weight is None else weight.dtype
    return _effective_weight(weight, lora_A, lora_B, scaling, mask, torch.empty(lora_B.shape[0], lora_A.shape[1], dtype=dtype))


def _stored_shape(lora_A: torch.Tensor, lora_B: torch.Tensor, transposed: bool) -> tuple[int, int]:
    out_features, in_features = lora_B.shape[0], lora_A.shape[1]
    return (in_features, out_features) if transposed else (out_features, in_features)


def _linear_reason(x, weight, lora_A, lora_B, scaling, mask, bias, transposed=False) -> str | None:
    return _first_reason(_lora_reason(weight, lora_A, lora_B, scaling, mask), _tensor_reason(x, "x"),
                         _tensor_reason(bias, "bias"))


@register("masked_lora_linear", "cpp", priority=CPP_PRIORITY, check=_linear_reason)
def masked_lora_linear(x, weight, lora_A, lora_B, scaling, mask, bias, transposed=False):
    # the effective weight lives in a workspace for this call only; backward rebuilds it
    w_eff = _effective_weight(weight, lora_A, lora_B, scaling, mask,
                              _workspace(*_stored_shape(lora_A, lora_B, transposed), x.dtype), transposed)
    if transposed:
        y = x @ w_eff
        return y if bias is None else y.add_(bias)
    return F.linear(x, w_eff, bias)


@register("masked_lora_input_grad", "cpp", priority=CPP_PRIORITY,
          check=lambda dy, weight, a, b, s, mask, t: _linear_reason(dy, weight, a, b, s, mask, None))
def masked_lora_input_grad(dy, weight, lora_A, lora_B, scaling, mask, transposed):
    w_eff = _effective_weight(weight, lora_A, lora_B, scaling, mask,
                              _workspace(*_stored_shape(lora_A, lora_B, transposed), dy.dtype), transposed)
    return dy @ (w_eff.t() if transposed else w_eff)


@register("masked_lora_adapter_grad", "cpp", priority=CPP_PRIORITY,
          check=lambda dy, x, a, b, s, mask, t, wg: _linear_reason(x, None, a, b, s, mask, dy))
def masked_lora_adapter_grad(dy, x, lora_A, lora_B, scaling, mask, transposed, weight_grad):
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    lhs, rhs = (x2.t(), dy2) if transposed else (dy2.t(), x2)
    # G = the stored weight's gradient, masked in place: in a workspace unless it is returned
    g = lhs @ rhs if weight_grad else torch.mm(lhs, rhs, out=_workspace(lhs.shape[0], rhs.shape[1], dy.dtype))
    _mask_in_place(g, mask)
    g_lin = g.t() if transposed else g
    d_b = (scaling * (g_lin @ lora_A.to(g.dtype).t())).to(lora_B.dtype)
    d_a = (scaling * (lora_B.to(g.dtype).t() @ g_lin)).to(lora_A.dtype)
    return d_a, d_b, (g if weight_grad else g.new_empty(0))


def _check_packable(mask: torch.Tensor) -> None:
    if _C is None:
        raise RuntimeError(_IMPORT_ERROR)
    if mask.dtype != torch.bool or mask.device.type != "cpu":
        raise TypeError(f"mask must be a CPU torch.bool tensor, got {mask.dtype} on {mask.device}")


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """:func:`sparselora.ops.masks.pack_bits` of a CPU bool mask, on the C++ kernel (threaded):
    the same bytes, in the layout :mod:`sparselora.ops.masks` defines."""
    _check_packable(mask)
    flat = mask.contiguous()
    out = torch.empty(packed_size(flat.numel()), dtype=torch.uint8)
    _C.pack_bits(flat.data_ptr(), flat.numel(), out.data_ptr(), _threads())
    return out


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask` for a mask of ``shape``."""
    if _C is None:
        raise RuntimeError(_IMPORT_ERROR)
    n = 1
    for d in shape:
        n *= int(d)
    size = packed_size(n)
    if packed.dtype != torch.uint8 or packed.numel() != size:
        raise ValueError(f"packed must be {size} uint8 bytes for shape {tuple(shape)}, got {packed.numel()} {packed.dtype}")
    src = packed.contiguous()
    out = torch.empty(tuple(shape), dtype=torch.bool)
    _C.unpack_bits(src.data_ptr(), n, out.data_ptr(), _threads())
    return out


def apply_packed_mask_(weight: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Zero ``weight`` in place where the packed mask has a 0 bit, without unpacking it."""
    reason = _first_reason(_IMPORT_ERROR, _tensor_reason(weight, "weight"),
                           None if weight.is_contiguous() else "weight is not contiguous")
    if reason:
        raise ValueError(reason)
    size = packed_size(weight.numel())
    if packed.dtype != torch.uint8 or packed.numel() != size:
        raise ValueError(f"packed must hold {size} uint8 bytes for a weight of {weight.numel()} elements")
    src = packed.contiguous()
    _C.apply_mask(weight.data_ptr(), _DTYPE_CODES[weight.dtype], weight.numel(), src.data_ptr(), _C.PACKED_BITS, _threads())
    return weight
