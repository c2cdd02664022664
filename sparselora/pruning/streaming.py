"""Masks for checkpoints larger than RAM, on one process or many.

Tensors are read one at a time. With one global threshold, pass 1 sums a 65536-bin
histogram of the high 16 bits of every |w| key, pass 2 the low-bit histogram inside the
bucket holding the k-th key, which gives the exact cut (bf16 checkpoints skip pass 2:
their keys have no low half); the last pass writes each mask as soon as it is made. Memory stays at about one tensor plus its mask. Histograms add, so
shards and ranks combine by summation (``torch.distributed.all_reduce``); every rank
derives the same cut, ties are shared out in checkpoint order, and the masks equal the
single-process ones bit for bit.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from tqdm.auto import tqdm

from .. import ops
from ..progress import bar_disabled
from ..rules import check_sparsity
from ..io.atomic import staging_dir, swap_directory
from ..io.checkpoints import Checkpoint, StateDictSource, open_source
from ..io.packed_masks import PackedMaskWriter, count_kept, write_mask_index
from ..io.paths import check_apart
from ..distributed import Ranks, owners
from .targets import (
    SparsitySpec,
    Target,
    config_embedding_names,
    described_targets,
    filter_targets,
    resolve_sparsity,
    warn_overpruned,
)

__all__ = ["compute_checkpoint_masks", "compute_sharded_masks", "stream_masks", "SCOPES", "MASK_SHARD_NAME"]

SCOPES = ("global", "layer")
PathLike = Union[str, os.PathLike]
Globs = Union[str, Sequence[str], None]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _named(source, name: str, op: Callable[[torch.Tensor], Any], tensor: torch.Tensor) -> Any:
    """``op(tensor)``, with a ValueError (NaN/inf scores) naming the tensor and its file."""
    try:
        return op(tensor)
    except ValueError as exc:
        where = getattr(source, "file_of", None)
        in_file = f" in {str(where(name))!r}" if where is not None else ""
        raise ValueError(f"tensor {name!r}{in_file}: {exc}") from None


def stream_masks(
    source,
    sparsity: SparsitySpec,
    write: Callable[[str, torch.Tensor], None],
    write_packed: Callable[[str, torch.Tensor], None] | None = None,
    *,
    scope: str = "global",
    include: Globs = None,
    exclude: Globs = None,
    progress: bool | None = None,
    ranks: Ranks | None = None,
    targets: list[Target] | None = None,
) -> dict[str, Any]:
    """Magnitude masks of ``source``'s targets, handed to ``write(name, mask)`` one by one
    (or, when given, to ``write_packed(name, packed_bytes)``, which skips the bool mask).

    Returns a summary: targets, pruned counts and the cut.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is unknown; accepted: {', '.join(SCOPES)}")
    ranks = ranks or Ranks(False)
    if targets is None:
        targets = filter_targets(described_targets(source.names, source.shape, source.dtype), include, exclude)
    if not targets:
        raise ValueError("the checkpoint has no prunable weights (floating *weight tensors with >= 2 dims)")
    sparsities = resolve_sparsity(sparsity, targets)
    targets = [t for t in targets if t.name in sparsities]
    numel = {t.name: _numel(source.shape(t.name)) for t in targets}
    mine = ranks.assign(targets, numel.__getitem__)
    bar = dict(unit="tensor", disable=bar_disabled(progress))
    pruned: dict[str, int] = {}

    scratch = source.scratch()  # one read buffer for every tensor of a pass

    def read(name: str) -> torch.Tensor:
        return source.read(name, scratch)

    def emit(name: str, mask: torch.Tensor) -> None:
        pruned[name] = int(mask.numel() - torch.count_nonzero(mask))
        write(name, mask)

    threshold = None
    if scope == "layer":
        for t in tqdm(mine, desc="masks", **bar):
            k = ops.prune_count(numel[t.name], sparsities[t.name])
            emit(t.name, _named(source, t.name, lambda w: ops.select_prune_mask([w], k, absolute=True)[0], read(t.name)))
    else:
        values = set(sparsities.values())
        if len(values) != 1:
            raise ValueError("scope='global' needs one sparsity for every weight; got a per-layer mapping")
        total = sum(numel.values())
        k = ops.prune_count(total, values.pop())

        def histogram(high: int) -> torch.Tensor:
            counts = torch.zeros(65536, dtype=torch.int64)
            desc = "pass 1: histogram" if high < 0 else "pass 2: histogram"
            for t in tqdm(mine, desc=desc, **bar):
                counts += _named(source, t.name, lambda w: ops.key_histogram(w, absolute=True, high=high), read(t.name))
            return ranks.sum(counts)

        # bf16 keys have a zero low half: a bf16 checkpoint is read once to find the cut
        bf16 = all(source.dtype(t.name) == torch.bfloat16 for t in targets)
        threshold = ops.streaming_threshold(histogram, k, total, absolute=True, bf16=bf16)
        quota = _tie_quota(read, targets, mine, threshold, ranks, bar)
        ties_left = threshold.ties
        for t in tqdm(mine, desc="last pass: masks", **bar):
            allowed = ties_left if quota is None else quota[t.name]
            mask, used = ops.write_prune_mask(read(t.name), threshold, allowed, absolute=True, packed=write_packed is not None)
            ties_left -= used
            if write_packed is None:
                emit(t.name, mask)
            else:
                pruned[t.name] = numel[t.name] - count_kept(mask)
                write_packed(t.name, mask)
    counts = torch.tensor([pruned.get(t.name, 0) for t in targets], dtype=torch.int64)
    ranks.sum(counts)
    if scope == "global" and ranks.rank == 0:
        warn_overpruned(dict(zip((t.name for t in targets), counts.tolist())), numel)
    return {
        "targets": [t.name for t in targets],
        "written": [t.name for t in mine],
        "numel": numel,
        "pruned": dict(zip((t.name for t in targets), counts.tolist())),
        "threshold": None if threshold is None else threshold.value,
    }


