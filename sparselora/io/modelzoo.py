"""Cerebras ModelZoo checkpoints (``.mdl``), read and rewritten without unpickling anything.

``cerebras.pytorch.load`` reads tensors as raw arrays and leaves other stored objects
deferred, but it hands a non-``.mdl`` file to ``torch.load`` and deserializes objects with
``dill`` when they are materialised. Here loading runs with ``weights_only=True``, and loading
and saving run with ``dill.loads`` refusing, so a file that needs unpickling is a ValueError
naming it, never code execution. Needs cerebras-pytorch (the ModelZoo environment).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Union

__all__ = ["load_modelzoo_checkpoint", "save_modelzoo_checkpoint"]

PathLike = Union[str, os.PathLike]


class _Refused(Exception):
    pass


def _refuse(*_args, **_kwargs):
    raise _Refused


@contextlib.contextmanager
def _no_unpickling() -> Iterator[None]:
    import dill

    original = dill.loads
    dill.loads = _refuse
    try:
        yield
    finally:
        dill.loads = original


def _cstorch(path: PathLike):
    try:
        import cerebras.pytorch as cstorch
    except ImportError:
        raise ValueError(f"checkpoint {str(path)!r} is a Cerebras ModelZoo checkpoint (.mdl); reading it needs "
                         "cerebras-pytorch (the ModelZoo environment)") from None
    return cstorch


def load_modelzoo_checkpoint(path: PathLike) -> Any:
    """The whole checkpoint (``{"model": {...}, ...}``) on the CPU."""
    cstorch = _cstorch(path)
    try:
        with _no_unpickling():
            return cstorch.load(str(path), map_location="cpu", weights_only=True)
    except _Refused:
        raise ValueError(f"checkpoint {str(path)!r} holds pickled objects, which are never unpickled here") from None
    except Exception:  # noqa: BLE001 - cstorch raises many kinds for a bad file
        raise ValueError(f"checkpoint {str(path)!r} could not be read as a ModelZoo checkpoint") from None


def save_modelzoo_checkpoint(state: Any, path: PathLike) -> None:
    """``cerebras.pytorch.save`` (it refuses to replace an existing file); deferred objects
    of a loaded checkpoint are carried over only if that needs no unpickling."""
    cstorch = _cstorch(path)
    try:
        with _no_unpickling():
            cstorch.save(state, str(path))
    except _Refused:
        raise ValueError(f"writing {str(path)!r} would unpickle objects of the source checkpoint; "
                         "they are never unpickled here") from None
