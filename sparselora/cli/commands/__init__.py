"""The commands of ``sparselora``, one file each; a new command is a new file listed here.

Each module defines ``COMMAND``, a :class:`~sparselora.cli.command.Command`; ``COMMANDS``
holds them in the order ``sparselora --help`` lists them.
"""

from __future__ import annotations

from ..command import Command
from . import apply, cerebras_config, demo, masks, prune, stats, validate

__all__ = ["COMMANDS"]

COMMANDS: tuple[Command, ...] = (
    demo.COMMAND,
    masks.COMMAND,
    stats.COMMAND,
    apply.COMMAND,
    validate.COMMAND,
    prune.COMMAND,
    cerebras_config.COMMAND,
)
