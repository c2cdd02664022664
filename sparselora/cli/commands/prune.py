"""``sparselora prune``: one-shot pruning of a causal LM checkpoint, block by block."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ...pruning.calibration import read_text
from ...pruning.oneshot import method_names, prune_checkpoint
from ...pruning.oneshot.owl import check_lambda
from ...pruning.oneshot.reconstruct import RECONSTRUCTION_TARGETS, Reconstruction, check_lr
from ...rules import check_choice, check_nm, check_positive_int
from ..arguments import add_overwrite_option, add_progress_option, checked, integer, progress, ratio, sparsity
from ..command import Command, Input, Output
from ..outputs import Outputs

__all__ = ["COMMAND"]


def _method(value: str, flag: str) -> str:
    # the engine's table is read when the flag is checked, not when the parser is built:
    # a method registered before the run is accepted
    return check_choice(value, flag, method_names())


def _nm(pair: tuple[int, int], flag: str) -> tuple[int, int]:
    return check_nm(*pair, flag)


_samples = checked(check_positive_int, "--samples", integer)
_seq_len = checked(check_positive_int, "--seq-len", integer)
_steps = checked(check_positive_int, "--reconstruct-steps", integer)
_lr = checked(check_lr, "--reconstruct-lr")
_DEFAULT = Reconstruction()


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--method", type=checked(_method, "--method", str), default="wanda",
                        help=f"importance: {', '.join(method_names())} (default wanda); sparsegpt also updates the kept "
                        "weights")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--sparsity", type=sparsity, help="fraction pruned in every block weight (default 0.5)")
    level.add_argument("--nm", type=checked(_nm, "--nm", ratio), metavar="N:M", help="N:M masks instead, e.g. 2:4")
    parser.add_argument("--owl", action="store_true", help="OWL: per-block sparsity from outlier ratios, mean = --sparsity")
    parser.add_argument("--owl-lambda", type=checked(check_lambda, "--owl-lambda"), default=0.08,
                        help="OWL spread: at most 2*lambda, lambda in [0, 0.5] (default 0.08)")
    parser.add_argument("--reconstruct", action="store_true",
                        help="after each block is pruned, train its kept weights (pruned ones stay 0) towards the "
                        "dense block's outputs on the calibration windows")
    parser.add_argument("--reconstruct-steps", type=_steps, metavar="K",
                        help=f"Adam steps per block (default {_DEFAULT.steps})")
    parser.add_argument("--reconstruct-lr", type=_lr, metavar="LR",
                        help=f"peak learning rate, cosine decay (default {_DEFAULT.lr:g})")
    parser.add_argument("--reconstruct-target", choices=RECONSTRUCTION_TARGETS,
                        help="dense: the dense model's activations (default); pruned: the dense block on the pruned "
                        "inputs (one activation store less)")
    parser.add_argument("--all-experts", action="store_true",
                        help="mixture-of-experts: calibrate every expert on every token, not only the routed ones "
                        "(the statistics pass costs experts / top-k times more expert work)")
    parser.add_argument("--calibration", type=Path, metavar="FILE", help="UTF-8 calibration text (default: built-in text)")
    parser.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer folder (default: the checkpoint's)")
    parser.add_argument("--samples", type=_samples, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seq-len", type=_seq_len, default=512, help="tokens per window (default 512)")
    parser.add_argument("--include", action="append", metavar="GLOB", help="only weights matching GLOB (repeatable)")
    parser.add_argument("--exclude", action="append", metavar="GLOB", help="skip weights matching GLOB (repeatable)")
    parser.add_argument("--offload-dir", type=Path, metavar="DIR", help="keep calibration activations in files here")
    parser.add_argument("-o", "--output-dir", type=Path, required=True)
    parser.add_argument("--distributed", action="store_true", help="split the calibration batches across torchrun ranks")
    add_progress_option(parser)
    add_overwrite_option(parser)


def _reconstruction_line(blocks: list[dict]) -> str:
    """One line on the blocks' reconstruction: how many kept it, and the held-out error."""
    kept = [b for b in blocks if b["kept"]]
    before = sum(b["before"] for b in blocks) / max(len(blocks), 1)
    after = sum(b["after"] if b["kept"] else b["before"] for b in blocks) / max(len(blocks), 1)
    return (f"reconstruction kept in {len(kept)}/{len(blocks)} blocks; mean held-out relative error "
            f"{before:.4g} -> {after:.4g}")


def _outputs(args: argparse.Namespace) -> list[Output]:
    return [Output("--output-dir", args.output_dir)]


def _run(args: argparse.Namespace, outputs: Outputs) -> int:
    if args.owl and args.nm:
        raise ValueError("--owl allocates unstructured sparsity per block; it does not combine with --nm")
    tuned = {"steps": args.reconstruct_steps, "lr": args.reconstruct_lr, "target": args.reconstruct_target}
    tuned = {key: value for key, value in tuned.items() if value is not None}
    if tuned and not args.reconstruct:
        raise ValueError(f"{', '.join('--reconstruct-' + key for key in tuned)} only apply with --reconstruct")
    summary = prune_checkpoint(
        args.checkpoint, args.output_dir, args.method, None if args.nm else (args.sparsity or 0.5), nm=args.nm,
        owl=args.owl, owl_lambda=args.owl_lambda, tokenizer=args.tokenizer,
        calibration_text=read_text(args.calibration) if args.calibration else None, samples=args.samples,
        seq_len=args.seq_len, include=args.include, exclude=args.exclude, distributed=args.distributed,
        offload_dir=args.offload_dir, overwrite=args.overwrite, progress=progress(args),
        reconstruct=Reconstruction(**tuned) if args.reconstruct else None, all_experts=args.all_experts,
    )
    level = f"{args.nm[0]}:{args.nm[1]}" if args.nm else f"{args.sparsity or 0.5:.0%}"
    if not args.distributed or int(os.environ.get("RANK", "0")) == 0:
        print(f"{summary['blocks']} blocks pruned with {args.method} at {level}{' + OWL' if args.owl else ''}"
              f"{' + reconstruction' if args.reconstruct else ''} in {summary['seconds']:.1f} s -> {summary['output']} "
              f"(masks: {summary['masks']})")
        if args.reconstruct:
            print(_reconstruction_line(summary["reconstruction"]))
        if summary.get("expert_tokens"):
            counts = [c for per_block in summary["expert_tokens"].values() for c in per_block]
            print(f"experts calibrated on {min(counts)}-{max(counts)} tokens each "
                  f"({sum(c == 0 for c in counts)} of {len(counts)} on none: pruned by magnitude)")
    return 0


COMMAND = Command(
    name="prune",
    help="one-shot pruning of a causal LM checkpoint block by block (magnitude, Wanda, SparseGPT, OWL)",
    description="Prune a Hugging Face causal LM (a folder with config.json and safetensors shards) one decoder block "
    "at a time, reading each block from disk when its turn comes, and write the pruned checkpoint (loadable with "
    "from_pretrained) plus its packed masks (OUT/masks.safetensors). Under torchrun, --distributed splits the "
    "calibration batches across ranks.",
    add_arguments=_add_arguments,
    inputs=(Input("checkpoint", "checkpoint"), Input("--calibration", "calibration"), Input("--tokenizer", "tokenizer")),
    outputs=_outputs,
    run=_run,
)
