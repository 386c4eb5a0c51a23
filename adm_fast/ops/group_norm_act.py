"""group_norm_act: SiLU((GroupNorm(x)·weight + bias)·(1 + scale) + shift).

This is ADM's AdaGN (`use_scale_shift_norm`), its plain `SiLU(GN(x))`, and the
GroupNorm before attention (act=False, no scale/shift), all as one op.

The eager reference is guided-diffusion's arithmetic, rounding for rounding:
the normalisation runs in fp32 (its GroupNorm32) and is cast back to x's
dtype; the scale-shift and SiLU then run in x's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

OP = "group_norm_act"


def check_args(x, num_groups, weight, bias, scale, shift) -> None:
    """Raise a clear error for inputs no backend can accept."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{OP}: x must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x))}")
    if x.dim() < 2:
        raise ValueError(f"{OP}: x must be [N, C, *spatial], got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"{OP}: num_groups={num_groups} must divide the {c} channels")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != (c,):
            raise ValueError(f"{OP}: {name} must have shape ({c},), got {tuple(t.shape)}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if tuple(t.shape) != (n, c):
            raise ValueError(f"{OP}: {name} must have shape ({n}, {c}) = [N, C], "
                             f"got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{OP}: {name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but x is on {x.device}")


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(t.shape + (1,) * (ndim - 2))


def reference(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
              scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
              eps: float = 1e-5, act: bool = True) -> Tensor:
    """guided-diffusion's eager computation (differentiable, any dtype incl. fp64)."""
    up = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = F.group_norm(
        x.to(up), num_groups,
        None if weight is None else weight.to(up),
        None if bias is None else bias.to(up),
        eps,
    ).to(x.dtype)
    if scale is not None:
        h = h * (1 + _per_channel(scale.to(x.dtype), x.dim()))
    if shift is not None:
        h = h + _per_channel(shift.to(x.dtype), x.dim())
    return F.silu(h) if act else h


def group_norm_act(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                   shift: Optional[Tensor] = None, eps: float = 1e-5,
                   act: bool = True) -> Tensor:
    """SiLU((GroupNorm(x)·weight + bias)·(1 + scale) + shift).

    x: [N, C, *spatial] (any memory format), fp32/fp16/bf16.
    weight, bias: [C] GroupNorm affine parameters, or None.
    scale, shift: [N, C] AdaGN modulation, or None.
    act: apply SiLU. Statistics are always computed in fp32.
    Returns a tensor shaped and typed like x.
    """
    check_args(x, num_groups, weight, bias, scale, shift)
    return dispatch.call(OP, x, num_groups, weight, bias, scale, shift, eps, act)
