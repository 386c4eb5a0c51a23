"""Backends and the backend setting.

A backend is a family of implementations that a user names (`eager`, `sdpa`,
`triton`, `cpu`, `cuda`): whether it can run at all here (built? importable?),
on which device types, and its rank for `auto`. What it supports per op is
declared by its implementations, in each op's spec file (`Impl` classes).

The setting is process-wide, like torch.backends flags: `use_backend` nests and
restores on exit; with no choice made, `ADM_FAST_BACKEND` (read at call time)
or "auto" applies. It is a plain module-level value (not a ContextVar) so that
torch.compile traces the selection without a graph break, guarding on it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

AUTO = "auto"
# The backend whose implementation of every op is the op's own reference
# (Op.reference, registered by the op itself: ops/op.py).
REFERENCE = "eager"
# The setting: a backend name for every op, or {op: name} (ops not named: auto).
Setting = str | Mapping[str, str]


class Backend:
    """Where a family of implementations can run. Subclasses override the
    methods; what it runs per op is declared by the ops' Impl classes."""

    name: str = ""
    priority: int = 0  # higher is tried first by auto, after measured preferences
    device_types: tuple[str, ...] = ("cpu", "cuda")
    # The reference's own backend: what every other implementation is checked
    # against before auto uses it (ops/verify.py), so never checked itself.
    is_reference: bool = False

    def unavailable_reasons(self) -> list[str]:
        """Why the backend cannot run anything here (not built, not importable)."""
        return []

    def device_reasons(self, device_type: str) -> list[str]:
        """Why it cannot run on tensors of this device type."""
        if device_type not in self.device_types:
            return [f"{device_type} tensors are not supported (runs on "
                    f"{'/'.join(self.device_types)})"]
        return []

    def auto_reasons(self, device_type: str) -> list[str]:
        """Why auto should pass it over where it could run (e.g. an interpreter)."""
        return []

    def notes(self) -> str:
        """Where it runs, for `adm-fast info`."""
        return ""

    def build_info(self) -> str | None:
        """How it was built, for `adm-fast info`; None when nothing is built."""
        return None

    def build_id(self) -> str:
        """What identifies the code it runs beyond torch's version (a compiled
        extension's file, Triton's version): a verdict of ops/verify.py holds
        for one build, and a new build is checked again."""
        return ""


_BACKENDS: dict[str, Backend] = {}
_STATE: dict[str, object] = {"setting": None, "version": 0}


def register_backend(backend: Backend) -> Backend:
    if not backend.name or backend.name == AUTO:
        raise ValueError(f"invalid backend name {backend.name!r}")
    _BACKENDS[backend.name] = backend
    bump()
    return backend


def unregister_backend(name: str) -> None:
    _BACKENDS.pop(name, None)
    bump()


def bump() -> None:
    """Registrations changed: cached backend decisions are stale."""
    _STATE["version"] = int(_STATE["version"]) + 1


def version() -> int:
    return int(_STATE["version"])


def backends() -> dict[str, Backend]:
    """The registered backends, highest priority first."""
    return dict(sorted(_BACKENDS.items(), key=lambda kv: -kv[1].priority))


def get(name: str) -> Backend:
    return _BACKENDS[name]


def check_name(name: str) -> str:
    """name, if it is auto or a registered backend's; else a ValueError naming them."""
    if name != AUTO and name not in _BACKENDS:
        known = ", ".join([AUTO] + list(backends()))
        raise ValueError(f"unknown adm_fast backend {name!r}; known: {known}")
    return name


def _check(setting: Setting) -> Setting:
    if isinstance(setting, str):
        return check_name(setting)
    if not isinstance(setting, Mapping):
        raise TypeError(f"a backend setting is a name or {{op: name}}, got {setting!r}")
    for name in setting.values():
        check_name(name)
    return dict(setting)


def current_backend(op: str | None = None) -> str:
    """The backend name in force for `op`: use_backend's, else $ADM_FAST_BACKEND,
    else auto."""
    setting = _STATE["setting"]
    if setting is None:
        setting = os.environ.get("ADM_FAST_BACKEND", "").strip() or AUTO
    if not isinstance(setting, str):
        setting = setting.get(op, AUTO)
    return check_name(setting)


def named_for(op: str) -> bool:
    """Whether the setting in force is a per-op mapping that names op."""
    setting = _STATE["setting"]
    return isinstance(setting, dict) and op in setting


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


def set_backend(setting: Setting | None) -> None:
    """Set the backend until changed; None restores the default."""
    _STATE["setting"] = None if setting is None else _check(setting)


class BackendNotSupported(RuntimeError):
    """The chosen backend cannot run this call; the message says why."""
