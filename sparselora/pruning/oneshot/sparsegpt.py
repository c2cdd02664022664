"""SparseGPT (Frantar & Alistarh, 2023): prune a Linear weight and rebuild the weights it keeps.

Removing weight ``w_ij`` changes the layer's output on the calibration inputs ``X`` by an
amount the Hessian of the squared reconstruction error, ``H = 2XXᵀ``, predicts; the optimal
correction of the remaining weights of row ``i`` is ``-(w_ij / [H⁻¹]_jj)·H⁻¹_j,:``. The
algorithm walks the columns left to right in blocks of ``block_size``. In each block it
chooses which weights go by ``w²/[H⁻¹]²_jj`` (over the block for unstructured sparsity, per
run of ``m`` columns for N:M), zeroes them one column at a time, spreads each column's
error over the columns still ahead inside the block, and then over the rest of the matrix
in one matrix product (the "lazy batch" update). The upper Cholesky factor of ``H⁻¹``
gives the needed rows of the successive inverses without ever updating ``H⁻¹`` itself.

Counts are exact: a weight at sparsity ``s`` loses ``round(s·n)`` weights, shared out over
the column blocks by cumulative rounding; inside a block, ties go lowest flat index first,
as every mask of the library does.
"""

from __future__ import annotations

import torch

from ... import ops
from ...rules import check_nm, check_number, check_positive_int, check_sparsity

__all__ = ["sparsegpt_prune_", "GramAccumulator", "check_damp"]


class GramAccumulator:
    """Running ``XᵀX`` (or only its diagonal) of one layer's inputs, in float64.

    Each batch's product is formed in fp32 (as the paper does) and added into a float64
    total, so that totals summed over batches in another grouping (shards of the batches
    on several ranks) agree bit for bit unless one entry's contributions span more than
    about 2^29 in magnitude.
    """

    def __init__(self, features: int, *, full: bool, device: torch.device | str = "cpu") -> None:
        shape = (features, features) if full else (features,)
        self.full = full
        self.total = torch.zeros(shape, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add a batch of inputs ``(..., features)``."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if self.full:
            self.total += (x.t() @ x).double()
        else:
            self.total += (x * x).sum(0).double()
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2XXᵀ / tokens`` in fp32: SparseGPT's Hessian (scale-free for the algorithm)."""
        if not self.full:
            raise ValueError("this accumulator keeps only the diagonal; build it with full=True")
        return (self.total * (2.0 / max(self.tokens, 1))).float()

    def feature_norms(self) -> torch.Tensor:
        """``‖X_j‖₂`` over every token seen: Wanda's input-feature norms."""
        diagonal = self.total.diagonal() if self.full else self.total
        return diagonal.sqrt().float()


def check_damp(damp: object, arg: str = "damp") -> float:
    """SparseGPT's dampening, a positive fraction of the mean Hessian diagonal (below 1000)."""
    return check_number(damp, arg, low=0.0, high=1e3, low_open=True, high_open=True,
                        wanted="a positive fraction of the mean Hessian diagonal, below 1000 (0.01 in the paper)")


def _check_args(weight: torch.Tensor, hessian: torch.Tensor, sparsity, n, m, block_size, damp) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError("weight must be a floating 2-D (out, in) tensor")
    cols = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian must be a ({cols}, {cols}) tensor for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(getattr(hessian, 'shape', ()))}")
    if (sparsity is None) == (n is None):
        raise ValueError("give exactly one of sparsity= (unstructured) and n=, m= (N:M)")
    if sparsity is not None:
        check_sparsity(sparsity)
    if n is not None:
        check_nm(n, m)
        if cols % m:
            raise ValueError(f"input size {cols} is not a multiple of m={m}")
    check_positive_int(block_size, "block_size")
    if n is not None and block_size % m:
        raise ValueError(f"block_size={block_size} must be a multiple of m={m}")
    check_damp(damp)


def _inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, with ``λ = damp · mean(diag H)``."""
    h = hessian.clone()
    diagonal = h.diagonal()
    diagonal.add_(damp * float(diagonal.mean()))
    try:
        lower = torch.linalg.cholesky(h)
    except RuntimeError as exc:  # torch reports a non-positive-definite matrix this way
        raise ValueError(f"the Hessian is not positive definite even after dampening ({exc}); "
                         "raise damp= or give more calibration data") from None
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


@torch.no_grad()
def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    *,
    n: int | None = None,
    m: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """Prune ``weight`` (``(out, in)``) in place with SparseGPT and return its keep-mask.

    ``hessian`` is ``2XXᵀ`` over the layer's calibration inputs (``(in, in)``; see
    :class:`GramAccumulator`). Give ``sparsity`` for unstructured pruning (exactly
    ``round(sparsity · numel)`` weights go) or ``n`` and ``m`` for N:M (``n`` kept in every
    run of ``m`` input weights). The kept weights are updated to make up for the pruned
    ones; the pruned ones become exactly 0. The computation runs in fp32 whatever the
    weight's dtype; the result is cast back. Inputs that never fire (zero Hessian diagonal)
    have their weights zeroed first, so they are the first to go.
    """
    _check_args(weight, hessian, sparsity, n, m, block_size, damp)
    rows, cols = weight.shape
    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device)
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h = h.clone()
        h.diagonal()[dead] = 1.0
        w[:, dead] = 0.0
    factor = _inverse_factor(h, damp)
    keep = torch.ones((rows, cols), dtype=torch.bool, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        width = end - start
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        factor_block = factor[start:end, start:end]
        diag = factor_block.diagonal()
        block_keep = torch.ones((rows, width), dtype=torch.bool, device=w.device)
        if sparsity is not None:
            # cumulative rounding: the blocks together lose exactly round(s · rows · cols)
            k = ops.prune_count(rows * end, sparsity) - ops.prune_count(rows * start, sparsity)
            if k:
                scores = block.square() / diag.square().unsqueeze(0)
                (block_keep,) = ops.select_prune_mask([scores], min(k, block.numel()))
        for j in range(width):
            if n is not None and j % m == 0:
                scores = block[:, j : j + m].square() / diag[j : j + m].square().unsqueeze(0)
                block_keep[:, j : j + m] = ops.nm_prune_mask(scores, n, m)  # ties: lowest index pruned first
            column = block[:, j]
            pruned = column * ~block_keep[:, j]
            error = pruned / diag[j]
            # the pruned weights' error moves onto the columns still ahead in this block
            block[:, j:] -= error.unsqueeze(1) * factor_block[j, j:].unsqueeze(0)
            block[:, j] = torch.where(block_keep[:, j], block[:, j], torch.zeros((), dtype=block.dtype))
            errors[:, j] = error
        w[:, start:end] = block
        keep[:, start:end] = block_keep
        if end < cols:
            w[:, end:] -= errors @ factor[start:end, end:]
    weight.copy_(w.to(weight.dtype))
    # a rounding of a kept weight to zero is fine; a pruned weight must be exactly zero
    ops.apply_mask_(weight, keep)
    return keep
