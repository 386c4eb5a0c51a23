"""The ops the compiled extensions implement, defined once, here in Python.

Each op spec defines the native kernels it calls (`define`): the schema and
its fake (so torch.compile traces them). csrc/cpu and csrc/cuda register
implementations of these same ops for their dispatch keys
(TORCH_LIBRARY_IMPL(adm_fast_native, CPU / CUDA, ...)), as PyTorch core's
operators have one schema and a kernel per device. The extensions validate
every argument themselves: anything under torch.ops is public.
"""

from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "adm_fast_native"
_LIB = torch.library.Library(NAMESPACE, "DEF")


def define(name: str, signature: str, returns: int, fake: Callable):
    """Define adm_fast_native::<name>(<signature>) -> <returns tensors>; returns
    the op (torch.ops.adm_fast_native.<name>)."""
    out = "Tensor" if returns == 1 else "(" + ", ".join(["Tensor"] * returns) + ")"
    _LIB.define(f"{name}({signature}) -> {out}")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default
