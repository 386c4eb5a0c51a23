"""adm_fast's op layer: the only place that knows kernels exist.

Models call these functions by name; which implementation runs is decided per
call by the backend setting (`use_backend`, `$ADM_FAST_BACKEND`, or auto).
Each op is one spec file (group_norm_act.py, qkv_attention.py, conv3x3.py,
diffusion_step.py for ddpm_step and ddim_step): its check, reference, fake,
autograd and implementations, registered as the file is imported.
"""

from . import backends as _backends  # noqa: F401  (registers the backends)
from .backend import (
                      Backend,
                      BackendNotSupported,
                      backends,
                      current_backend,
                      register_backend,
                      set_backend,
                      use_backend,
)
from .conv3x3 import CONV3X3, conv3x3
from .diffusion_step import DDIM_STEP, DDPM_STEP, ddim_step, ddpm_step
from .group_norm_act import GROUP_NORM_ACT, group_norm_act
from .impl import Call, Impl
from .norm_act_conv import norm_act_conv, set_norm_act_recompute
from .op import Op, explain, ops, ops_of_backend
from .qkv_attention import QKV_ATTENTION, qkv_attention

__all__ = [
    "Backend", "BackendNotSupported", "Call", "Impl", "Op", "backends", "current_backend",
    "explain", "ops", "ops_of_backend", "register_backend", "set_backend", "use_backend", "group_norm_act",
    "qkv_attention", "ddpm_step", "ddim_step", "norm_act_conv", "set_norm_act_recompute",
    "GROUP_NORM_ACT", "QKV_ATTENTION", "DDPM_STEP", "DDIM_STEP", "conv3x3", "CONV3X3",
]
