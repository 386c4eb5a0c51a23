"""The CUDA backend: hand-written kernels from csrc/cuda (adm_fast._C_cuda).

Built when adm_fast is installed against a CUDA build of PyTorch with nvcc
present. Until bench/gpu_check's measurements say otherwise per shape
(adm_fast/ops/preferences.py), `auto` ranks it below the Triton backend.
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
        from .. import _C_cuda
    except ImportError as e:
        why = ("torch is a CPU build" if torch.version.cuda is None else
               "adm_fast was installed without it (ADM_FAST_CUDA=0, or nvcc was not found)")
        return None, f"the CUDA extension is not built: {why} ({type(e).__name__})"
    return _C_cuda, None


_EXT, _ERROR = _load()

if _EXT is not None:
    register_fakes("adm_fast_cuda")

_KERNELS = ExtensionKernels("adm_fast_cuda")


def _kernels():
    return _KERNELS


def build_info() -> str:
    return _EXT.build_info() if _EXT is not None else _ERROR


class CudaBackend(Backend):
    name = "cuda"
    priority = 15

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
        return "CUDA tensors, NCHW or channels_last"

    def not_supported_reasons(self, op, *args, **kwargs) -> List[str]:
        why = super().not_supported_reasons(op, *args, **kwargs)
        if why:
            return why
        tensors = [a for a in args if isinstance(a, Tensor)]
        devices = {t.device for t in tensors}
        if any(d.type != "cuda" for d in devices) or len(devices) > 1:
            why.append("inputs are not all on one CUDA device")
        x = args[0]
        if x.dtype not in _FLOATS:
            why.append(f"x dtype {x.dtype} is not one of fp32/bf16/fp16")
        if op == GROUP_NORM_ACT:
            cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            if not (x.is_contiguous() or cl):
                why.append("x is neither contiguous nor channels_last")
        else:
            for name, t in (("x", x), ("model_out", args[1]), ("noise", args[2]),
                            ("grad", args[4])):
                if t is not None and not t.is_contiguous():
                    why.append(f"{name} is not contiguous")
            for name, t in (("noise", args[2]), ("grad", args[4])):
                if t is not None and t.dtype != x.dtype:
                    why.append(f"{name} dtype {t.dtype} differs from x's {x.dtype}")
        if x.numel() == 0:
            why.append("x is empty")
        return why


register_backend(CudaBackend())
