"""Command-line interface: ``sparselora <command>`` (also ``python -m sparselora``)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

from .outputs import Outputs, discard
from .text import describe, one_line, printable

__all__ = ["main", "build_parser"]

# What a command prints when it fails: one line, ``sparselora <command>: error: <message>``,
# exit 2 (exit 1 is reserved for "validate found violations", "demo lost sparsity").
# Ctrl-C: ``sparselora <command>: interrupted``, exit 130. Either way, the outputs this run
# created are removed; nothing that existed before the command started is.
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# Set to a non-empty value to see the full traceback of an error (for bug reports).
TRACEBACK_ENV = "SPARSELORA_TRACEBACK"

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``sparselora <command>: error: <message>``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {one_line(message)} (see: {self.prog} --help)\n")


def _number(accept, requirement: str):
    """argparse type: a float for which ``accept(value)`` holds, else ``requirement`` is said."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text} {requirement}")
        return value

    return parse


_fraction = _number(lambda v: 0.0 <= v <= 1.0, "is outside [0, 1]")
_finite = _number(math.isfinite, "must be a finite number")
_non_negative = _number(lambda v: v >= 0, "must be a number >= 0")


def _dropout(text: str) -> float:
    value = _fraction(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return value


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be >= {minimum}")
        return value

    return parse


_rank = _int_at_least(1)
_positive_int = _int_at_least(0)


def _nm(text: str) -> tuple[int, int]:
    """argparse type: ``N:M`` with 0 < N <= M."""
    n, sep, m = text.partition(":")
    if not sep or not n.isdigit() or not m.isdigit() or not 0 < int(n) <= int(m):
        raise argparse.ArgumentTypeError(f"{text!r} is not N:M with 0 < N <= M (e.g. 2:4)")
    return int(n), int(m)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    demo.add_argument("--rank", type=_rank, default=16, help="LoRA rank (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("-o", "--output-dir", type=Path, default=Path("sparselora-demo"),
                      help="where masks and the histogram go (default ./sparselora-demo)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    masks = commands.add_parser(
        "masks", help="magnitude masks of a checkpoint on disk, one tensor at a time (packed safetensors)",
        description="Compute exact magnitude pruning masks for a checkpoint (a .safetensors file, a directory "
        "with a *.safetensors.index.json, or a .pt/.bin state dict) without loading it whole. Under torchrun, "
        "--distributed splits the tensors across ranks and gives the same masks.",
    )
    masks.add_argument("checkpoint", type=Path)
    masks.add_argument("--sparsity", type=_fraction, required=True, help="fraction of the target weights pruned")
    masks.add_argument("--method", choices=["unstructured"], default="unstructured", help="pruning method (default unstructured)")
    masks.add_argument("--metric", choices=["magnitude"], default="magnitude", help="importance metric (default magnitude)")
    masks.add_argument("--scope", choices=["global", "layer"], default="global",
                       help="one threshold for all weights (global, default) or the same fraction per weight (layer)")
    masks.add_argument("--include", action="append", metavar="GLOB", help="only weights matching GLOB (repeatable)")
    masks.add_argument("--exclude", action="append", metavar="GLOB", help="skip weights matching GLOB (repeatable)")
    masks.add_argument("-o", "--output", required=True,
                       help="MASKS.safetensors (packed, one file), MASKS.pt or MASKS.npz (unpacked), or a directory "
                       "(no suffix, or ending in '/': one packed shard per rank + index)")
    masks.add_argument("--distributed", action="store_true", help="split the work across torchrun ranks")
    _common(masks)

    stats = commands.add_parser("stats", help="sparsity statistics of a mask file", description="Print global and per-layer sparsity of a mask file.")
    stats.add_argument("masks", type=Path)
    stats.add_argument("--plot", type=Path, metavar="PNG", help="also write a histogram of layer sparsity")
    stats.add_argument("--per-layer", action="store_true", help="print every layer")
    _common(stats, progress=False)

    apply = commands.add_parser(
        "apply", help="write a pruned copy of a checkpoint (zeros baked in)",
        description="Copy a safetensors checkpoint (single file or shards with index) into OUT_DIR with the "
        "pruned weights set to zero, keeping shard names, tensor order and dtypes.",
    )
    apply.add_argument("checkpoint", type=Path)
    apply.add_argument("masks", type=Path)
    apply.add_argument("-o", "--output-dir", type=Path, required=True)
    _common(apply)

    validate = commands.add_parser("validate", help="check that the weights a mask prunes are zero in a checkpoint",
                                   description="Exit 0 when every pruned weight is zero (|w| <= --tolerance), 1 otherwise.")
    validate.add_argument("checkpoint", type=Path)
    validate.add_argument("masks", type=Path)
    validate.add_argument("--tolerance", type=_non_negative, default=0.0, help="largest |w| counted as zero (default 0)")
    _common(validate, overwrite=False)

    prune = commands.add_parser(
        "prune", help="one-shot pruning of a causal LM checkpoint block by block (magnitude, Wanda, SparseGPT, OWL)",
        description="Prune a Hugging Face causal LM (a folder with config.json and safetensors shards) one decoder "
        "block at a time, reading each block from disk when its turn comes, and write the pruned checkpoint "
        "(loadable with from_pretrained) plus its packed masks (OUT/masks.safetensors). Under torchrun, "
        "--distributed splits the calibration batches across ranks.",
    )
    prune.add_argument("checkpoint", type=Path)
    prune.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default="wanda",
                       help="importance (default wanda); sparsegpt also updates the kept weights")
    level = prune.add_mutually_exclusive_group()
    level.add_argument("--sparsity", type=_fraction, help="fraction pruned in every block weight (default 0.5)")
    level.add_argument("--nm", type=_nm, metavar="N:M", help="N:M masks instead, e.g. 2:4")
    prune.add_argument("--owl", action="store_true", help="OWL: per-block sparsity from outlier ratios, mean = --sparsity")
    prune.add_argument("--owl-lambda", type=_fraction, default=0.08, help="OWL spread: at most 2*lambda (default 0.08)")
    prune.add_argument("--calibration", type=Path, metavar="FILE", help="UTF-8 calibration text (default: built-in text)")
    prune.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer folder (default: the checkpoint's)")
    prune.add_argument("--samples", type=_rank, default=128, help="calibration windows (default 128)")
    prune.add_argument("--seq-len", type=_rank, default=512, help="tokens per window (default 512)")
    prune.add_argument("--include", action="append", metavar="GLOB", help="only weights matching GLOB (repeatable)")
    prune.add_argument("--exclude", action="append", metavar="GLOB", help="skip weights matching GLOB (repeatable)")
    prune.add_argument("--offload-dir", type=Path, metavar="DIR", help="keep calibration activations in files here")
    prune.add_argument("-o", "--output-dir", type=Path, required=True)
    prune.add_argument("--distributed", action="store_true", help="split the calibration batches across torchrun ranks")
    _common(prune)

    cerebras = commands.add_parser(
        "cerebras-config", help="a Cerebras ModelZoo 2.10 trainer config carrying masks (and sparse LoRA)",
        description="Write a ModelZoo trainer YAML for BASE with the masks' sparsity: with --lora-r, the Lora "
        "callback plus SparseMaskCallback (masks as zeros in the frozen weights); without, a static sparsity block "
        "with init_method from_zeros. Run it with: python -m sparselora.cerebras fit OUT.yaml",
    )
    cerebras.add_argument("base", type=Path, help="base trainer config (YAML)")
    cerebras.add_argument("--masks", type=Path, required=True, help="mask file (any format)")
    cerebras.add_argument("--lora-r", type=_rank, help="LoRA rank; omit for sparse full fine-tuning")
    cerebras.add_argument("--lora-alpha", type=_finite, default=32.0, help="LoRA alpha (default 32)")
    cerebras.add_argument("--lora-dropout", type=_dropout, default=0.0, help="LoRA dropout (default 0)")
    cerebras.add_argument("--lora-target", action="append", metavar="NAME",
                          help="module class (or q_proj/k_proj/v_proj/o_proj); default: every Linear")
    cerebras.add_argument("--mode", choices=["sparse_to_dense", "sparse_to_sparse"], default="sparse_to_dense")
    cerebras.add_argument("-o", "--output", type=Path, required=True)
    _common(cerebras, progress=False)
    return parser


def _common(parser: argparse.ArgumentParser, progress: bool = True, overwrite: bool = True) -> None:
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


# what compute_checkpoint_masks writes into a directory output
_MASK_DIR_ENTRIES = ("masks-*-of-*.safetensors", "masks.safetensors.index.json")
_MASK_SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".npz": "npz"}
_MASK_OUTPUTS = ".safetensors (packed), .pt, .npz, or a directory (no suffix, or ending in '/')"


