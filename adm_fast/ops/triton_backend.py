"""The Triton backend: what it supports, and its kernels behind the custom ops.

CUDA tensors run compiled kernels. CPU tensors run in Triton's interpreter,
which must be switched on (TRITON_INTERPRET=1) before adm_fast is imported
(Triton reads it when the kernels are defined); `auto` never picks the
interpreter, it is for tests and debugging.
"""

from __future__ import annotations

import functools
import importlib
from typing import List

import torch
from torch import Tensor

from .ddim_step import IMPLS as DDIM_IMPLS, OP as DDIM_STEP, fused as ddim_fused
from .ddpm_step import IMPLS as DDPM_IMPLS, OP as DDPM_STEP, fused as ddpm_fused
from .dispatch import Backend, register_backend
from .group_norm_act import IMPLS as GN_IMPLS, OP as GROUP_NORM_ACT, fused as gn_fused
from .qkv_attention import IMPLS as ATTN_IMPLS, OP as QKV_ATTENTION, fused as attn_fused

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_GROUP_CHANNELS = 1024
MAX_HEAD_DIM = 256


def _load():
    """(error or None, kernel modules, defined for the interpreter?), once, at
    import: module-level facts that torch.compile can read as constants."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable ({type(e).__name__}: {e})", {}, False
    mods = {name: importlib.import_module(f"adm_fast.kernels.{name}")
            for name in ("group_norm_act", "diffusion_step", "qkv_attention")}
    interpreted = type(mods["diffusion_step"].ddpm_step_kernel).__name__ == "InterpretedFunction"
    return None, mods, interpreted


_TRITON_ERROR, _KERNELS, _INTERPRETED = _load()


def _device_reasons(tensors) -> List[str]:
    why = []
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        why.append(f"inputs on several devices: {sorted(map(str, devices))}")
    for dev in devices:
        if dev.type == "cpu":
            if not _INTERPRETED:
                why.append("CPU tensors run only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing adm_fast")
        elif dev.type != "cuda":
            why.append(f"{dev.type} tensors are not supported")
        elif _INTERPRETED:
            why.append("kernels were defined for the interpreter (TRITON_INTERPRET=1); "
                       "unset it to run them on the GPU")
    return why


def _dtype_reasons(named) -> List[str]:
    return [f"{name} dtype {t.dtype} is not one of fp32/fp16/bf16"
            for name, t in named if t is not None and t.dtype not in _FLOATS]


class TritonBackend(Backend):
    name = "triton"
    priority = 20

    def __init__(self) -> None:
        super().__init__()
        self.ops = {
            GROUP_NORM_ACT: gn_fused(self.name),
            DDPM_STEP: ddpm_fused(self.name),
            DDIM_STEP: ddim_fused(self.name),
            QKV_ATTENTION: attn_fused(self.name),
        }
        GN_IMPLS[self.name] = functools.partial(_KERNELS.get, "group_norm_act")
        DDPM_IMPLS[self.name] = functools.partial(_KERNELS.get, "diffusion_step")
        DDIM_IMPLS[self.name] = functools.partial(_KERNELS.get, "diffusion_step")
        ATTN_IMPLS[self.name] = functools.partial(_KERNELS.get, "qkv_attention")

    def unavailable_reasons(self) -> List[str]:
        return [_TRITON_ERROR] if _TRITON_ERROR else []

    def notes(self) -> str:
        if _INTERPRETED:
            return "kernels defined for Triton's interpreter (TRITON_INTERPRET=1): CPU tensors"
        gpu = "" if torch.cuda.is_available() else "; no CUDA device here"
        return "CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 at import)" + gpu

    def auto_reasons(self, op, *args, **kwargs) -> List[str]:
        tensors = [a for a in args if isinstance(a, Tensor)]
        if any(t.device.type == "cpu" for t in tensors):
            return ["CPU tensors would run in Triton's interpreter, which auto never picks"]
        if op == QKV_ATTENTION and args[0].dtype == torch.float32:
            return ["fp32 attention runs three TF32 products on small tiles here; auto "
                    "leaves it to SDPA"]
        return []

    def not_supported_reasons(self, op, *args, **kwargs) -> List[str]:
        why = super().not_supported_reasons(op, *args, **kwargs)
        if why:
            return why
        if op == GROUP_NORM_ACT:
            return self._gn_reasons(*args)
        if op == QKV_ATTENTION:
            return self._attention_reasons(*args)
        return self._step_reasons(*args)

    def _attention_reasons(self, qkv, num_heads, legacy=True) -> List[str]:
        why = _device_reasons([qkv]) + _dtype_reasons([("qkv", qkv)])
        head = qkv.shape[1] // (3 * num_heads)
        if not 1 <= head <= MAX_HEAD_DIM:
            why.append(f"head dim {head} is outside 1..{MAX_HEAD_DIM}")
        if qkv.stride(-1) != 1:
            why.append("qkv's tokens are not contiguous (stride of the last dim != 1)")
        if qkv.numel() == 0:
            why.append("qkv is empty")
        return why

    def _gn_reasons(self, x, num_groups, weight, bias, scale=None, shift=None, eps=1e-5,
                    act=True) -> List[str]:
        why = _device_reasons([x, weight, bias, scale, shift])
        why += _dtype_reasons([("x", x), ("weight", weight), ("bias", bias), ("scale", scale),
                               ("shift", shift)])
        if _KERNELS["group_norm_act"].layout_strides(x) is None:
            why.append("x is neither contiguous nor channels_last")
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.stride(0) != 1:
                why.append(f"{name} is not contiguous")
        if x.shape[1] // num_groups > MAX_GROUP_CHANNELS:
            why.append(f"more than {MAX_GROUP_CHANNELS} channels per group")
        if x.numel() == 0:
            why.append("x is empty")
        return why

    def _step_reasons(self, x, model_out, noise, coefs, grad, *rest) -> List[str]:
        why = _device_reasons([x, model_out, noise, coefs, grad])
        why += _dtype_reasons([("x", x), ("model_out", model_out), ("noise", noise),
                               ("grad", grad)])
        for name, t in (("x", x), ("model_out", model_out), ("noise", noise), ("grad", grad)):
            if t is not None and not t.is_contiguous():
                why.append(f"{name} is not contiguous")
        return why


register_backend(TritonBackend())
