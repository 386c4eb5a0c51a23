"""Backend selection for adm_fast's ops.

Each backend declares, per op, why it cannot run a given call
(`not_supported_reasons`); an empty list means it can. `auto` walks the
backends by priority and takes the first that can; an explicitly chosen
backend is strict and raises with its reasons instead of falling back.

The choice is held in a context variable so that `use_backend` nests and is
safe across threads; with no choice made, `ADM_FAST_BACKEND` (read at call
time) or "auto" applies.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Callable, Dict, List, Optional

log = logging.getLogger("adm_fast.dispatch")

AUTO = "auto"


class Backend:
    """A set of op implementations plus what they support.

    Subclasses fill `ops` (op name -> callable with the op's signature) and
    override `unavailable_reasons` (why the whole backend cannot run here,
    e.g. not built) and `not_supported_reasons` (why one call cannot run).
    Higher `priority` is preferred by `auto`.
    """

    name: str = ""
    priority: int = 0
    # auto never picks a backend marked explicit_only (e.g. an interpreter).
    explicit_only: bool = False

    def __init__(self) -> None:
        self.ops: Dict[str, Callable] = {}

    def unavailable_reasons(self) -> List[str]:
        return []

    def not_supported_reasons(self, op: str, *args, **kwargs) -> List[str]:
        if op not in self.ops:
            return [f"{self.name} has no implementation of {op}"]
        return []

    def reasons(self, op: str, *args, **kwargs) -> List[str]:
        why = self.unavailable_reasons()
        if why:
            return why
        return self.not_supported_reasons(op, *args, **kwargs)


_BACKENDS: Dict[str, Backend] = {}
_choice: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "adm_fast_backend", default=None
)


def register_backend(backend: Backend) -> Backend:
    if not backend.name or backend.name == AUTO:
        raise ValueError(f"invalid backend name {backend.name!r}")
    _BACKENDS[backend.name] = backend
    return backend


def backends() -> Dict[str, Backend]:
    """The registered backends, highest priority first."""
    return dict(sorted(_BACKENDS.items(), key=lambda kv: -kv[1].priority))


def _check_name(name: str) -> str:
    if name != AUTO and name not in _BACKENDS:
        known = ", ".join([AUTO] + list(backends()))
        raise ValueError(f"unknown adm_fast backend {name!r}; known: {known}")
    return name


def current_backend() -> str:
    """The backend name in force: use_backend's, else $ADM_FAST_BACKEND, else auto."""
    name = _choice.get()
    if name is None:
        name = os.environ.get("ADM_FAST_BACKEND", "").strip() or AUTO
    return _check_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops in this block on backend `name` ("auto", "eager", ...)."""
    token = _choice.set(_check_name(name))
    try:
        yield name
    finally:
        _choice.reset(token)


def set_backend(name: Optional[str]) -> None:
    """Set the backend for this context until changed; None restores the default."""
    _choice.set(None if name is None else _check_name(name))


class BackendNotSupported(RuntimeError):
    """The chosen backend cannot run this call; the message says why."""


def _format(op: str, why: Dict[str, List[str]]) -> str:
    lines = [f"no adm_fast backend can run {op} for these inputs:"]
    for name, reasons in why.items():
        lines.append(f"  {name}: " + "; ".join(reasons))
    return "\n".join(lines)


def select(op: str, *args, **kwargs) -> Backend:
    """The backend that will run `op` on these arguments (raises if none can)."""
    name = current_backend()
    if name != AUTO:
        backend = _BACKENDS[name]
        why = backend.reasons(op, *args, **kwargs)
        if why:
            raise BackendNotSupported(_format(op, {name: why}))
        return backend
    rejected: Dict[str, List[str]] = {}
    for backend in backends().values():
        if backend.explicit_only:
            rejected[backend.name] = ["only used when chosen explicitly"]
            continue
        why = backend.reasons(op, *args, **kwargs)
        if not why:
            if rejected and log.isEnabledFor(logging.DEBUG):
                log.debug("%s -> %s (%s)", op, backend.name, _format(op, rejected))
            return backend
        rejected[backend.name] = why
    raise BackendNotSupported(_format(op, rejected))


def explain(op: str, *args, **kwargs) -> str:
    """Which backend `op` would use for these arguments, and why not the others."""
    name = current_backend()
    lines = [f"{op} (backend setting: {name})"]
    chosen = None
    for backend in backends().values():
        why = backend.reasons(op, *args, **kwargs)
        if name == AUTO and backend.explicit_only and not why:
            why = ["only used when chosen explicitly"]
        usable = not why and (name == AUTO or name == backend.name)
        if usable and chosen is None:
            chosen = backend.name
            lines.append(f"  {backend.name}: chosen")
        elif why:
            lines.append(f"  {backend.name}: not supported: " + "; ".join(why))
        else:
            lines.append(f"  {backend.name}: supported, not chosen")
    if chosen is None:
        lines.append("  -> no backend can run this call")
    return "\n".join(lines)


def call(op: str, *args, **kwargs):
    return select(op, *args, **kwargs).ops[op](*args, **kwargs)
