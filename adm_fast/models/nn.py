"""Small pieces the ADM models share: the timestep embedding, the GroupNorm
module, dtype helpers and the checkpointing switch."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint
from torch import Tensor

from .. import ops

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


def norm_act(norm: nn.GroupNorm, x: Tensor, scale: Tensor = None, shift: Tensor = None,
             act: bool = True) -> Tensor:
    """SiLU(norm(x)·(1 + scale) + shift) through the op layer."""
    return ops.group_norm_act(x, norm.num_groups, norm.weight, norm.bias, scale, shift,
                              norm.eps, act)


# Whether a conv fed by a fused norm_act keeps the norm's input instead of its
# own (see norm_act_conv). On by default; set_norm_act_recompute(False) trades
# the memory back for the recompute time.
_RECOMPUTE = {"norm_act": True}


def set_norm_act_recompute(enabled: bool) -> None:
    _RECOMPUTE["norm_act"] = bool(enabled)


class _Recompute:
    """What a saved conv input is rebuilt from: the norm's own saved input."""

    __slots__ = ("x", "norm", "scale", "shift", "act", "backend", "between")

    def __init__(self, x, norm, scale, shift, act, backend, between=None):
        self.x, self.norm, self.scale, self.shift = x, norm, scale, shift
        self.act, self.backend, self.between = act, backend, between


def _unpack(saved):
    if not isinstance(saved, _Recompute):
        return saved
    # Grad mode is on here only for double backward (create_graph=True): then
    # the rebuilt input must carry its graph back to x, as the original did.
    n = saved.norm
    h = ops.group_norm_act_with(saved.backend, saved.x, n.num_groups, n.weight, n.bias,
                                saved.scale, saved.shift, n.eps, saved.act)
    return h if saved.between is None else saved.between(h)


def norm_act_conv(norm: nn.GroupNorm, x: Tensor, conv: nn.Module, scale: Tensor = None,
                  shift: Tensor = None, act: bool = True, between=None,
                  recompute: bool = True) -> Tensor:
    """conv(between(norm_act(x))), `between` a parameter-free resampling or None.

    In training on a fused backend, the conv (and `between`) do not keep their
    inputs for backward (full activation tensors, per block): they keep a
    recipe instead (x, which the fused norm keeps anyway, and the small
    vectors) and rebuild the inputs in backward with one memory-bound pass —
    the trade flash attention makes for its weights. Tensors saved inside are
    not seen by saved_tensors_hooks of the caller (as with torch's checkpoint).
    The eager backend stays guided-diffusion's computation, memory included.
    recompute=False (e.g. inside a checkpointed block, which keeps nothing
    anyway) is the plain composition.
    """
    backend = None
    if recompute and _RECOMPUTE["norm_act"] and torch.is_grad_enabled() \
            and not torch.compiler.is_compiling() \
            and any(t is not None and t.requires_grad
                    for t in (x, norm.weight, norm.bias, scale, shift)):
        # Chosen once: the norm runs on it and the recipe rebuilds on it.
        backend = ops.group_norm_act_backend(x, norm.num_groups, norm.weight, norm.bias,
                                             scale, shift, norm.eps, act)
    if backend is None or backend == "eager":
        h = norm_act(norm, x, scale, shift, act)
        return conv(h if between is None else between(h))
    h = ops.group_norm_act_with(backend, x, norm.num_groups, norm.weight, norm.bias, scale,
                                shift, norm.eps, act)
    recipes = [(h, _Recompute(x, norm, scale, shift, act, backend))]

    def pack(t):
        for made, recipe in recipes:
            if t is made:
                return recipe
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        if between is not None:
            g = between(h)
            recipes.append((g, _Recompute(x, norm, scale, shift, act, backend, between)))
            h = g
        return conv(h)


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
