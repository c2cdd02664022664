"""Backend registry: each op has one definition and several implementations.

A backend registers an implementation per op name together with a ``check`` that says
*why* it cannot take a call (or ``None`` when it can). Selection order is the backend's
priority; the reference backend is always last and always able to run.

``SPARSELORA_BACKEND=reference|cpp|triton`` forces one backend. A forced backend that
cannot run a call raises :class:`BackendUnavailableError` carrying the reason; an
automatic choice falls back quietly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = [
    "BackendUnavailableError",
    "register",
    "resolve",
    "last_backend",
    "registered_backends",
    "BACKEND_ENV",
]

BACKEND_ENV = "SPARSELORA_BACKEND"
KNOWN_BACKENDS = ("reference", "cpp", "triton")

# check(*args, **kwargs) -> None if the backend can run this call, else the reason it cannot.
Check = Callable[..., Optional[str]]


class BackendUnavailableError(RuntimeError):
    """A backend forced with SPARSELORA_BACKEND cannot run the requested call."""


@dataclass(frozen=True)
class _Impl:
    backend: str
    priority: int
    fn: Callable
    check: Check


_REGISTRY: dict[str, list[_Impl]] = {}
_LAST: dict[str, str] = {}


def register(op: str, backend: str, *, priority: int, check: Check | None = None):
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``.

    Higher ``priority`` is tried first. ``check`` receives the op's arguments.
    """
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; accepted: {', '.join(KNOWN_BACKENDS)}")

    def decorator(fn: Callable) -> Callable:
        impls = [i for i in _REGISTRY.get(op, []) if i.backend != backend]
        impls.append(_Impl(backend, priority, fn, check or (lambda *a, **k: None)))
        impls.sort(key=lambda i: -i.priority)
        _REGISTRY[op] = impls
        return fn

    return decorator


def _forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value:
        return None
    if value not in KNOWN_BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV}={value!r} is not a backend; accepted: {', '.join(KNOWN_BACKENDS)}"
        )
    return value


def resolve(op: str, *args, allowed: tuple[str, ...] | None = None, **kwargs) -> Callable:
    """Return the implementation of ``op`` that will run these arguments.

    ``allowed`` narrows the backends tried (the custom operators' default kernel, for
    devices other than CPU and CUDA, runs the reference alone).
    """
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    if allowed is not None:
        impls = [i for i in impls if i.backend in allowed]
    forced = _forced_backend()
    if forced is not None:
        chosen = next((i for i in impls if i.backend == forced), None)
        if chosen is None:
            raise BackendUnavailableError(
                f"{BACKEND_ENV}={forced} but the {forced} backend is not available for op "
                f"{op!r} (available: {', '.join(i.backend for i in impls)})"
            )
        reason = chosen.check(*args, **kwargs)
        if reason is not None:
            raise BackendUnavailableError(f"{BACKEND_ENV}={forced} cannot run {op!r}: {reason}")
        _LAST[op] = chosen.backend
        return chosen.fn
    for impl in impls:
        if impl.check(*args, **kwargs) is None:
            _LAST[op] = impl.backend
            return impl.fn
    raise BackendUnavailableError(f"no backend can run {op!r}")  # reference never refuses


def last_backend(op: str) -> str | None:
    """Name of the backend that ran the latest call of ``op`` in this process."""
    return _LAST.get(op)


def registered_backends(op: str) -> list[str]:
    """Backends registered for ``op``, in the order they are tried."""
    return [i.backend for i in _REGISTRY.get(op, [])]
