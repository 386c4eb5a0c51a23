"""The models' layers onto the op layer: a GroupNorm, a convolution or a
kernel-1 projection module in, the op that computes it called on its tensors.

conv1x1 takes a kernel-1 Conv1d (attention's qkv and output projections) in
whichever form suits its input's layout: for NCHW-contiguous input the module
itself (guided-diffusion's computation); for the [N, C, T] view of a
channels_last map (channels contiguous), a matmul over the channels of the
[N, T, C] view, whose output keeps that layout: Conv1d would first copy the
input to NCHW, and take longer than the matmul (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.backend import AUTO, named_for
from ..ops.conv3x3 import CONV3X3
from ..ops.impl import layout_of


def norm_act(norm: nn.GroupNorm, x: Tensor, scale: Tensor = None, shift: Tensor = None,
             act: bool = True) -> Tensor:
    """SiLU(norm(x)·(1 + scale) + shift) through the op layer."""
    return ops.group_norm_act(x, norm.num_groups, norm.weight, norm.bias, scale, shift,
                              norm.eps, act)


def norm_act_conv(norm: nn.GroupNorm, x: Tensor, conv: Callable[[Tensor], Tensor],
                  scale: Tensor = None, shift: Tensor = None, act: bool = True,
                  between: Callable[[Tensor], Tensor] | None = None,
                  recompute: bool = True, dropout: float = 0.0) -> Tensor:
    """conv(between(norm_act(x))) (or conv(dropout(norm_act(x))), training)
    through the op layer, which may keep a recipe for the conv's input instead
    of the input (ops.norm_act_conv). conv: a module, or any function of the
    activations; a 3x3 nn.Conv2d goes through apply_conv's rule."""
    return ops.norm_act_conv(lambda h: apply_conv(conv, h), x, norm.num_groups, norm.weight,
                             norm.bias, scale, shift, norm.eps, act, between=between,
                             recompute=recompute, dropout=dropout)


def is_conv3x3(module) -> bool:
    """Whether module is an nn.Conv2d the conv3x3 op computes (3×3, stride 1, padding 1)."""
    return (type(module) is nn.Conv2d and module.kernel_size == (3, 3)
            and module.stride == (1, 1) and module.padding == (1, 1)
            and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def apply_conv(module: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """module(x), through the conv3x3 op where module is such a convolution and
    the setting in force for conv3x3 is auto or names conv3x3 by op
    (use_backend({"conv3x3": "cpu"}))."""
    # Not the other ops' rule, where a backend chosen for every op applies to
    # each op strictly: such a setting (use_backend("triton"), adm-fast sample
    # --backend cuda) names the fused norm, attention and steps. conv3x3 is
    # implemented on eager and cpu only, so under the strict rule every model
    # convolution would raise BackendNotSupported on triton, cuda or sdpa, and
    # under "cpu" the model would take Winograd's rounding where the setting
    # asked for the fused ops. The module is guided-diffusion's convolution.
    if is_conv3x3(module) and (ops.current_backend(CONV3X3.name) == AUTO
                               or named_for(CONV3X3.name)):
        return CONV3X3(x, module.weight, module.bias)
    return module(x)


def conv1x1(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """conv(x) for a kernel-1 Conv1d, in the form x's layout wants (module docstring)."""
    if (layout_of(x) == "channels_last_1d" and conv.kernel_size == (1,) and conv.groups == 1
            and conv.stride == (1,) and conv.padding == (0,) and conv.dilation == (1,)):
        return F.linear(x.transpose(1, 2), conv.weight.squeeze(-1), conv.bias).transpose(1, 2)
    return conv(x)


def conv1x1_token(conv: nn.Conv1d, x: Tensor, index: int = 0) -> Tensor:
    """conv1x1(conv, x)[:, :, index]. guided-diffusion projects every token and
    keeps one (the attention pool: a 1000-way head over HW + 1 tokens, 16 of 17
    discarded at 4x4); so does the eager backend chosen for every op, while
    any other setting projects only the token kept. A 1x1 projection treats
    tokens independently, so the kept values are the same computation either
    way. Not an op of its own: two torch calls, nothing for a backend to
    implement."""
    if ops.current_backend() == "eager":
        return conv1x1(conv, x)[:, :, index]
    return conv1x1(conv, x[:, :, index:index + 1])[:, :, 0]
