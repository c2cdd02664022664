"""``sparselora validate``: are the weights a mask prunes zero in a checkpoint? (exit 0 / 1)"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...pruning.checkpoint_ops import validate_checkpoint_masks
from ...rules import check_number
from ..arguments import add_progress_option, checked, progress
from ..command import Command, Input
from ..outputs import Outputs
from ..text import printable

__all__ = ["COMMAND"]


def _tolerance(value: float, flag: str) -> float:
    return check_number(value, flag, low=0.0)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("masks", type=Path)
    parser.add_argument("--tolerance", type=checked(_tolerance, "--tolerance"), default=0.0,
                        help="largest |w| counted as zero (default 0)")
    add_progress_option(parser)


def _run(args: argparse.Namespace, outputs: Outputs) -> int:
    ok, report = validate_checkpoint_masks(args.checkpoint, args.masks, args.tolerance, progress=progress(args))
    g = report["global"]
    print(f"{'valid' if ok else 'INVALID'}: {g['total_violations']:,} of {g['total_pruned']:,} pruned weights are "
          f"non-zero ({g['violation_rate']:.4%}) in {g['num_layers']} tensors")
    for name in g["layers_with_violations"][:20]:
        print(f"  {printable(name)}: {report['per_layer'][name]['violations']:,} violations")
    return 0 if ok else 1


COMMAND = Command(
    name="validate",
    help="check that the weights a mask prunes are zero in a checkpoint",
    description="Exit 0 when every pruned weight is zero (|w| <= --tolerance), 1 otherwise.",
    add_arguments=_add_arguments,
    inputs=(Input("checkpoint", "checkpoint"), Input("masks", "masks")),
    run=_run,
)