def _mask_output_kind(raw: str, distributed: bool) -> str:
    """'directory', 'safetensors', 'pt' or 'npz' for ``masks -o RAW``."""
    path = Path(raw)
    if raw.endswith(("/", os.sep)) and path.suffix.lower() == ".safetensors" and not path.is_dir():
        raise ValueError(f"--output {raw!r}: a name ending in .safetensors is one file; name the directory otherwise")
    if raw.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        return "directory"
    kind = _MASK_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"--output {raw!r}: unknown suffix {path.suffix!r}; accepted: {_MASK_OUTPUTS}")
    if distributed:
        raise ValueError(f"--output {raw!r}: with --distributed the output is a directory (one shard per rank); "
                         "give a path without a suffix or ending in '/'")
    return kind


_INPUTS = {
    "masks": [("checkpoint", "checkpoint")],
    "stats": [("masks", "masks")],
    "apply": [("checkpoint", "checkpoint"), ("masks", "masks")],
    "prune": [("checkpoint", "checkpoint")],
    "validate": [("checkpoint", "checkpoint"), ("masks", "masks")],
    "cerebras-config": [("base config", "base"), ("masks", "masks")],
}


def _inputs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    return [(label, getattr(args, attr)) for label, attr in _INPUTS.get(args.command, ())]