def _tie_quotas(
    threshold: ops.PruneThreshold, places: int, local: Iterable[tuple[int, torch.Tensor]],
    all_sum: Callable[[torch.Tensor], torch.Tensor],
) -> list[int]:
    """How many scores equal to the cut each of ``places`` may prune, the group's ties going
    to the earliest places. ``local`` yields (place, tensor) for this rank's tensors (read
    only when the cut has ties); ``all_sum`` adds the tie counts of every rank in place."""
    tied = torch.zeros(places, dtype=torch.int64)
    if threshold.ties:
        for place, tensor in local:
            tied[place] = ops.keys.tie_count(lambda high: ops.key_histogram(tensor, absolute=True, high=high),
                                             threshold, absolute=True)
        all_sum(tied)
    return ops.keys.tie_quotas(tied.tolist(), threshold.ties)


def _tie_quota(read, targets, mine, threshold, ranks: Ranks, bar) -> dict[str, int] | None:
    """How many scores equal to the cut each target prunes: the group's ties go to the
    earliest targets in checkpoint order. None for one process, which walks every target
    in order and hands the remaining ties along."""
    if ranks.world == 1:
        return None
    names = [t.name for t in targets]
    position = {n: i for i, n in enumerate(names)}

    def local():  # a generator: nothing is read, and no bar shown, when the cut has no ties
        for t in tqdm(mine, desc="ties", **bar):
            yield position[t.name], read(t.name)

    return dict(zip(names, _tie_quotas(threshold, len(names), local(), ranks.sum)))


# the shard each rank writes into a directory output, beside masks.safetensors.index.json
MASK_SHARD_NAME = "masks-{rank}-of-{world}.safetensors"


def _shard_name(rank: int, world: int) -> str:
    return MASK_SHARD_NAME.format(rank=f"{rank + 1:05d}", world=f"{world:05d}")


def _write_masks(source, sparsity, path: Path, mine, meta, scope, progress, ranks, targets) -> dict[str, Any]:
    with PackedMaskWriter(path, {t.name: source.shape(t.name) for t in mine}, meta) as writer:
        return stream_masks(source, sparsity, writer.write, writer.write_packed, scope=scope, progress=progress,
                            ranks=ranks, targets=targets)


