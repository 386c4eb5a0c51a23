"""What the CPU and CUDA extensions share on the Python side: the fake
implementations of their torch.library ops (so torch.compile can trace them)
and the adapter the adm_fast custom ops call. Both extensions register the
same four ops, under the namespaces adm_fast_cpu and adm_fast_cuda."""

from __future__ import annotations

import torch

from .ddpm_step import step_fake

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