def _outputs(args: argparse.Namespace) -> list[tuple[str, Path, tuple[str, ...]]]:
    if args.command == "masks":
        return [("--output", Path(args.output), _MASK_DIR_ENTRIES)]
    if args.command == "stats":
        return [("--plot", args.plot, ())] if args.plot is not None else []
    if args.command in ("apply", "demo", "prune"):
        return [("--output-dir", args.output_dir, ())]
    if args.command == "cerebras-config":
        return [("--output", args.output, ())]
    return []


def _check_paths(args: argparse.Namespace, outputs: Outputs) -> None:
    """Refuse missing inputs, unknown output forms and existing outputs (without
    --overwrite) before any work; record the outputs' state for :meth:`Outputs.discard`."""
    if args.command == "masks":
        _mask_output_kind(args.output, args.distributed)
    for label, path in _inputs(args):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{label} {str(path)!r} does not exist")
    for flag, path, new_entries in _outputs(args):
        if not path.parent.is_dir():
            raise FileNotFoundError(f"{flag} {str(path)!r}: directory {str(path.parent)!r} does not exist")
        if hasattr(args, "overwrite") and not args.overwrite and os.path.lexists(path):
            raise FileExistsError(f"{flag} {str(path)!r} exists; pass --overwrite to replace it")
        outputs.add(path, new_entries)


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def _run_masks(args: argparse.Namespace, outputs: Outputs) -> int:
    from ..pruning.streaming import compute_checkpoint_masks

    kind = _mask_output_kind(args.output, args.distributed)
    output = Path(args.output)

    def compute(target: Path, overwrite: bool) -> dict:
        return compute_checkpoint_masks(
            args.checkpoint, args.sparsity, target, scope=args.scope, include=args.include, exclude=args.exclude,
            overwrite=overwrite, progress=_progress(args), distributed=args.distributed,
        )

    if kind == "directory" or output.suffix == ".safetensors":
        summary = compute(output, args.overwrite)
    else:
        # packed safetensors in a staging folder beside the output, then the asked format
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        outputs.created(staging)
        try:
            packed = staging / "masks.safetensors"
            outputs.aliases[str(packed)] = args.output
            summary = compute(packed, False)
            if kind == "safetensors":
                os.replace(packed, output)
            else:
                from ..pruning.mask_ops import load_mask, save_mask

                masks, metadata = load_mask(packed)
                save_mask(masks, output, metadata, format=kind)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if summary["rank"] == 0:
        print(f"{len(summary['targets'])} weights, {summary['total']:,} parameters: {summary['total_pruned']:,} pruned "
              f"({summary['sparsity']:.4%}, scope {args.scope}) in {summary['seconds']:.1f} s on {summary['world']} "
              f"process(es) -> {args.output}")
    return 0


def _run_stats(args: argparse.Namespace, outputs: Outputs) -> int:
    from ..pruning.mask_ops import compute_sparsity_stats, load_mask, plot_sparsity_histogram

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


def _run_apply(args: argparse.Namespace, outputs: Outputs) -> int:
    from ..pruning.checkpoint_ops import apply_masks_to_checkpoint

    summary = apply_masks_to_checkpoint(args.checkpoint, args.masks, args.output_dir, overwrite=args.overwrite,
                                        progress=_progress(args))
    print(f"{summary['tensors']} tensors written, {summary['masked']} masked, {summary['pruned']:,} weights zeroed "
          f"in {summary['seconds']:.1f} s -> {summary['output']}")
    return 0


