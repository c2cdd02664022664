"""Block reconstruction: a pruned decoder block's kept weights trained to give back what the
dense block gave, on the calibration batches, before the next block is calibrated.

What trains is the pruned weights themselves under their masks: the gradient of every pruned
entry is zeroed before the all-reduce and the optimizer step, so Adam's moments of those
entries stay zero and the entries never leave exactly 0 (the mask is applied once more after
each step to say so in code, not to repair anything). The loss is the mean squared error
between the block's output and the target, summed per batch and normalised by the number of
elements of the step, so one process and any number of ranks take the same step.

The target is either the dense block's output on the *dense* model's inputs (``"dense"``: the
engine carries a second stream of activations, one more store the size of the inputs, and
the block learns to correct the error of the pruned blocks before it) or the dense block's
output on the pruned inputs (``"pruned"``: the block only learns to undo its own pruning).

A slice of the batches is held out: the block's error on it is measured before and after,
and a reconstruction that does not lower it is undone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ...distributed import Ranks
from ...rules import check_choice, check_int, check_number, check_positive_int
from ..targets import Target
from .activations import block_output

__all__ = ["Reconstruction", "as_reconstruction", "reconstruct_block", "split_batches", "check_lr",
           "RECONSTRUCTION_TARGETS"]

RECONSTRUCTION_TARGETS = ("dense", "pruned")
PRECISIONS = ("auto", "fp32", "bf16")


def check_lr(value: object, arg: str = "lr") -> float:
    """A learning rate: a finite number > 0."""
    return check_number(value, arg, low=0.0, low_open=True)


@dataclass(frozen=True)
class Reconstruction:
    """How each pruned block is reconstructed.

    ``steps`` Adam steps per block, each on ``batch`` calibration batches, at learning rate
    ``lr`` times the root-mean-square of each weight's kept entries (a relative step: one
    default for weights of any scale), with cosine decay to 0 over the steps. ``holdout``
    is the fraction of the calibration batches kept out of training to guard each block (at
    least one when there are two or more; with one batch the guard measures on it); ``target`` is ``"dense"`` (the dense
    model's activations) or ``"pruned"`` (the dense block on the pruned inputs); ``seed``
    fixes the order of the batches. ``precision`` is that of the training steps' matrix
    products: ``"fp32"``, or ``"bf16"`` under autocast (the weights, their gradients and
    the optimizer stay fp32; the held-out guard measures in fp32 either way); ``"auto"``
    takes bf16 where the hardware multiplies it natively (CUDA GPUs that support it, CPUs
    with AMX or AVX512-BF16) and fp32 elsewhere.
    """

    steps: int = 24
    lr: float = 0.025
    batch: int = 1
    holdout: float = 0.125
    target: str = "dense"
    seed: int = 0
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_positive_int(self.steps, "steps")
        check_lr(self.lr)
        check_positive_int(self.batch, "batch")
        check_number(self.holdout, "holdout", low=0.0, high=1.0, high_open=True)
        check_choice(self.target, "target", RECONSTRUCTION_TARGETS)
        check_int(self.seed, "seed")
        check_choice(self.precision, "precision", PRECISIONS)


def as_reconstruction(value: Any) -> Reconstruction | None:
    """``reconstruct=`` as given to the one-shot calls: False/None (off), True (defaults), a
    :class:`Reconstruction`, or a dict of its fields."""
    if value is None or value is False:
        return None
    if value is True:
        return Reconstruction()
    if isinstance(value, Reconstruction):
        return value
    if isinstance(value, Mapping):
        return Reconstruction(**value)
    raise TypeError(f"reconstruct={value!r} must be True, False, a Reconstruction or a dict of its fields "
                    "(steps, lr, batch, holdout, target, seed, precision)")


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors inside a block call's arguments, in ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (and so faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return any(probe is not None and probe() for probe in probes)
    return False


def _cast_parameters(block: nn.Module, dtypes: Callable[[nn.Parameter], torch.dtype]) -> None:
    """Each floating parameter of the block in ``dtypes(parameter)``, the Parameter objects
    kept (buffers, e.g. rotary frequencies, are left in their own dtype)."""
    for p in block.parameters():
        if p.is_floating_point() and p.dtype != dtypes(p):
            p.data = p.data.to(dtypes(p))


def split_batches(count: int, options: Reconstruction) -> tuple[list[int], list[int]]:
    """(training, held-out) global batch indices, the same on every rank."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(options.seed)).tolist()
    held = max(1, round(count * options.holdout)) if count >= 2 and options.holdout > 0 else 0
    held_out = sorted(order[:held])
    training = sorted(order[held:])
    return training, held_out or training


def _schedule(training: Sequence[int], options: Reconstruction, block_index: int) -> list[list[int]]:
    """The global batch indices of every step: epochs over the training batches, each in its
    own seeded order."""
    gen = torch.Generator().manual_seed(options.seed * 1_000_003 + block_index)
    steps: list[list[int]] = []
    queue: list[int] = []
    while len(steps) < options.steps:
        while len(queue) < options.batch:
            queue += [training[i] for i in torch.randperm(len(training), generator=gen).tolist()]
        steps.append(queue[: options.batch])
        queue = queue[options.batch :]
    return steps


class _Run:
    """One block's reconstruction: its batches, its error, its training step."""

    def __init__(self, block: nn.Module, inputs, targets, extras: list[tuple], ranks: Ranks, dtype: torch.dtype):
        self.block, self.inputs, self.targets, self.extras = block, inputs, targets, extras
        self.ranks, self.dtype = ranks, dtype

    def local(self, global_index: int) -> int | None:
        """This rank's position of a global batch (None when another rank holds it)."""
        if global_index % self.ranks.world != self.ranks.rank:
            return None
        return global_index // self.ranks.world

    def squared_error(self, local: int, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(sum of squared errors, sum of squared targets, elements) of one batch, in float32
        (the block's products in bf16 with ``autocast``)."""
        args, kwargs = self.extras[local]
        x = self.inputs[local].to(self.dtype)
        y = self.targets[local].to(torch.float32)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = block_output(self.block(x, *_cast(args, self.dtype), **_cast(kwargs, self.dtype)))
        out = out.float()
        return (out - y).pow(2).sum(), y.pow(2).sum(), y.numel()

    @torch.no_grad()
    def relative_error(self, batches: Sequence[int]) -> float:
        """``Σ‖out − y‖² / Σ‖y‖²`` over ``batches``, summed over the ranks."""
        totals = torch.zeros(2, dtype=torch.float64)
        for g in batches:
            local = self.local(g)
            if local is not None:
                error, norm, _ = self.squared_error(local)
                totals += torch.stack([error.double(), norm.double()])
        self.ranks.sum(totals)
        return float(totals[0] / totals[1]) if totals[1] > 0 else 0.0


def reconstruct_block(
    block: nn.Module,
    targets: Sequence[Target],
    masks: Mapping[str, torch.Tensor],
    inputs,
    dense_outputs,
    extras: list[tuple],
    options: Reconstruction,
    *,
    batch_count: int,
    block_index: int,
    ranks: Ranks | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the kept weights of the pruned ``targets`` of ``block`` so that its outputs on
    ``inputs`` approach ``dense_outputs``; keep the result only when it lowers the held-out
    error. ``inputs``, ``dense_outputs`` and ``extras`` hold this rank's batches (every
    ``world``-th of the ``batch_count`` global ones); ``masks`` maps target names to keep-masks
    in the weights' layout. Returns ``{"before", "after", "kept", "steps"}`` (relative held-out
    errors).
    """
    ranks = ranks or Ranks(False)
    training, held_out = split_batches(batch_count, options)
    weights = [t.weight for t in targets]
    keeps = [masks[t.name].to(w.device) for t, w in zip(targets, weights)]
    stored = {id(p): p.dtype for p in block.parameters()}
    # fp32 for the training whatever the block is stored in; cast back (zeros stay zeros) at the end
    work = torch.float32
    flags = {id(p): p.requires_grad for p in block.parameters()}
    original = [w.detach().clone() for w in weights]
    _cast_parameters(block, lambda _p: work)
    run = _Run(block, inputs, dense_outputs, extras, ranks, work)
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        before = run.relative_error(held_out)
        # Adam moves every entry by about lr per step whatever its size: the step is made
        # relative to each weight's RMS, so that one default suits models whose weights differ
        # tenfold in scale
        scales = [float(w.detach()[keep].float().pow(2).mean().sqrt()) if bool(keep.any()) else 0.0
                  for w, keep in zip(weights, keeps)]
        optimizer = torch.optim.Adam([{"params": [w], "lr": 0.0} for w in weights])
        schedule = _schedule(training, options, block_index)
        device = weights[0].device
        autocast = options.precision == "bf16" or (options.precision == "auto" and bf16_is_native(device))
        with torch.enable_grad():
            for step, batches in enumerate(schedule):
                decay = 0.5 * (1 + math.cos(math.pi * step / len(schedule)))
                for group, scale in zip(optimizer.param_groups, scales):
                    group["lr"] = options.lr * scale * decay
                # elements, squared errors, squared targets of the step's batches, over the ranks
                totals = torch.zeros(3, dtype=torch.float64)
                for g in batches:
                    local = run.local(g)
                    if local is None:
                        continue
                    error, norm, elements = run.squared_error(local, autocast)
                    error.backward()
                    totals += torch.tensor([elements, float(error.detach()), float(norm)], dtype=torch.float64)
                ranks.sum(totals)
                count = totals[0]
                for w, keep in zip(weights, keeps):
                    if w.grad is None:
                        w.grad = torch.zeros_like(w)
                    w.grad.mul_(keep)
                    ranks.sum(w.grad)
                    w.grad.div_(max(float(count), 1.0))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for w, keep in zip(weights, keeps):
                        w.mul_(keep)
                if report is not None:
                    training = float(totals[1] / totals[2]) if totals[2] > 0 else 0.0
                    report(f"step {step + 1}/{len(schedule)}, loss {before:.3g} → {training:.3g}")
        del optimizer
        after = run.relative_error(held_out)
        kept = after < before
        if not kept:
            with torch.no_grad():
                for w, saved in zip(weights, original):
                    w.copy_(saved)
    finally:
        for w in weights:
            w.grad = None
        _cast_parameters(block, lambda p: stored[id(p)])
        for p in block.parameters():
            p.requires_grad_(flags.get(id(p), False))
    if report is not None:
        report(f"loss {before:.3g} → {after:.3g}" + ("" if kept else " (not kept)"))
    return {"block": block_index, "before": before, "after": after, "kept": kept, "steps": options.steps}
