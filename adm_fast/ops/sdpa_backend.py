"""The SDPA backend: attention through torch.nn.functional.scaled_dot_product_attention.

A well-kept library's fused attention (flash kernels on CPU and GPU, cuDNN on
GPU), with the layout copies it needs. On CPU it is what `auto` runs; on GPU
it competes with the Triton kernel. Its backward is first-order only, like the
other fused backends (double backward: use_backend("eager")).
"""

from __future__ import annotations

from typing import List

import torch

from .dispatch import Backend, register_backend
from .qkv_attention import OP as QKV_ATTENTION, sdpa

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class SdpaBackend(Backend):
    name = "sdpa"
    priority = 10

    def __init__(self) -> None:
        super().__init__()
        self.ops = {QKV_ATTENTION: sdpa}

    def notes(self) -> str:
        return "any device: torch.nn.functional.scaled_dot_product_attention"

    def not_supported_reasons(self, op, *args, **kwargs) -> List[str]:
        why = super().not_supported_reasons(op, *args, **kwargs)
        if why:
            return why
        qkv = args[0]
        if qkv.dtype not in _FLOATS:
            why.append(f"qkv dtype {qkv.dtype} is not one of fp32/fp16/bf16")
        return why


register_backend(SdpaBackend())
