"""Moved to :mod:`sparselora.io.checkpoints`; this path stays importable."""

from ..io.checkpoints import *  # noqa: F401,F403
from ..io.checkpoints import __all__  # noqa: F401
