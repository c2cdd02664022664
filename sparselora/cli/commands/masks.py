"""``sparselora masks``: magnitude masks of a checkpoint on disk, one tensor at a time."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ...io.atomic import staging_dir
from ...io.mask_files import convert_mask_file, resolve_format
from ...io.packed_masks import MASK_INDEX_NAME
from ...pruning.streaming import MASK_SHARD_NAME, SCOPES, compute_checkpoint_masks
from ..arguments import add_overwrite_option, add_progress_option, progress, sparsity
from ..command import Command, Input, Output
from ..outputs import Outputs

__all__ = ["COMMAND"]

# what compute_checkpoint_masks adds to a directory output (a failed run removes them)
_DIRECTORY_ENTRIES = (MASK_SHARD_NAME.format(rank="*", world="*"), MASK_INDEX_NAME)
_ACCEPTED = ".safetensors (packed), .pt, .npz, or a directory (no suffix, or ending in '/')"


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--sparsity", type=sparsity, required=True, help="fraction of the target weights pruned")
    parser.add_argument("--method", choices=["unstructured"], default="unstructured",
                        help="pruning method (default unstructured)")
    parser.add_argument("--metric", choices=["magnitude"], default="magnitude",
                        help="importance metric (default magnitude)")
    parser.add_argument("--scope", choices=SCOPES, default="global",
                        help="one threshold for all weights (global, default) or the same fraction per weight (layer)")
    parser.add_argument("--include", action="append", metavar="GLOB", help="only weights matching GLOB (repeatable)")
    parser.add_argument("--exclude", action="append", metavar="GLOB", help="skip weights matching GLOB (repeatable)")
    parser.add_argument("-o", "--output", required=True,
                        help="MASKS.safetensors (packed, one file), MASKS.pt or MASKS.npz (unpacked), or a directory "
                        "(no suffix, or ending in '/': one packed shard per rank + index)")
    parser.add_argument("--distributed", action="store_true", help="split the work across torchrun ranks")
    add_progress_option(parser)
    add_overwrite_option(parser)


def _output_kind(raw: str, distributed: bool) -> str:
    """'directory', 'safetensors', 'pt' or 'npz' for ``masks -o RAW``."""
    path = Path(raw)
    if raw.endswith(("/", os.sep)) and path.suffix.lower() == ".safetensors" and not path.is_dir():
        raise ValueError(f"--output {raw!r}: a name ending in .safetensors is one file; name the directory otherwise")
    if raw.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        return "directory"
    try:
        kind = resolve_format(f"masks{path.suffix}", None)  # by the suffix alone, as save_mask reads it
    except ValueError:
        raise ValueError(f"--output {raw!r}: unknown suffix {path.suffix!r}; accepted: {_ACCEPTED}") from None
    if distributed:
        raise ValueError(f"--output {raw!r}: with --distributed the output is a directory (one shard per rank); "
                         "give a path without a suffix or ending in '/'")
    return kind


def _outputs(args: argparse.Namespace) -> list[Output]:
    _output_kind(args.output, args.distributed)  # a malformed output is refused first
    return [Output("--output", Path(args.output), _DIRECTORY_ENTRIES)]


def _run(args: argparse.Namespace, outputs: Outputs) -> int:
    kind = _output_kind(args.output, args.distributed)
    output = Path(args.output)

    def compute(target: Path, overwrite: bool) -> dict:
        return compute_checkpoint_masks(
            args.checkpoint, args.sparsity, target, scope=args.scope, include=args.include, exclude=args.exclude,
            overwrite=overwrite, progress=progress(args), distributed=args.distributed,
        )

    if kind == "directory" or output.suffix == ".safetensors":
        summary = compute(output, args.overwrite)
    else:
        # packed masks are what streaming writes: they go to a staging folder beside the
        # output, then are converted to the format asked for
        staging = staging_dir(output)
        outputs.created(staging)
        try:
            packed = staging / "masks.safetensors"
            outputs.aliases[str(packed)] = args.output
            summary = compute(packed, False)
            if kind == "safetensors":
                os.replace(packed, output)
            else:
                convert_mask_file(packed, output, kind)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if summary["rank"] == 0:
        print(f"{len(summary['targets'])} weights, {summary['total']:,} parameters: {summary['total_pruned']:,} pruned "
              f"({summary['sparsity']:.4%}, scope {args.scope}) in {summary['seconds']:.1f} s on {summary['world']} "
              f"process(es) -> {args.output}")
    return 0


COMMAND = Command(
    name="masks",
    help="magnitude masks of a checkpoint on disk, one tensor at a time (packed safetensors)",
    description="Compute exact magnitude pruning masks for a checkpoint (a .safetensors file, a directory with a "
    "*.safetensors.index.json, or a .pt/.bin state dict) without loading it whole. Under torchrun, --distributed "
    "splits the tensors across ranks and gives the same masks.",
    add_arguments=_add_arguments,
    inputs=(Input("checkpoint", "checkpoint"),),
    outputs=_outputs,
    run=_run,
)