def compute_checkpoint_masks(
    checkpoint: Union[PathLike, Mapping[str, torch.Tensor], Checkpoint, StateDictSource],
    sparsity: SparsitySpec,
    output: PathLike,
    *,
    scope: str = "global",
    include: Globs = None,
    exclude: Globs = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """Magnitude masks of a checkpoint, written as packed masks while they are made.

    ``output`` ending in ``.safetensors`` is one file; otherwise it is a directory that gets
    one shard per rank plus ``masks.safetensors.index.json`` (always so with
    ``distributed=True``, under ``torchrun``). Nothing existing is replaced without
    ``overwrite=True``. Returns a summary (targets, pruned counts, cut, seconds).

    Targets follow :func:`~.targets.is_default_target`; beside a ``config.json``, the
    model's embeddings also stay dense whatever they are called (GPT-2's ``wte``, ``wpe``).
    """
    start = time.perf_counter()
    source = open_source(checkpoint)
    output = Path(output)
    single_file = output.suffix == ".safetensors"
    if distributed and single_file:
        raise ValueError(f"output {str(output)!r}: with distributed=True the output is a directory (one shard per rank)")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output directory {str(output.parent)!r} does not exist")
    if getattr(source, "path", None) is not None:
        check_apart(output, [source.path, *source.files])
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {str(output)!r} exists; pass overwrite=True to replace it")
    if output.exists() and single_file == output.is_dir():
        kind = "a directory" if output.is_dir() else "a file"
        raise ValueError(f"output {str(output)!r} is {kind}; it is not replaced by a {'file' if single_file else 'directory'}")
    ranks = Ranks(distributed)
    # a Hugging Face folder says which tensors are embeddings, whatever their names
    path = getattr(source, "path", None)
    embeddings = config_embedding_names(path) if path is not None else ()
    targets = filter_targets(described_targets(source.names, source.shape, source.dtype, embeddings), include, exclude)
    if not targets:
        raise ValueError("the checkpoint has no prunable weights (floating *weight tensors with >= 2 dims)")
    sparsities = resolve_sparsity(sparsity, targets)
    targets = [t for t in targets if t.name in sparsities]
    mine = ranks.assign(targets, lambda n: _numel(source.shape(n)))
    meta = {
        "sparsity": sparsity if not isinstance(sparsity, Mapping) else dict(sparsity),
        "method": "unstructured",
        "importance": "magnitude",
        "scope": scope,
        "source": str(getattr(source, "path", "state_dict")),
        **dict(metadata or {}),
    }
    if single_file:
        summary = _write_masks(source, sparsity, output, mine, meta, scope, progress, ranks, targets)
    elif ranks.world == 1:
        # the shards and the index are written beside, then swapped in: an old output stays
        # whole until the new one is complete, and a failure leaves nothing behind
        staging = staging_dir(output)
        try:
            summary = _write_masks(source, sparsity, staging / _shard_name(0, 1), mine, meta, scope, progress,
                                   ranks, targets)
            write_mask_index(staging, {t.name: _shard_name(0, 1) for t in targets}, meta)
            swap_directory(staging, output)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    else:
        created = not output.exists()
        if ranks.rank == 0:
            output.mkdir(exist_ok=True)
        ranks.barrier()
        try:
            summary = _write_masks(source, sparsity, output / _shard_name(ranks.rank, ranks.world), mine, meta, scope,
                                   progress, ranks, targets)
            ranks.barrier()
            if ranks.rank == 0:
                owner_ranks = owners(targets, lambda n: _numel(source.shape(n)), ranks.world)
                weight_map = {t.name: _shard_name(r, ranks.world) for t, r in zip(targets, owner_ranks)}
                write_mask_index(output, weight_map, meta)
            ranks.barrier()
        except BaseException:
            if created and ranks.rank == 0:
                shutil.rmtree(output, ignore_errors=True)
            raise
    ranks.close()
    total = sum(summary["numel"].values())
    pruned = sum(summary["pruned"].values())
    summary.update(output=str(output), total=total, total_pruned=pruned, sparsity=pruned / total if total else 0.0,
                   seconds=time.perf_counter() - start, rank=ranks.rank, world=ranks.world)
    return summary


def compute_sharded_masks(
    local_tensors: Mapping[str, torch.Tensor], sparsity: float, *, group=None
) -> dict[str, torch.Tensor]:
    """Global magnitude masks for a model whose parameters are sharded across ranks.

    Each rank passes its local shards (``{name: tensor}``, e.g. FSDP flat-parameter pieces
    or ``DTensor.to_local()``; DTensors are unwrapped) and gets the masks of those shards.
    One exact threshold holds across all ranks: histograms and tie counts are summed with
    ``torch.distributed.all_reduce``. Ties go to the earliest shards in (rank, name order).
    Every rank must call this collectively, with the process group already initialised.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("compute_sharded_masks needs an initialised torch.distributed process group")
    sparsity = check_sparsity(sparsity)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local = {n: (t.to_local() if hasattr(t, "to_local") else t).detach() for n, t in local_tensors.items()}
    names = list(local)

    def all_sum(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    total = int(all_sum(torch.tensor([sum(t.numel() for t in local.values())], dtype=torch.int64)).item())
    k = ops.prune_count(total, sparsity)

    def histogram(high: int) -> torch.Tensor:
        counts = torch.zeros(65536, dtype=torch.int64)
        for t in local.values():
            counts += ops.key_histogram(t.cpu(), absolute=True, high=high)
        return all_sum(counts)

    threshold = ops.streaming_threshold(histogram, k, total, absolute=True)
    max_names = int(all_sum(torch.tensor([len(names)], dtype=torch.int64)).item())  # room for every rank's list
    first = rank * max_names  # ties of earlier ranks come first
    quotas = _tie_quotas(threshold, world * max_names,
                         ((first + i, local[name].cpu()) for i, name in enumerate(names)), all_sum)
    masks = {}
    for i, name in enumerate(names):
        mask, _ = ops.write_prune_mask(local[name], threshold, quotas[first + i], absolute=True)
        masks[name] = mask
    return masks