def _run_prune(args: argparse.Namespace, outputs: Outputs) -> int:
    from ..pruning.calibration import read_text
    from ..pruning.llm_checkpoint import prune_checkpoint

    if args.owl and args.nm:
        raise ValueError("--owl allocates unstructured sparsity per block; it does not combine with --nm")
    for label, path in (("--calibration", args.calibration), ("--tokenizer", args.tokenizer)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{label} {str(path)!r} does not exist")
    summary = prune_checkpoint(
        args.checkpoint, args.output_dir, args.method, None if args.nm else (args.sparsity or 0.5), nm=args.nm,
        owl=args.owl, owl_lambda=args.owl_lambda, tokenizer=args.tokenizer,
        calibration_text=read_text(args.calibration) if args.calibration else None, samples=args.samples,
        seq_len=args.seq_len, include=args.include, exclude=args.exclude, distributed=args.distributed,
        offload_dir=args.offload_dir, overwrite=args.overwrite, progress=_progress(args),
    )
    level = f"{args.nm[0]}:{args.nm[1]}" if args.nm else f"{args.sparsity or 0.5:.0%}"
    if not args.distributed or int(os.environ.get("RANK", "0")) == 0:
        print(f"{summary['blocks']} blocks pruned with {args.method} at {level}{' + OWL' if args.owl else ''} "
              f"in {summary['seconds']:.1f} s -> {summary['output']} (masks: {summary['masks']})")
    return 0


def _run_validate(args: argparse.Namespace, outputs: Outputs) -> int:
    from ..pruning.checkpoint_ops import validate_checkpoint_masks

    ok, report = validate_checkpoint_masks(args.checkpoint, args.masks, args.tolerance, progress=_progress(args))
    g = report["global"]
    print(f"{'valid' if ok else 'INVALID'}: {g['total_violations']:,} of {g['total_pruned']:,} pruned weights are "
          f"non-zero ({g['violation_rate']:.4%}) in {g['num_layers']} tensors")
    for name in g["layers_with_violations"][:20]:
        print(f"  {printable(name)}: {report['per_layer'][name]['violations']:,} violations")
    return 0 if ok else 1


def _run_cerebras_config(args: argparse.Namespace, outputs: Outputs) -> int:
    from ..cerebras.config import create_sparse_config

    lora = None
    if args.lora_r is not None:
        lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
        if args.lora_target:
            lora["target_modules"] = args.lora_target
    create_sparse_config(args.base, args.masks, lora, args.mode, output=args.output)
    print(f"ModelZoo config -> {args.output}; run: python -m sparselora.cerebras fit {args.output}")
    return 0


def _run_demo(args: argparse.Namespace, outputs: Outputs) -> int:
    from ..demo import DemoSettings, run_demo

    result = run_demo(
        DemoSettings(
            sparsity=args.sparsity, dense_steps=args.dense_steps, lora_steps=args.lora_steps,
            lora_rank=args.rank, seed=args.seed, output_dir=args.output_dir, progress=_progress(args),
        )
    )
    return 0 if result["sparsity_preserved"] else 1


_HANDLERS: dict[str, Callable[[argparse.Namespace, Outputs], int]] = {
    "demo": _run_demo, "masks": _run_masks, "stats": _run_stats, "apply": _run_apply,
    "validate": _run_validate, "cerebras-config": _run_cerebras_config, "prune": _run_prune,
}


def _tell(line: str) -> None:
    """One line on stderr; a closed stderr is not an error of its own."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def _warning_printer(prefix: str):
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        _tell(f"{prefix}: warning: {one_line(message) or category.__name__}")

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparselora`` console script.

    Exit codes: 0 success; 1 validate found violations (demo: sparsity lost); 2 an error,
    printed as one line ``sparselora <command>: error: <message>`` (a full traceback when
    the environment variable SPARSELORA_TRACEBACK is set); 130 interrupted (Ctrl-C). On
    any failure the outputs this run created are removed; what existed before is kept.
    """
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        _tell("sparselora: interrupted")
        return EXIT_INTERRUPTED
    prefix = f"sparselora {args.command}"
    outputs = Outputs()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(prefix)
            _check_paths(args, outputs)
            return _HANDLERS[args.command](args, outputs)
    except KeyboardInterrupt:
        discard(outputs)
        _tell(f"{prefix}: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of stdout went away (``| head``): stop quietly, as tools killed by SIGPIPE do
        discard(outputs)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except SystemExit as exc:
        if exc.code not in (None, 0):
            discard(outputs)
        raise
    except Exception as exc:
        discard(outputs)
        if os.environ.get(TRACEBACK_ENV):
            raise
        _tell(f"{prefix}: error: {describe(exc, outputs.aliases)}")
        return EXIT_ERROR
    except BaseException:
        discard(outputs)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
