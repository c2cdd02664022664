"""Command-line interface: ``sparselora <command>`` (also ``python -m sparselora``).

``main.py`` holds what every command shares (the parser, path checks, one-line errors, exit
codes, removal of a failed run's outputs); ``commands/`` holds one file per command, each a
:class:`~.command.Command` record with its arguments, inputs, outputs and run function;
``arguments.py`` the argument types (thin adapters over :mod:`sparselora.rules`).
"""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
