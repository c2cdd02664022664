"""``sparselora cerebras-config``: a Cerebras ModelZoo trainer config carrying masks (and sparse LoRA)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...pruning.sparse_lora import SPARSITY_MODES
from ...rules import check_dropout, check_finite, check_positive_int
from ..arguments import add_overwrite_option, checked, integer
from ..command import Command, Input, Output
from ..outputs import Outputs

__all__ = ["COMMAND"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", type=Path, help="base trainer config (YAML)")
    parser.add_argument("--masks", type=Path, required=True, help="mask file (any format)")
    parser.add_argument("--lora-r", type=checked(check_positive_int, "--lora-r", integer),
                        help="LoRA rank; omit for sparse full fine-tuning")
    parser.add_argument("--lora-alpha", type=checked(check_finite, "--lora-alpha"), default=32.0,
                        help="LoRA alpha (default 32)")
    parser.add_argument("--lora-dropout", type=checked(check_dropout, "--lora-dropout"), default=0.0,
                        help="LoRA dropout (default 0)")
    parser.add_argument("--lora-target", action="append", metavar="NAME",
                        help="module class (or q_proj/k_proj/v_proj/o_proj); default: every Linear")
    parser.add_argument("--mode", choices=SPARSITY_MODES, default="sparse_to_dense")
    parser.add_argument("-o", "--output", type=Path, required=True)
    add_overwrite_option(parser)


def _outputs(args: argparse.Namespace) -> list[Output]:
    return [Output("--output", args.output)]


def _run(args: argparse.Namespace, outputs: Outputs) -> int:
    # imported when the command runs: the cerebras package loads ModelZoo (seconds) when installed
    from ...cerebras.config import create_sparse_config

    lora = None
    if args.lora_r is not None:
        lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
        if args.lora_target:
            lora["target_modules"] = args.lora_target
    create_sparse_config(args.base, args.masks, lora, args.mode, output=args.output)
    print(f"ModelZoo config -> {args.output}; run: python -m sparselora.cerebras fit {args.output}")
    return 0


COMMAND = Command(
    name="cerebras-config",
    help="a Cerebras ModelZoo 2.10 trainer config carrying masks (and sparse LoRA)",
    description="Write a ModelZoo trainer YAML for BASE with the masks' sparsity: with --lora-r, the Lora callback "
    "plus SparseMaskCallback (masks as zeros in the frozen weights); without, a static sparsity block with "
    "init_method from_zeros. Run it with: python -m sparselora.cerebras fit OUT.yaml",
    add_arguments=_add_arguments,
    inputs=(Input("base config", "base"), Input("masks", "masks")),
    outputs=_outputs,
    run=_run,
)
