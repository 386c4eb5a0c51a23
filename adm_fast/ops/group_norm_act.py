"""group_norm_act: SiLU((GroupNorm(x)·weight + bias)·(1 + scale) + shift).

This is ADM's AdaGN (`use_scale_shift_norm`), its plain `SiLU(GN(x))`, and the
GroupNorm before attention (act=False, no scale/shift), all as one op.

The eager reference is guided-diffusion's arithmetic, rounding for rounding:
the normalisation runs in fp32 (its GroupNorm32) and is cast back to x's
dtype; the scale-shift and SiLU then run in x's dtype.

The fused kernels return (y, mean, rstd); their backward keeps only x, the
per-(sample, group) mean and 1/std and the small vectors, and recomputes the
normalised and activated values. Implementations: eager (the reference),
triton (adm_fast/kernels/group_norm_act.py), cpu (csrc/cpu/group_norm_act.cpp), cuda
(csrc/cuda/group_norm_act.cu).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .backends import TritonImpl
from .impl import Impl
from .op import Op

SIGNATURE = ("Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, "
             "Tensor? shift, float eps, bool act")
BACKWARD_SIGNATURE = ("Tensor dy, Tensor x, int num_groups, Tensor? weight, Tensor? bias, "
                      "Tensor? scale, Tensor? shift, Tensor mean, Tensor rstd, bool act, "
                      "bool need_wb")


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(t.shape + (1,) * (ndim - 2))


def reference(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
              scale: Tensor | None = None, shift: Tensor | None = None,
              eps: float = 1e-5, act: bool = True) -> Tensor:
    """guided-diffusion's eager computation (differentiable, any dtype incl. fp64)."""
    up = torch.float64 if x.dtype == torch.float64 else torch.float32
    xu = x.to(up)
    if weight is None and bias is not None and bias.requires_grad:
        # F.group_norm's backward fails for a bias without a weight ("tensor does
        # not have a device"); a weight of ones computes the same values.
        weight = torch.ones_like(bias)
    if not xu.requires_grad and not xu.is_contiguous() and any(
            t is not None and t.requires_grad for t in (weight, bias)):
        # ... and its CPU backward crashes (SIGSEGV) for channels_last x that
        # needs no grad beside affine parameters that do; a contiguous copy
        # computes the same.
        xu = xu.contiguous()
    h = F.group_norm(xu, num_groups, None if weight is None else weight.to(up),
                     None if bias is None else bias.to(up), eps).to(x.dtype)
    if scale is not None:
        h = h * (1 + _per_channel(scale.to(x.dtype), x.dim()))
    if shift is not None:
        h = h + _per_channel(shift.to(x.dtype), x.dim())
    return F.silu(h) if act else h


