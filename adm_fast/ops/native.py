"""The ops the compiled extensions implement, defined once, here in Python.

Each op spec defines the native kernels it calls (`define`): the schema and
its fake (so torch.compile traces them). csrc/cpu and csrc/cuda register
implementations of these same ops for their dispatch keys
(TORCH_LIBRARY_IMPL(adm_fast_native, CPU / CUDA, ...)), as PyTorch core's
operators have one schema and a kernel per device. The extensions validate
every argument themselves: anything under torch.ops is public.

One check cannot live in the extensions: the dispatcher sends a call with any
meta tensor among its arguments to the Meta kernel, which is the fake, so a
CPU x beside a meta model_out never reaches the CPU kernel's device checks
(the fake would answer with empty, uninitialised outputs). Each fake first
refuses tensors on more than one device (`one_device`); FakeTensorMode's
tensors (all on one fake device) and all-meta calls pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NAMESPACE = "adm_fast_native"
_LIB = torch.library.Library(NAMESPACE, "DEF")


def one_device(op: str, names: Sequence[str], args: Sequence, error=RuntimeError) -> None:
    """Raise `error` naming the first tensor argument on another device than
    the first tensor's (meta counts as a device). names: the arguments' names."""
    first = None
    for name, a in zip(names, args):
        if not isinstance(a, torch.Tensor):
            continue
        if first is None:
            first = (name, a.device)
        elif a.device != first[1]:
            raise error(f"{op}: {name} is on {a.device} but {first[0]} is on {first[1]} "
                        f"(all tensor arguments must be on one device)")


def argument_names(signature: str) -> list:
    """"Tensor x, int n" -> ["x", "n"]."""
    return [part.split()[1] for part in signature.split(",")]


def define(name: str, signature: str, returns: int, fake: Callable):
    """Define adm_fast_native::<name>(<signature>) -> <returns tensors>; returns
    the op (torch.ops.adm_fast_native.<name>)."""
    out = "Tensor" if returns == 1 else "(" + ", ".join(["Tensor"] * returns) + ")"
    _LIB.define(f"{name}({signature}) -> {out}")
    qualname, names = f"{NAMESPACE}::{name}", argument_names(signature)

    def checked_fake(*args, **kwargs):
        one_device(qualname, list(names[:len(args)]) + list(kwargs),
                   list(args) + list(kwargs.values()))
        return fake(*args, **kwargs)

    torch.library.register_fake(qualname, checked_fake, lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default
