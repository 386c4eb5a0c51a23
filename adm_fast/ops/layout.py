"""The memory format adm_fast runs a model's convolutions and activations in,
per device: part of the engine's choice, as the backends are.

CPU, sampling: channels_last. oneDNN's convolutions are fastest in it (measured
at ADM's shapes, 2 threads, batch 4, fp32: 3x3 convs 1.2-2.0x NCHW, the 64x64
UNet forward 1.2x with the eager ops), and the fused CPU GroupNorm, the
attention projections (conv1x1) and SDPA take it without copies; the guiding
classifier, differentiated for its input at every step, gains too (a guided
step 1.42x eager, against 1.33x with an NCHW classifier). CPU, training:
channels_last too, where conv3x3's Winograd backward runs (∇x and the
weights' gradient, csrc/cpu/winograd.cpp): the 64x64 UNet's training step
2325 ms channels_last, 3147 NCHW, 3386 eager, on an AVX2 EPYC; before that
backward, oneDNN's NCHW weight gradient had the edge (2854 ms NCHW, 2900
channels_last). CUDA: contiguous
until bench/gpu_check measures channels_last there. The values are the
model's up to the rounding of the convolutions' summation order; the eager
reference stays NCHW, guided-diffusion's layout.
"""

from __future__ import annotations

import torch
from torch import nn

# (device type, training) -> memory format; absent: contiguous
_PREFERRED = {("cpu", False): torch.channels_last, ("cpu", True): torch.channels_last}


def preferred_memory_format(device, training: bool = False) -> torch.memory_format:
    return _PREFERRED.get((torch.device(device).type, bool(training)), torch.contiguous_format)


def use_preferred_layout(model: nn.Module, device=None, training: bool = False) -> nn.Module:
    """Put the model's 4-D weights (its convolutions) in the preferred memory
    format for the device and the use (sampling, or training), in place;
    returns the model. Its convolutions then emit that format from an NCHW
    input on, and every adm_fast op takes it."""
    if device is None:
        device = next(model.parameters()).device
    fmt = preferred_memory_format(device, training)
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=fmt)
    return model
