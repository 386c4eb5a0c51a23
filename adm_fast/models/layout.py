"""The memory format adm_fast runs a model's convolutions and activations in,
per device: part of the engine's choice, as the backends are; and the two
helpers that keep a model's activations in it.

CPU, sampling: channels_last. oneDNN's convolutions are faster in it at ADM's
shapes, and so is the UNet's forward with the eager ops; the fused CPU
GroupNorm, the attention projections (conv1x1) and SDPA take it without
copies; the guiding classifier, differentiated for its input at every step,
gains too. CPU, training: channels_last too, where conv3x3's Winograd
backward runs (∇x and the weights' gradient, csrc/cpu/conv3x3_winograd.cpp):
the training step is faster than NCHW's. Before that backward, oneDNN's NCHW
weight gradient had the edge. The figures: docs/performance.md.

CUDA in fp16/bf16: channels_last, sampling and training. cuDNN's 16-bit
tensor-core convolutions run NHWC; on NCHW tensors each one transposes its
input and output around the kernel (and, backward, the incoming gradient):
traffic a guided step pays around every convolution. The fused GroupNorm,
attention and step kernels take channels_last (and attention's [N, C, T]
view of it) in place, so a model stays NHWC from its first convolution to
its last (`adm-fast bench plan` shows no layout copy between them). CUDA in
fp32: contiguous, until a GPU measures the other.

The values are the model's up to the rounding of the convolutions' summation
order; the eager reference stays NCHW, guided-diffusion's layout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.impl import layout_of

_LOW = (torch.float16, torch.bfloat16)


def preferred_memory_format(device, training: bool = False,
                            dtype: torch.dtype | None = None) -> torch.memory_format:
    """The memory format for a model's convolutions on device, for sampling or
    training, whose convolutions run in dtype (None: fp32)."""
    kind = torch.device(device).type
    if kind == "cpu" or (kind == "cuda" and dtype in _LOW):
        return torch.channels_last
    return torch.contiguous_format


def use_preferred_layout(model: nn.Module, device=None, training: bool = False,
                         dtype: torch.dtype | None = None) -> nn.Module:
    """Put the model's 4-D weights (its convolutions) in the preferred memory
    format for the device and the use (sampling, or training), in place;
    returns the model. Its convolutions then emit that format from an NCHW
    input on, and every adm_fast op takes it. dtype: what the convolutions
    will run in (e.g. under autocast); None reads it off their weights."""
    params = list(model.parameters())
    if device is None:
        device = params[0].device
    if dtype is None:
        conv = [p.dtype for p in params if p.dim() == 4]
        dtype = next((d for d in conv if d in _LOW), conv[0] if conv else None)
    fmt = preferred_memory_format(device, training, dtype)
    for p in params:
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=fmt)
    return model


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


def prepend_token(x: Tensor, token: Tensor) -> Tensor:
    """torch.cat([token, x], dim=-1) for x [N, C, T] and token [N, C, 1], in x's
    layout: cat makes a 3-D result contiguous, which for the [N, C, T] view of
    a channels_last map is a transposing copy, and every op after it (the
    attention pool's projections and attention) would then copy again. The
    values are cat's either way."""
    if layout_of(x) == "channels_last_1d" and x.shape[-1] > 1:
        return torch.cat([token.transpose(1, 2), x.transpose(1, 2)], dim=1).transpose(1, 2)
    return torch.cat([token, x], dim=-1)
