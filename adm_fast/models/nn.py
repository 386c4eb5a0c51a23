"""Small pieces the ADM models share: the timestep embedding, the GroupNorm
module, dtype helpers and the checkpointing switch."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint
from torch import Tensor

from .fused import norm_act

NUM_GROUPS = 32


def timestep_embedding(timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps [N].

    The layout [cos | sin] and the fp32 frequency table are guided-diffusion's,
    so released weights see the embedding they were trained on.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * exponent / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with fp32 statistics whose output keeps the input's dtype.

    Same parameters (and state_dict keys) as guided-diffusion's GroupNorm32;
    the arithmetic goes through ops.group_norm_act so a backend can fuse it.
    """

    def forward(self, x: Tensor) -> Tensor:
        return norm_act(self, x, act=False)


def normalization(channels: int) -> GroupNorm32:
    if channels % NUM_GROUPS:
        raise ValueError(f"ADM normalises with GroupNorm({NUM_GROUPS}); {channels} "
                         f"channels are not divisible by {NUM_GROUPS}")
    return GroupNorm32(NUM_GROUPS, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def check_dims(dims: int) -> None:
    if dims != 2:
        raise ValueError(f"adm_fast implements 2-D image models only (dims=2), got dims={dims}")


def param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def maybe_checkpoint(enabled: bool, fn, *args):
    """Run fn(*args), recomputing it in backward when `enabled` and grads flow.

    Non-reentrant checkpointing: it tracks parameters by itself, preserves the
    RNG state for dropout, and supports double backward.
    """
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# The torso of a model (convolutions) may run in a lower precision than its
# head and embeddings, as guided-diffusion's use_fp16 does.
_TORSO_TYPES = (nn.Conv1d, nn.Conv2d)


def convert_torso(module: nn.Module, dtype: torch.dtype) -> None:
    for m in module.modules():
        if isinstance(m, _TORSO_TYPES):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