class GroupNormAct(Op):
    name = "group_norm_act"
    signature = SIGNATURE
    kernel_returns = 3  # y, then the fp32 [N, G] mean and 1/std the backward keeps
    kept_outputs = (1, 2)
    has_kernel_backward = True
    preferences = [
        # On a CPU the fused forward wins at every size, but forward+backward on
        # maps of 8×8 and below loses to eager from batch 4 up (the backward
        # kernel's fixed costs) (docs/performance.md).
        {"device": "cpu", "grad": True, "max": {"hw": 64}, "order": ["eager"]},
    ]
    # ... and on another CPU the two tie at 8×8 with autograd: auto times them
    # per call signature (ops/autotune.py).
    tune = {"cpu": ("cpu", "eager")}

    def check(self, x, num_groups, weight, bias, scale, shift, eps, act) -> None:
        op = self.name
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{op}: x must be a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x))}")
        if x.dim() < 2:
            raise ValueError(f"{op}: x must be [N, C, *spatial], got shape {tuple(x.shape)}")
        n, c = x.shape[:2]
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 \
                or c % num_groups:
            raise ValueError(f"{op}: num_groups={num_groups} must divide the {c} channels")
        if c // num_groups * math.prod(x.shape[2:]) == 1 and x.numel():
            # torch's GroupNorm refuses this too (guided-diffusion's GroupNorm32 would).
            raise ValueError(f"{op}: each group holds one value ({c // num_groups} channel(s) "
                             f"x {math.prod(x.shape[2:])} positions); a group needs more than "
                             f"one to normalise")
        for name, t, want in (("weight", weight, (c,)), ("bias", bias, (c,)),
                              ("scale", scale, (n, c)), ("shift", shift, (n, c))):
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
            if tuple(t.shape) != want:
                shape = "[N, C]" if len(want) == 2 else ""
                raise ValueError(f"{op}: {name} must have shape {want}"
                                 f"{' = ' + shape if shape else ''}, got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        # One rule for every backend (csrc/checks.h check_eps is the same): an
        # infinite eps normalises every value to 0, and with eps = 0 a constant
        # group is 0/0. (A chained comparison: math.isfinite overflows on a huge int.)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
                or not 0 < eps < math.inf:
            raise ValueError(f"{op}: eps must be a finite number > 0, got {eps!r}")

    reference = staticmethod(reference)

    def features(self, x, num_groups, *rest):
        return {"hw": math.prod(x.shape[2:]), "group_channels": x.shape[1] // num_groups}

    def fake(self, x, num_groups, *rest):
        stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
        return torch.empty_like(x), stats, torch.empty_like(stats)

    def kernel_backward(self, impl, args, kept, grads, needs):
        x, num_groups, weight, bias, scale, shift, eps, act = args
        dx, dw, db, ds, dsh = impl.backward(grads[0], x, num_groups, weight, bias, scale, shift,
                                            *kept, act, bool(needs[2] or needs[3]))
        return dx, None, dw, db, ds, dsh, None, None


GROUP_NORM_ACT = GroupNormAct()


def _fake_backward(dy, x, num_groups, weight, bias, scale, shift, mean, rstd, act, need_wb):
    def like(t, wanted=True):
        return torch.empty_like(t) if t is not None and wanted else x.new_empty(0)
    return (torch.empty_like(x), like(weight, need_wb), like(bias, need_wb), like(scale),
            like(shift))


# The C++ and CUDA kernels: absent gradients come back as empty tensors.
NATIVE_FORWARD = native.define("group_norm_act_fwd", SIGNATURE, 3, GROUP_NORM_ACT.fake)
NATIVE_BACKWARD = native.define("group_norm_act_bwd", BACKWARD_SIGNATURE, 5, _fake_backward)


class Triton(TritonImpl):
    module = "group_norm_act"
    layouts = {"x": ("contiguous", "channels_last", "channels_last_1d", "channels_last_3d"),
               "weight": ("contiguous",), "bias": ("contiguous",)}
    max_features = {"group_channels": 1024}  # one group's channels in one tile

    def forward(self, *args):
        return self.kernels.forward(*args)

    def backward(self, *args):
        return self.kernels.backward(*args)


class _Native(Impl):
    def native_ops(self):
        return NATIVE_FORWARD, NATIVE_BACKWARD

    def forward(self, *args):
        return NATIVE_FORWARD(*args)

    def backward(self, dy, x, num_groups, weight, bias, scale, shift, mean, rstd, act,
                 need_wb):
        grads = NATIVE_BACKWARD(dy, x, num_groups, weight, bias, scale, shift, mean, rstd,
                                act, need_wb)
        return tuple(g if t is not None and g.numel() else None
                     for g, t in zip(grads, (x, weight, bias, scale, shift)))


class Cpu(_Native):
    backend = "cpu"
    layouts = {"x": ("contiguous", "channels_last", "channels_last_1d", "channels_last_3d"),
               "weight": ("contiguous",), "bias": ("contiguous",)}


class Cuda(_Native):
    backend = "cuda"
    layouts = {"x": ("contiguous", "channels_last", "channels_last_1d"),
               "weight": ("contiguous",), "bias": ("contiguous",)}


for _impl in (Triton(), Cpu(), Cuda()):
    GROUP_NORM_ACT.register(_impl)


def group_norm_act(x: Tensor, num_groups: int, weight: Tensor | None = None,
                   bias: Tensor | None = None, scale: Tensor | None = None,
                   shift: Tensor | None = None, eps: float = 1e-5,
                   act: bool = True) -> Tensor:
    """SiLU((GroupNorm(x)·weight + bias)·(1 + scale) + shift).

    x: [N, C, *spatial] (any memory format), fp32/fp16/bf16 (fp64 on eager).
    weight, bias: [C] GroupNorm affine parameters, or None.
    scale, shift: [N, C] AdaGN modulation, or None.
    act: apply SiLU. Statistics are always computed in fp32.
    Returns a tensor shaped and typed like x.
    """
    return GROUP_NORM_ACT(x, num_groups, weight, bias, scale, shift, float(eps), bool(act))
