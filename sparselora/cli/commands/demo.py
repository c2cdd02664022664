"""``sparselora demo``: train a small transformer, prune it, recover it with sparse LoRA."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...demo import DemoSettings, run_demo
from ...rules import check_int, check_positive_int
from ..arguments import add_progress_option, checked, integer, progress, sparsity
from ..command import Command, Output
from ..outputs import Outputs

__all__ = ["COMMAND"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sparsity", type=sparsity, default=0.7, help="fraction of weights pruned (default 0.7)")
    parser.add_argument("--dense-steps", type=checked(check_positive_int, "--dense-steps", integer), default=400,
                        help="dense training steps (default 400)")
    parser.add_argument("--lora-steps", type=checked(check_positive_int, "--lora-steps", integer), default=200,
                        help="sparse LoRA steps (default 200)")
    parser.add_argument("--rank", type=checked(check_positive_int, "--rank", integer), default=16,
                        help="LoRA rank (default 16)")
    parser.add_argument("--seed", type=checked(check_int, "--seed", integer), default=0, help="random seed (default 0)")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("sparselora-demo"),
                        help="where masks and the histogram go (default ./sparselora-demo)")
    add_progress_option(parser)


def _outputs(args: argparse.Namespace) -> list[Output]:
    return [Output("--output-dir", args.output_dir)]


def _run(args: argparse.Namespace, outputs: Outputs) -> int:
    result = run_demo(
        DemoSettings(
            sparsity=args.sparsity, dense_steps=args.dense_steps, lora_steps=args.lora_steps,
            lora_rank=args.rank, seed=args.seed, output_dir=args.output_dir, progress=progress(args),
        )
    )
    return 0 if result["sparsity_preserved"] else 1


COMMAND = Command(
    name="demo",
    help="train a small transformer, prune it, recover it with sparse LoRA (no download, ~1 min)",
    description="Train a small byte-level transformer on Python's own docstrings, prune it with global magnitude "
    "masks, recover it with sparse_to_sparse LoRA, merge, and validate sparsity.",
    add_arguments=_add_arguments,
    outputs=_outputs,
    run=_run,
)
