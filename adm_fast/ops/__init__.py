"""adm_fast's op layer: the only place that knows kernels exist.

Models call these functions by name; which implementation runs is decided per
call by the backend setting (`use_backend`, `$ADM_FAST_BACKEND`, or auto).
Each op is one spec file (group_norm_act.py, qkv_attention.py, ddpm_step.py,
ddim_step.py): its check, reference, fake, autograd and implementations.
"""

from . import backends as _backends
from .conv3x3 import CONV3X3, conv3x3
from .backend import (Backend, BackendNotSupported, backends, current_backend,
                      register_backend, set_backend, use_backend)
from .ddim_step import DDIM_STEP, ddim_step
from .ddpm_step import DDPM_STEP, ddpm_step
from .group_norm_act import GROUP_NORM_ACT, group_norm_act
from .impl import Call, Impl
from .layout import preferred_memory_format, use_preferred_layout
from .norm_act_conv import norm_act_conv, set_norm_act_recompute
from .op import Op, explain, ops, ops_of_backend
from .pointwise import conv1x1, conv1x1_token, prepend_token, tidy_strides
from .qkv_attention import QKV_ATTENTION, qkv_attention

_backends.load_native()  # after the specs above defined the schemas the extensions implement

__all__ = [
    "Backend", "BackendNotSupported", "Call", "Impl", "Op", "backends", "current_backend",
    "explain", "ops", "ops_of_backend", "register_backend", "set_backend", "use_backend", "group_norm_act",
    "qkv_attention", "ddpm_step", "ddim_step", "norm_act_conv", "set_norm_act_recompute",
    "GROUP_NORM_ACT", "QKV_ATTENTION", "DDPM_STEP", "DDIM_STEP", "preferred_memory_format",
    "use_preferred_layout", "conv1x1", "conv1x1_token", "prepend_token", "tidy_strides", "conv3x3", "CONV3X3",
]
