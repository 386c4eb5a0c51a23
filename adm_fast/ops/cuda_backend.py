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

from .dispatch import register_backend
from .extension_ops import ExtensionBackend
from .group_norm_act import OP as GROUP_NORM_ACT


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


class CudaBackend(ExtensionBackend):
    name = "cuda"
    priority = 15
    namespace = "adm_fast_cuda"

    def notes(self) -> str:
        return "CUDA tensors, NCHW or channels_last"

    def device_reasons(self, op, args) -> List[str]:
        why = []
        devices = {a.device for a in args if isinstance(a, Tensor)}
        if any(d.type != "cuda" for d in devices) or len(devices) > 1:
            why.append("inputs are not all on one CUDA device")
        x = args[0]
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
        return why


_BACKEND = CudaBackend(*_load())
build_info = _BACKEND.build_info
register_backend(_BACKEND)
