"""group_norm_act: SiLU((GroupNorm(x)·weight + bias)·(1 + scale) + shift).

This is ADM's AdaGN (`use_scale_shift_norm`), its plain `SiLU(GN(x))`, and the
GroupNorm before attention (act=False, no scale/shift), all as one op.

The eager reference is guided-diffusion's arithmetic, rounding for rounding:
the normalisation runs in fp32 (its GroupNorm32) and is cast back to x's
dtype; the scale-shift and SiLU then run in x's dtype.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

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


def group_norm_act_backend(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                           bias: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                           shift: Optional[Tensor] = None, eps: float = 1e-5,
                           act: bool = True) -> str:
    """The name of the backend group_norm_act would run these arguments on."""
    return dispatch.select(OP, x, num_groups, weight, bias, scale, shift, eps, act).name


def group_norm_act_with(backend: str, x: Tensor, num_groups: int, weight: Optional[Tensor],
                        bias: Optional[Tensor], scale: Optional[Tensor] = None,
                        shift: Optional[Tensor] = None, eps: float = 1e-5,
                        act: bool = True) -> Tensor:
    """group_norm_act on one named backend, whatever the current setting: a
    value recomputed in backward must come from the backend that made it."""
    return dispatch.backends()[backend].ops[OP](x, num_groups, weight, bias, scale, shift,
                                                 eps, act)


# --- the fused path: one custom op for every fused backend ---------------------------
#
# torch.ops.adm_fast.group_norm_act returns (y, mean, rstd); its backward saves only
# x, the per-(sample, group) mean and 1/std and the small vectors, and recomputes
# the normalised and activated values. `backend` names the implementation in
# IMPLS (a module with forward/backward, loaded on first use).

IMPLS: Dict[str, Callable] = {}


@torch.library.triton_op("adm_fast::group_norm_act", mutates_args=())
def _fused(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
           scale: Optional[Tensor], shift: Optional[Tensor], num_groups: int, eps: float,
           act: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return IMPLS[backend]().forward(x, weight, bias, scale, shift, num_groups, eps, act)


@_fused.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, act, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.triton_op("adm_fast::group_norm_act_backward", mutates_args=())
def _fused_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    scale: Optional[Tensor], shift: Optional[Tensor], mean: Tensor,
                    rstd: Tensor, num_groups: int, act: bool, need_wb: bool,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = IMPLS[backend]().backward(dy, x, weight, bias, scale, shift, mean, rstd,
                                      num_groups, act, need_wb)
    # Custom ops return tensors: an absent gradient is an empty one.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_fused_backward.register_fake
def _(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, act, need_wb, backend):
    def like(t, wanted=True):
        return torch.empty_like(t) if t is not None and wanted else x.new_empty(0)
    return (torch.empty_like(x), like(weight, need_wb), like(bias, need_wb), like(scale),
            like(shift))


def _setup(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, act, backend = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift, output[1], output[2])
    ctx.num_groups, ctx.act, ctx.backend, ctx.eps = num_groups, act, backend, eps


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the kernels are not
        # differentiable, so take this gradient through the eager reference.
        return differentiable_grads(
            lambda *t: reference(t[0], ctx.num_groups, *t[1:], ctx.eps, ctx.act),
            (x, weight, bias, scale, shift), need[:5], dy) + (None,) * 4
    grads = torch.ops.adm_fast.group_norm_act_backward(
        dy, x, weight, bias, scale, shift, mean, rstd, ctx.num_groups, ctx.act,
        bool(need[1] or need[2]), ctx.backend)
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None,) * 4


_fused.register_autograd(_backward, setup_context=_setup)


def differentiable_grads(fn, tensors, needs, grad_out):
    """Gradients of fn(*tensors) w.r.t. the tensors needing them, with graph."""
    leaves = [t.detach().requires_grad_(bool(n)) if t is not None else None
              for t, n in zip(tensors, needs)]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True,
                                   allow_unused=True))
    return tuple(next(got) if t is not None and t.requires_grad else None for t in leaves)


class _Direct(torch.autograd.Function):
    """The custom op's autograd, without the custom op: in eager mode its
    dispatch costs ~150 µs per forward+backward, more than the kernels of a
    small GroupNorm (an 8×8 map) take."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, act, backend):
        y, mean, rstd = IMPLS[backend]().forward(x, weight, bias, scale, shift, num_groups,
                                                 eps, act)
        _setup(ctx, (x, weight, bias, scale, shift, num_groups, eps, act, backend),
               (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            return _backward(ctx, dy, None, None)
        grads = IMPLS[ctx.backend]().backward(dy, x, weight, bias, scale, shift, mean, rstd,
                                              ctx.num_groups, ctx.act, bool(need[1] or need[2]))
        return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None,) * 4


def fused(backend: str) -> Callable:
    """The op implementation that runs `backend`'s kernels: through the custom op
    under torch.compile, through a plain autograd Function when autograd wants
    the backward, straight to the kernels otherwise (sampling)."""
    def run(x, num_groups, weight, bias, scale, shift, eps, act):
        if torch.compiler.is_compiling():
            return torch.ops.adm_fast.group_norm_act(x, weight, bias, scale, shift, num_groups,
                                                     float(eps), bool(act), backend)[0]
        if needs_grad(x, weight, bias, scale, shift):
            return _Direct.apply(x, weight, bias, scale, shift, num_groups, float(eps),
                                 bool(act), backend)
        return IMPLS[backend]().forward(x, weight, bias, scale, shift, num_groups, float(eps),
                                        bool(act))[0]
    return run


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def needs_custom_op(*tensors) -> bool:
    """Whether a call must go through the custom op: under torch.compile, or
    when autograd will want its backward."""
    return torch.compiler.is_compiling() or needs_grad(*tensors)
