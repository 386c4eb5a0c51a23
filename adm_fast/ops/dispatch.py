"""Backend selection for adm_fast's ops.

Each backend declares, per op, why it cannot run a given call
(`not_supported_reasons`); an empty list means it can. `auto` walks the
backends by priority and takes the first that can; an explicitly chosen
backend is strict and raises with its reasons instead of falling back.

The choice is process-wide, like torch.backends flags: `use_backend` nests
and restores on exit; with no choice made, `ADM_FAST_BACKEND` (read at call
time) or "auto" applies. It is a plain module-level value (not a
ContextVar or thread-local) so that torch.compile can trace the selection
without a graph break, guarding on the setting.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

from .preferences import preferred

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

    def __init__(self) -> None:
        self.ops: Dict[str, Callable] = {}

    def unavailable_reasons(self) -> List[str]:
        return []

    def not_supported_reasons(self, op: str, *args, **kwargs) -> List[str]:
        if op not in self.ops:
            return [f"{self.name} has no implementation of {op}"]
        return []

    def notes(self) -> str:
        """Where this backend runs, for `adm-fast info`."""
        return ""

    def auto_reasons(self, op: str, *args, **kwargs) -> List[str]:
        """Why `auto` should pass over a call this backend could run (e.g. it
        would run in an interpreter); an explicit choice ignores these."""
        return []

    def reasons(self, op: str, *args, **kwargs) -> List[str]:
        why = self.unavailable_reasons()
        if why:
            return why
        return self.not_supported_reasons(op, *args, **kwargs)


_BACKENDS: Dict[str, Backend] = {}
# The setting: a backend name for every op, or {op: name} (ops not named: auto).
Setting = Union[str, Mapping[str, str]]
_STATE: Dict[str, Optional[Setting]] = {"setting": None}


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


def _check(setting: Setting) -> Setting:
    if isinstance(setting, str):
        return _check_name(setting)
    for name in setting.values():
        _check_name(name)
    return dict(setting)


def current_backend(op: Optional[str] = None) -> str:
    """The backend name in force for `op`: use_backend's, else $ADM_FAST_BACKEND,
    else auto."""
    setting = _STATE["setting"]
    if setting is None:
        setting = os.environ.get("ADM_FAST_BACKEND", "").strip() or AUTO
    if not isinstance(setting, str):
        setting = setting.get(op, AUTO)
    return _check_name(setting)


@contextlib.contextmanager
def use_backend(setting: Setting):
    """Run the ops in this block on one backend ("auto", "eager", "triton", ...),
    or per op: use_backend({"group_norm_act": "triton"}) (others stay auto)."""
    previous = _STATE["setting"]
    _STATE["setting"] = _check(setting)
    try:
        yield setting
    finally:
        _STATE["setting"] = previous


def set_backend(setting: Optional[Setting]) -> None:
    """Set the backend for this context until changed; None restores the default."""
    _STATE["setting"] = None if setting is None else _check(setting)


class BackendNotSupported(RuntimeError):
    """The chosen backend cannot run this call; the message says why."""


def _format(op: str, why: Dict[str, List[str]], chosen: Optional[str] = None) -> str:
    head = (f"adm_fast backend {chosen!r} (chosen explicitly) cannot run {op} for these inputs:"
            if chosen else f"no adm_fast backend can run {op} for these inputs:")
    lines = [head]
    for name, reasons in why.items():
        lines.append(f"  {name}: " + "; ".join(reasons))
    return "\n".join(lines)


def select(op: str, *args, **kwargs) -> Backend:
    """The backend that will run `op` on these arguments (raises if none can)."""
    name = current_backend(op)
    if name != AUTO:
        backend = _BACKENDS[name]
        why = backend.reasons(op, *args, **kwargs)
        if why:
            raise BackendNotSupported(_format(op, {name: why}, chosen=name))
        return backend
    rejected: Dict[str, List[str]] = {}
    for backend in _auto_order(op, args):
        why = backend.reasons(op, *args, **kwargs) or backend.auto_reasons(op, *args, **kwargs)
        if not why:
            if rejected and not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
                log.debug("%s -> %s (%s)", op, backend.name, _format(op, rejected))
            return backend
        rejected[backend.name] = why
    raise BackendNotSupported(_format(op, rejected))


def _auto_order(op: str, args) -> List[Backend]:
    """Backends for `auto`: measured preferences first, then by priority."""
    ranked = list(backends().values())
    first = [_BACKENDS[n] for n in preferred(op, args) if n in _BACKENDS] if args else []
    return first + [b for b in ranked if b not in first]


def explain(op: str, *args, **kwargs) -> str:
    """Which backend `op` would use for these arguments, and why not the others."""
    name = current_backend(op)
    lines = [f"{op} (backend setting: {name})"]
    chosen = None
    order = _auto_order(op, args) if name == AUTO else list(backends().values())
    for backend in order:
        why = backend.reasons(op, *args, **kwargs)
        if name == AUTO and not why:
            why = backend.auto_reasons(op, *args, **kwargs)
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
