"""``sparselora apply``: a pruned copy of a checkpoint, zeros baked in."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...pruning.checkpoint_ops import apply_masks_to_checkpoint
from ..arguments import add_overwrite_option, add_progress_option, progress
from ..command import Command, Input, Output
from ..outputs import Outputs

__all__ = ["COMMAND"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("masks", type=Path)
    parser.add_argument("-o", "--output-dir", type=Path, required=True)
    add_progress_option(parser)
    add_overwrite_option(parser)


def _outputs(args: argparse.Namespace) -> list[Output]:
    return [Output("--output-dir", args.output_dir)]


def _run(args: argparse.Namespace, outputs: Outputs) -> int:
    summary = apply_masks_to_checkpoint(args.checkpoint, args.masks, args.output_dir, overwrite=args.overwrite,
                                        progress=progress(args))
    print(f"{summary['tensors']} tensors written, {summary['masked']} masked, {summary['pruned']:,} weights zeroed "
          f"in {summary['seconds']:.1f} s -> {summary['output']}")
    return 0


COMMAND = Command(
    name="apply",
    help="write a pruned copy of a checkpoint (zeros baked in)",
    description="Copy a safetensors checkpoint (single file or shards with index) into OUT_DIR with the pruned "
    "weights set to zero, keeping shard names, tensor order and dtypes.",
    add_arguments=_add_arguments,
    inputs=(Input("checkpoint", "checkpoint"), Input("masks", "masks")),
    outputs=_outputs,
    run=_run,
)
