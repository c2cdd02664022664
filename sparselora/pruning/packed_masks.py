"""Moved to :mod:`sparselora.io.packed_masks`; this path stays importable."""

from ..io.packed_masks import *  # noqa: F401,F403
from ..io.packed_masks import __all__  # noqa: F401
