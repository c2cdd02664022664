"""The record of one CLI command: its arguments, inputs, outputs and run function.

A command is one file under ``commands/`` defining one :class:`Command`; ``main.py`` builds
the parser from the records, checks the inputs and outputs they declare before the run,
and removes the outputs on failure. Nothing about a command is written anywhere else.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from .outputs import Outputs

__all__ = ["Command", "Input", "Output"]


class Input(NamedTuple):
    """A path the command reads: refused before the run when it does not exist."""

    label: str  # how the error names it: "checkpoint", "--calibration"
    attribute: str  # where argparse puts it; None (an option not given) is skipped


class Output(NamedTuple):
    """A path the command writes: its folder must exist, an existing one needs --overwrite
    (when the command has that option), and a failed run removes what it made there."""

    flag: str
    path: Path
    # inside a directory that existed before the run, the entries (globs) the run may add
    # and that a failure removes; without them the directory is left alone
    new_entries: tuple[str, ...] = ()


def _no_outputs(args: argparse.Namespace) -> Sequence[Output]:
    return ()


@dataclass(frozen=True)
class Command:
    """One ``sparselora <name>`` command.

    ``add_arguments`` adds its arguments to its (sub)parser; ``inputs`` name the paths it
    reads; ``outputs(args)`` gives the paths it writes and may refuse a malformed one
    (``ValueError``) before anything else is checked; ``run(args, outputs)`` does the work
    and returns the exit code (0, or 1 for a negative answer such as violations found).
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Outputs], int]
    inputs: tuple[Input, ...] = ()
    outputs: Callable[[argparse.Namespace], Sequence[Output]] = _no_outputs
