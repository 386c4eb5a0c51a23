"""conv1x1: a kernel-1 Conv1d (attention's qkv and output projections) in
whichever form suits its input's layout; conv1x1_token: its output at one
token.

For NCHW-contiguous input it is the module itself (guided-diffusion's
computation). For the [N, C, T] view of a channels_last map (channels
contiguous), a matmul over the channels of the [N, T, C] view, whose output
keeps that layout: Conv1d would copy the input to NCHW first and take 6 ms
where the matmul takes 1.5 (64 -> 192 channels, 1024 tokens, batch 4, 2 threads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import current_backend
from .impl import layout_of


def conv1x1(conv: nn.Conv1d, x: Tensor) -> Tensor:
    if (layout_of(x) == "channels_last_1d" and conv.kernel_size == (1,) and conv.groups == 1
            and conv.stride == (1,) and conv.padding == (0,) and conv.dilation == (1,)):
        return F.linear(x.transpose(1, 2), conv.weight.squeeze(-1), conv.bias).transpose(1, 2)
    return conv(x)


def prepend_token(x: Tensor, token: Tensor) -> Tensor:
    """torch.cat([token, x], dim=-1) for x [N, C, T] and token [N, C, 1], in x's
    layout: cat makes a 3-D result contiguous, which for the [N, C, T] view of
    a channels_last map is a transposing copy, and every op after it (the
    attention pool's projections and attention) would then copy again. The
    values are cat's either way."""
    if layout_of(x) == "channels_last_1d" and x.shape[-1] > 1:
        return torch.cat([token.transpose(1, 2), x.transpose(1, 2)], dim=1).transpose(1, 2)
    return torch.cat([token, x], dim=-1)


def tidy_strides(x: Tensor) -> Tensor:
    """x, as a view with the strides its memory format implies. A dimension of
    size one may carry any stride, and an elementwise op leaves a batch of one
    channels_last map with whatever its iterator chose; ops that take their
    output's layout from their input's strides (cat, interpolate, pooling)
    then read it as NCHW, and every layer after would run, or copy, NCHW."""
    if (x.dim() == 4 and x.shape[0] == 1 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()):
        c, h, w = x.shape[1:]
        if x.stride() != (h * w * c, 1, w * c, c):
            # views all the way (as_strided's backward would scatter)
            return x.permute(0, 2, 3, 1).reshape(-1).view(1, h, w, c).permute(0, 3, 1, 2)
    return x


def conv1x1_token(conv: nn.Conv1d, x: Tensor, index: int = 0) -> Tensor:
    """conv1x1(conv, x)[:, :, index]. guided-diffusion projects every token and
    keeps one (the attention pool: a 1000-way head over HW + 1 tokens, 16 of 17
    discarded at 4x4); the eager backend does the same, the others project only
    the token kept. A 1x1 projection treats tokens independently, so the kept
    values are the same computation either way."""
    if current_backend("conv1x1_token") == "eager":
        return conv1x1(conv, x)[:, :, index]
    return conv1x1(conv, x[:, :, index:index + 1])[:, :, 0]
