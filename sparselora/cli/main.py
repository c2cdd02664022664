"""What every command shares: the parser built from the command records, the checks of
their inputs and outputs, one-line errors and warnings, exit codes, and the removal of a
failed run's outputs.

What a command prints when it fails: one line, ``sparselora <command>: error: <message>``,
exit 2 (exit 1 is reserved for "validate found violations", "demo lost sparsity"). Ctrl-C:
``sparselora <command>: interrupted``, exit 130. Either way, the outputs this run created
are removed; nothing that existed before the command started is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings
from typing import Sequence

from . import commands
from .command import Command
from .outputs import Outputs, discard
from .text import describe, one_line

__all__ = ["main", "build_parser", "EXIT_ERROR", "EXIT_INTERRUPTED", "TRACEBACK_ENV"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
# Set to a non-empty value to see the full traceback of an error (for bug reports).
TRACEBACK_ENV = "SPARSELORA_TRACEBACK"

# argparse says "argument --samples: <message>"; a rule's message already starts with the
# flag ("--samples=0 must be an int >= 1"), so the prefix would say it twice
_REPEATED_FLAG = re.compile(r"^argument (-[-\w]+): (?=\1=)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``sparselora <command>: error: <message>``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        message = _REPEATED_FLAG.sub("", one_line(message))
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def build_parser(records: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The ``sparselora`` parser with one subcommand per record (default: every command)."""
    parser = _Parser(
        prog="sparselora", description="Pruning masks and sparsity-preserving LoRA for PyTorch models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for record in commands.COMMANDS if records is None else records:
        record.add_arguments(subparsers.add_parser(record.name, help=record.help, description=record.description))
    return parser


def _check_paths(command: Command, args: argparse.Namespace, outputs: Outputs) -> None:
    """Refuse malformed outputs, missing inputs and existing outputs (without --overwrite)
    before any work; record the outputs' state for :meth:`Outputs.discard`."""
    declared = command.outputs(args)
    for label, attribute in command.inputs:
        path = getattr(args, attribute)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{label} {str(path)!r} does not exist")
    for flag, path, new_entries in declared:
        if not path.parent.is_dir():
            raise FileNotFoundError(f"{flag} {str(path)!r}: directory {str(path.parent)!r} does not exist")
        if hasattr(args, "overwrite") and not args.overwrite and os.path.lexists(path):
            raise FileExistsError(f"{flag} {str(path)!r} exists; pass --overwrite to replace it")
        outputs.add(path, new_entries)


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
    records = commands.COMMANDS
    try:
        args = build_parser(records).parse_args(argv)
    except KeyboardInterrupt:
        _tell("sparselora: interrupted")
        return EXIT_INTERRUPTED
    command = next(record for record in records if record.name == args.command)
    prefix = f"sparselora {command.name}"
    outputs = Outputs()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(prefix)
            _check_paths(command, args, outputs)
            return command.run(args, outputs)
    except KeyboardInterrupt:
        discard(outputs)
        _tell(f"{prefix}: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of stdout went away (``| head``): stop quietly, as tools killed by SIGPIPE do
        discard(outputs)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
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
