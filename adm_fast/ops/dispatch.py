"""Which implementation runs a call, and why not the others.

An explicitly chosen backend is strict: it runs the call or raises
`BackendNotSupported` with its reasons. `auto` walks the op's implementations
— first the backends its measured preferences name for calls like this one,
then the rest by backend priority — and takes the first with no reasons
against it (`not_supported_reasons`, then `auto_reasons`, then whether it
agreed with the reference on this machine: ops/verify.py).

Preferences are rules in each op's spec (`Op.preferences`), measured by the
benchmarks: {"device": "cpu", "dtype": "fp32", "grad": True,
"min": {feature: n}, "max": {feature: n}, "order": [backend, ...]}, every
key but "order" optional; the first rule that matches a call applies.
"""

from __future__ import annotations

import logging

import torch

from . import backend as _backend
from . import verify
from .backend import AUTO, BackendNotSupported
from .impl import Call, Impl, dtype_name

log = logging.getLogger("adm_fast.dispatch")


def format_reasons(op: str, why: dict[str, list[str]], chosen: str | None = None) -> str:
    head = (f"adm_fast backend {chosen!r} (chosen explicitly) cannot run {op} for these inputs:"
            if chosen else f"no adm_fast backend can run {op} for these inputs:")
    return "\n".join([head] + [f"  {name}: " + "; ".join(r) for name, r in why.items()])


def matches(rule: dict, call: Call) -> bool:
    if rule.get("device", call.device_type) != call.device_type:
        return False
    first = next(iter(call.tensors.values()))
    if "dtype" in rule and dtype_name(first.dtype) != rule["dtype"]:
        return False
    if "grad" in rule and rule["grad"] != call.grad:
        return False
    feats = call.features
    return (all(feats.get(k, 0) >= v for k, v in rule.get("min", {}).items())
            and all(feats.get(k, 0) <= v for k, v in rule.get("max", {}).items()))


def auto_order(op, call: Call) -> list[Impl]:
    """The op's implementations in the order auto tries them for this call."""
    ranked = [op.impls[n] for n in _backend.backends() if n in op.impls]
    for rule in op.preferences:
        if matches(rule, call):
            first = [op.impls[n] for n in rule["order"] if n in op.impls]
            return first + [i for i in ranked if i not in first]
    return ranked


def no_impl(op, name: str) -> list[str]:
    return [f"{name} has no implementation of {op.name}"]


def select(op, call: Call) -> Impl:
    """The implementation that runs `call` (raises if none can)."""
    name = _backend.current_backend(op.name)
    if name != AUTO:
        impl = op.impls.get(name)
        why = no_impl(op, name) if impl is None else impl.not_supported_reasons(call)
        if why:
            raise BackendNotSupported(format_reasons(op.name, {name: why}, chosen=name))
        return impl
    rejected: dict[str, list[str]] = {}
    for impl in auto_order(op, call):
        why = (impl.not_supported_reasons(call) or impl.auto_reasons(call)
               or verify.reasons(op, impl, call))
        if not why:
            if rejected and not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
                log.debug("%s -> %s (%s)", op.name, impl.backend, format_reasons(op.name, rejected))
            return impl
        rejected[impl.backend] = why
    raise BackendNotSupported(format_reasons(op.name, rejected))
