"""``sparselora stats``: global and per-layer sparsity of a mask file."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...pruning.mask_ops import compute_sparsity_stats, load_mask, plot_sparsity_histogram
from ..arguments import add_overwrite_option
from ..command import Command, Input, Output
from ..outputs import Outputs
from ..text import printable

__all__ = ["COMMAND"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("masks", type=Path)
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also write a histogram of layer sparsity")
    parser.add_argument("--per-layer", action="store_true", help="print every layer")
    add_overwrite_option(parser)


def _outputs(args: argparse.Namespace) -> list[Output]:
    return [Output("--plot", args.plot)] if args.plot is not None else []


def _run(args: argparse.Namespace, outputs: Outputs) -> int:
    masks, metadata = load_mask(args.masks)
    stats = compute_sparsity_stats(masks)
    g = stats["global"]
    print(f"{args.masks}: {g['num_layers']} masks, {g['total_params']:,} parameters, {g['total_pruned']:,} pruned")
    print(f"global sparsity {g['sparsity']:.4%}; per layer mean {g['mean_layer_sparsity']:.2%}, "
          f"std {g['std_layer_sparsity']:.2%}, min {g['min_layer_sparsity']:.2%}, max {g['max_layer_sparsity']:.2%}")
    if metadata:
        print("metadata: " + ", ".join(f"{printable(k)}={printable(v)}" for k, v in metadata.items()))
    if args.per_layer:
        for name, layer in stats["per_layer"].items():
            print(f"  {printable(name)}: {layer['sparsity']:.2%} of {layer['num_params']:,}")
    if args.plot:
        plot_sparsity_histogram(masks, save_path=args.plot)
        print(f"histogram -> {args.plot}")
    return 0


COMMAND = Command(
    name="stats",
    help="sparsity statistics of a mask file",
    description="Print global and per-layer sparsity of a mask file.",
    add_arguments=_add_arguments,
    inputs=(Input("masks", "masks"),),
    outputs=_outputs,
    run=_run,
)
