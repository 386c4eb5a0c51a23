"""The CPU backend: fused C++ kernels from csrc/cpu (the adm_fast._C_cpu extension).

Loading the extension registers torch.ops.adm_fast_cpu.*; their fake
implementations here let torch.compile trace them. The package works without
it (eager, SDPA, Triton); `python -m adm_fast.info` says whether it is built.
"""

from __future__ import annotations

import os
from typing import List

from torch import Tensor

from .dispatch import register_backend
from .extension_ops import ExtensionBackend
from .group_norm_act import OP as GROUP_NORM_ACT


def _load():
    if os.environ.get("ADM_FAST_NO_EXT") == "1":
        return None, "extensions disabled by ADM_FAST_NO_EXT=1"
    try:
        from .. import _C_cpu
    except ImportError as e:
        return None, (f"the C++ CPU extension is not built ({e}); reinstall with "
                      f"pip install --no-build-isolation -e .")
    return _C_cpu, None


class CpuBackend(ExtensionBackend):
    name = "cpu"
    priority = 30
    namespace = "adm_fast_cpu"

    def notes(self) -> str:
        return "CPU tensors, NCHW-contiguous"

    def device_reasons(self, op, args) -> List[str]:
        why = []
        if any(a.device.type != "cpu" for a in args if isinstance(a, Tensor)):
            why.append("inputs are not all CPU tensors")
        if op == GROUP_NORM_ACT and not args[0].is_contiguous():
            why.append("x is not NCHW-contiguous (channels_last runs on eager here)")
        return why


_BACKEND = CpuBackend(*_load())
build_info = _BACKEND.build_info
register_backend(_BACKEND)
