"""Ranks under ``torch.distributed``: who this process is, sums across processes, who owns what.

One process without ``distributed=True`` is rank 0 of a world of 1, and every helper here is
then a no-op, so callers need no second code path. A process group sparselora starts itself
(under ``torchrun``) is torn down by the call that started it.
"""

from __future__ import annotations

import atexit
import os
from typing import Callable, Sequence, TypeVar

import torch

__all__ = ["Ranks", "owners"]

Item = TypeVar("Item")


def _destroy_group_at_exit() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class Ranks:
    """This process's place among the ranks; one rank when not distributed."""

    def __init__(self, distributed: bool) -> None:
        self.distributed = distributed
        self.owns_group = False  # True when this object started the process group
        if distributed:
            import torch.distributed as dist

            if not dist.is_available():
                raise RuntimeError("torch.distributed is not available in this torch build")
            if not dist.is_initialized():
                if "RANK" not in os.environ:
                    raise RuntimeError("distributed=True needs torchrun (RANK/WORLD_SIZE unset) or an initialised process group")
                if torch.cuda.is_available():
                    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
                self.owns_group = True
                # after a failure the group is left to exit time: torn down there, not left up
                atexit.register(_destroy_group_at_exit)
            self.dist = dist
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            # NCCL reduces CUDA tensors only; the sums here are small host tensors
            self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        else:
            self.rank, self.world = 0, 1
            self.device = None

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (through the GPU when the group is NCCL's)."""
        if self.distributed:
            if self.device is not None and tensor.device != self.device:
                staged = tensor.to(self.device)
                self.dist.all_reduce(staged, op=self.dist.ReduceOp.SUM)
                tensor.copy_(staged)
            else:
                self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            self.dist.barrier()

    def close(self) -> None:
        """After a successful run: tear down the process group this object started, every
        rank together (a group's threads outliving the other ranks can abort at exit)."""
        if self.owns_group and self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()

    def assign(self, targets: list[Item], numel: Callable[[str], int]) -> list[Item]:
        """This rank's targets."""
        ranks = owners(targets, numel, self.world)
        return [t for t, owner in zip(targets, ranks) if owner == self.rank]


def owners(targets: Sequence, numel: Callable[[str], int], world: int) -> list[int]:
    """Rank of each target: greedy by size in checkpoint order, the same on every rank."""
    load = [0] * world
    result = []
    for t in targets:
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += numel(t.name)
        result.append(owner)
    return result
