"""The CPU backend: fused C++ kernels from csrc/cpu (the adm_fast._C_cpu extension).

Loading the extension registers torch.ops.adm_fast_cpu.*; their fake
implementations here let torch.compile trace them. The package works without
it (eager, SDPA, Triton); `python -m adm_fast.info` says whether it is built.
"""

from __future__ import annotations

import os
from typing import List

import torch
from torch import Tensor

from .ddim_step import IMPLS as DDIM_IMPLS, OP as DDIM_STEP, fused as ddim_fused
from .ddpm_step import IMPLS as DDPM_IMPLS, OP as DDPM_STEP, fused as ddpm_fused
from .dispatch import Backend, register_backend
from .extension_ops import ExtensionKernels, register_fakes
from .group_norm_act import IMPLS as GN_IMPLS, OP as GROUP_NORM_ACT, fused as gn_fused

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _load():
    if os.environ.get("ADM_FAST_NO_EXT") == "1":
        return None, "extensions disabled by ADM_FAST_NO_EXT=1"
    try:
        from .. import _C_cpu
    except ImportError as e:
        return None, (f"the C++ CPU extension is not built ({e}); reinstall with "
                      f"pip install --no-build-isolation -e .")
    return _C_cpu, None


_EXT, _ERROR = _load()

if _EXT is not None:
    register_fakes("adm_fast_cpu")

_KERNELS = ExtensionKernels("adm_fast_cpu")


def _kernels():
    return _KERNELS


def build_info() -> str:
    return _EXT.build_info() if _EXT is not None else _ERROR


class CpuBackend(Backend):
    name = "cpu"
    priority = 30

    def __init__(self) -> None:
        super().__init__()
        self.ops = {
            GROUP_NORM_ACT: gn_fused(self.name),
            DDPM_STEP: ddpm_fused(self.name),
            DDIM_STEP: ddim_fused(self.name),
        }
        for impls in (GN_IMPLS, DDPM_IMPLS, DDIM_IMPLS):
            impls[self.name] = _kernels

    def unavailable_reasons(self) -> List[str]:
        return [_ERROR] if _ERROR else []

    def notes(self) -> str:
        return "CPU tensors, NCHW-contiguous"

    def not_supported_reasons(self, op, *args, **kwargs) -> List[str]:
        why = super().not_supported_reasons(op, *args, **kwargs)
        if why:
            return why
        tensors = [a for a in args if isinstance(a, Tensor)]
        if any(t.device.type != "cpu" for t in tensors):
            why.append("inputs are not all CPU tensors")
        x = args[0]
        if x.dtype not in _FLOATS:
            why.append(f"x dtype {x.dtype} is not one of fp32/bf16/fp16")
        if op == GROUP_NORM_ACT and not x.is_contiguous():
            why.append("x is not NCHW-contiguous (channels_last runs on eager here)")
        if x.numel() == 0:
            why.append("x is empty")
        return why


register_backend(CpuBackend())
