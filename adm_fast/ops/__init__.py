"""adm_fast's op layer: the only place that knows kernels exist.

Models call these functions by name; which implementation runs is decided per
call by the backend setting (`use_backend`, `$ADM_FAST_BACKEND`, or auto).
"""

from .dispatch import (
    Backend,
    BackendNotSupported,
    backends,
    current_backend,
    explain,
    register_backend,
    set_backend,
    use_backend,
)
from .ddim_step import ddim_step
from .ddpm_step import ddpm_step
from .group_norm_act import group_norm_act, group_norm_act_backend, group_norm_act_with
from .qkv_attention import qkv_attention
from . import eager as _eager  # noqa: F401  (registers the eager backend)
from . import cpu_backend as _cpu_backend  # noqa: F401  (registers the CPU backend)
from . import cuda_backend as _cuda_backend  # noqa: F401  (registers the CUDA backend)
from . import sdpa_backend as _sdpa_backend  # noqa: F401  (registers the SDPA backend)
from . import triton_backend as _triton_backend  # noqa: F401  (registers the Triton backend)

__all__ = [
    "Backend", "BackendNotSupported", "backends", "current_backend", "explain",
    "register_backend", "set_backend", "use_backend", "group_norm_act", "group_norm_act_backend",
    "group_norm_act_with", "qkv_attention",
    "ddpm_step", "ddim_step",
]
