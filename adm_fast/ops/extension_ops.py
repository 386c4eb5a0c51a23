"""What the CPU and CUDA extensions share on the Python side: the fake
implementations of their torch.library ops (so torch.compile can trace them)
and the adapter the adm_fast custom ops call. Both extensions register the
same four ops, under the namespaces adm_fast_cpu and adm_fast_cuda, and the
backend class both are."""

from __future__ import annotations

from typing import List, Optional

import torch

from .ddim_step import IMPLS as DDIM_IMPLS, OP as DDIM_STEP, fused as ddim_fused
from .ddpm_step import IMPLS as DDPM_IMPLS, OP as DDPM_STEP, fused as ddpm_fused, step_fake
from .dispatch import Backend
from .group_norm_act import IMPLS as GN_IMPLS, OP as GROUP_NORM_ACT, fused as gn_fused

_MEAN = {"eps": 0, "x_start": 1, "x_prev": 2}
_VAR = {"learned": 0, "learned_range": 1, "fixed": 2}


def register_fakes(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::group_norm_act_fwd")
    def _(x, weight, bias, scale, shift, num_groups, eps, act):
        stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @torch.library.register_fake(f"{namespace}::group_norm_act_bwd")
    def _(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, act, need_wb):
        def like(t, wanted=True):
            return torch.empty_like(t) if t is not None and wanted else x.new_empty(0)
        return (torch.empty_like(x), like(weight, need_wb), like(bias, need_wb), like(scale),
                like(shift))

    torch.library.register_fake(f"{namespace}::ddpm_step", step_fake)
    torch.library.register_fake(f"{namespace}::ddim_step", step_fake)


class ExtensionKernels:
    """The adapter for one extension's ops (what IMPLS[backend]() returns)."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    def _op(self, name):
        return getattr(getattr(torch.ops, self.namespace), name)

    def forward(self, x, weight, bias, scale, shift, num_groups, eps, act):
        return self._op("group_norm_act_fwd")(x, weight, bias, scale, shift, num_groups, eps,
                                              act)

    def backward(self, dy, x, weight, bias, scale, shift, mean, rstd, num_groups, act, need_wb):
        grads = self._op("group_norm_act_bwd")(dy, x, weight, bias, scale, shift, mean, rstd,
                                               num_groups, act, need_wb)
        return tuple(g if g.numel() or t is None else None  # "empty" means "not asked for"
                     for g, t in zip(grads, (x, weight, bias, scale, shift)))

    def ddpm_step(self, x, model_out, noise, coefs, grad, mean_type, var_type, clip):
        return self._op("ddpm_step")(x, model_out, noise, coefs, grad, _MEAN[mean_type],
                                     _VAR[var_type], clip)

    def ddim_step(self, x, model_out, noise, coefs, grad, mean_type, clip, eta):
        return self._op("ddim_step")(x, model_out, noise, coefs, grad, _MEAN[mean_type], clip,
                                     eta)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class ExtensionBackend(Backend):
    """A backend running one extension's four ops. Subclasses set name,
    priority and namespace, pass the loaded module (or None and why not), and
    add their device and layout rules in `device_reasons`."""

    namespace = ""

    def __init__(self, ext, error: Optional[str]) -> None:
        super().__init__()
        self.ext, self.error = ext, error
        if ext is not None:
            register_fakes(self.namespace)
        kernels = ExtensionKernels(self.namespace)
        self.ops = {GROUP_NORM_ACT: gn_fused(self.name), DDPM_STEP: ddpm_fused(self.name),
                    DDIM_STEP: ddim_fused(self.name)}
        for impls in (GN_IMPLS, DDPM_IMPLS, DDIM_IMPLS):
            impls[self.name] = lambda: kernels

    def build_info(self) -> str:
        return self.ext.build_info() if self.ext is not None else self.error

    def unavailable_reasons(self) -> List[str]:
        return [self.error] if self.error else []

    def device_reasons(self, op: str, args) -> List[str]:
        raise NotImplementedError

    def not_supported_reasons(self, op, *args, **kwargs) -> List[str]:
        why = super().not_supported_reasons(op, *args, **kwargs)
        if why:
            return why
        why = self.device_reasons(op, args)
        x = args[0]
        if x.dtype not in _FLOATS:
            why.append(f"x dtype {x.dtype} is not one of fp32/bf16/fp16")
        if x.numel() == 0:
            why.append("x is empty")
        return why
