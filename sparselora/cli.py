"""Command-line interface: ``sparselora <command>`` (also ``python -m sparselora``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparselora", description="Pruning masks and sparsity-preserving LoRA for PyTorch models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a small transformer, prune it, recover it with sparse LoRA (no download, ~1 min)",
        description="Train a small byte-level transformer on Python's own docstrings, prune it with "
        "global magnitude masks, recover it with sparse_to_sparse LoRA, merge, and validate sparsity.",
    )
    demo.add_argument("--sparsity", type=_fraction, default=0.7, help="fraction of weights pruned (default 0.7)")
    demo.add_argument("--dense-steps", type=_positive_int, default=400, help="dense training steps (default 400)")
    demo.add_argument("--lora-steps", type=_positive_int, default=200, help="sparse LoRA steps (default 200)")
    demo.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("-o", "--output-dir", type=Path, default=Path("sparselora-demo"),
                      help="where masks and the histogram go (default ./sparselora-demo)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    if not args.output_dir.parent.exists():
        raise ValueError(f"--output-dir: parent directory {str(args.output_dir.parent)!r} does not exist")
    result = run_demo(
        DemoSettings(
            sparsity=args.sparsity, dense_steps=args.dense_steps, lora_steps=args.lora_steps,
            lora_rank=args.rank, seed=args.seed, output_dir=args.output_dir,
            progress=False if args.no_progress else None,
        )
    )
    return 0 if result["sparsity_preserved"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparselora`` console script."""
    args = build_parser().parse_args(argv)
    handlers = {"demo": _run_demo}
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"sparselora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
