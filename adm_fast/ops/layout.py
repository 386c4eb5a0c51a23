"""The memory format adm_fast runs a model's convolutions and activations in,
per device: part of the engine's choice, as the backends are.

CPU, sampling: channels_last. oneDNN's convolutions are fastest in it (measured
at ADM's shapes, 2 threads, batch 4, fp32: 3x3 convs 1.2-2.0x NCHW, the 64x64
UNet forward 1.2x with the eager ops), and the fused CPU GroupNorm, the
attention projections (conv1x1) and SDPA take it without copies; the guiding
classifier, differentiated for its input at every step, gains too (a guided
step 1.42x eager, against 1.33x with an NCHW classifier). CPU, training:
channels_last too, where conv3x3's Winograd backward runs (∇x and the
weights' gradient, csrc/cpu/conv3x3_winograd.cpp): the 64x64 UNet's training step
2325 ms channels_last, 3147 NCHW, 3386 eager, on an AVX2 EPYC; before that
backward, oneDNN's NCHW weight gradient had the edge (2854 ms NCHW, 2900
channels_last).

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

from typing import Optional

import torch
from torch import nn

_LOW = (torch.float16, torch.bfloat16)


def preferred_memory_format(device, training: bool = False,
                            dtype: Optional[torch.dtype] = None) -> torch.memory_format:
    """The memory format for a model's convolutions on device, for sampling or
    training, whose convolutions run in dtype (None: fp32)."""
    kind = torch.device(device).type
    if kind == "cpu" or (kind == "cuda" and dtype in _LOW):
        return torch.channels_last
    return torch.contiguous_format


def use_preferred_layout(model: nn.Module, device=None, training: bool = False,
                         dtype: Optional[torch.dtype] = None) -> nn.Module:
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
