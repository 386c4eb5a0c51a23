"""What the two sampling-step ops share: the argument check and their
implementations (each step's spec, ddpm_step.py and ddim_step.py, gives its
reference, its output-dtype rule and how its native kernel is called).

Implementations: eager (the reference), triton (adm_fast/kernels/diffusion_step.py),
cpu and cuda (csrc/*/diffusion_step.*). The kernels compute in fp32 from fp32
coefficients and write fp32, cast where the step's dtype rule says otherwise
(exact: only where x_0 is the model output itself), in x's layout (triton and
cuda read each input in its own, NCHW or channels_last). Steps have no kernel
backward: differentiating through a step (rare in sampling, but it must work)
runs the reference under autograd.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from .step_math import MEAN_TYPES, VAR_TYPES
from .backends import TRITON
from .impl import Call, Impl
from .op import Op

_STEP_TENSORS = ("x", "model_out", "noise", "grad")


def promote(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def check_args(op: str, x, model_out, noise, coefs, rows: int, grad, mean_type,
               var_type=None) -> None:
    """The checks both step ops share; var_type None: DDIM (any C or 2C output)."""
    if mean_type not in MEAN_TYPES:
        raise ValueError(f"{op}: mean_type must be one of {tuple(MEAN_TYPES)}, got {mean_type!r}")
    if var_type is not None and var_type not in VAR_TYPES:
        raise ValueError(f"{op}: var_type must be one of {tuple(VAR_TYPES)}, got {var_type!r}")
    for name, t in (("x", x), ("model_out", model_out), ("noise", noise), ("coefs", coefs),
                    ("grad", grad)):
        if t is None and name == "grad":
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [B, C, *spatial], got shape {list(x.shape)}")
    b, c = x.shape[:2]
    learned = var_type in ("learned", "learned_range")
    want = (b, 2 * c if learned else c) + tuple(x.shape[2:])
    if var_type is not None and tuple(model_out.shape) != want:
        raise ValueError(f"{op}: model_out must be {list(want)} for var_type={var_type!r} "
                         f"and x {list(x.shape)}, got {list(model_out.shape)}")
    if var_type is None and (model_out.dim() != x.dim() or model_out.shape[0] != b
                             or model_out.shape[2:] != x.shape[2:]
                             or model_out.shape[1] not in (c, 2 * c)):
        raise ValueError(f"{op}: model_out {list(model_out.shape)} does not match x "
                         f"{list(x.shape)}")
    for name, t in (("noise", noise), ("grad", grad)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{op}: {name} must have x's shape {list(x.shape)}, "
                             f"got {list(t.shape)}")
    if tuple(coefs.shape) != (rows, b):
        raise ValueError(f"{op}: coefs must be [{rows}, {b}], got {list(coefs.shape)}")


def channels_last_like(t: Tensor) -> bool:
    """t's channels are contiguous and it is not NCHW-contiguous (a channels_last
    map, or a 3-D or 5-D tensor laid out the same way)."""
    return not t.is_contiguous() and t.dim() >= 3 and t.movedim(1, -1).is_contiguous()


def like_x(x: Tensor, dtype: torch.dtype) -> Tensor:
    """An output of every kernel backend: x's shape, in x's layout when that is
    channels-last, else contiguous."""
    if channels_last_like(x):
        return torch.empty_like(x, dtype=dtype)
    return x.new_empty(x.shape, dtype=dtype)


class StepOp(Op):
    returns = 2
    kernel_returns = 2
    rows = 0

    def out_dtypes(self, *args) -> Tuple[torch.dtype, torch.dtype]:
        """(sample dtype, pred_xstart dtype), as the reference's arithmetic
        promotes them; every backend returns these."""
        raise NotImplementedError

    def fake(self, x, *rest):
        sample, x0 = self.out_dtypes(x, *rest)
        return like_x(x, sample), like_x(x, x0)

    def native_fake(self, x, *rest):  # the same tensors, types as codes
        sample, x0 = self.fake(x, *rest)
        if x.device.type == "cpu":  # the CPU binding computes on contiguous copies
            sample, x0 = sample.contiguous(), x0.contiguous()
        return sample, x0

    def native_args(self, *args) -> tuple:
        """The native kernel's arguments (mean and variance types as codes)."""
        raise NotImplementedError

    def register_impls(self, native_op) -> None:
        for impl in (StepEager(self), StepTriton(self), StepCpu(self, native_op),
                     StepCuda(self, native_op)):
            self.register(impl)


class StepEager(Impl):
    backend, kind = "eager", "composite"
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def __init__(self, op: StepOp):
        self.spec = op

    def run(self, *args):
        return self.spec.reference(*args)


class _StepKernels(Impl):
    def __init__(self, op: StepOp):
        self.spec = op

    def cast(self, outs, args):
        """The kernels write fp32; the dtype rule may want x_0 in the model's
        dtype (x_0 = the output itself), which fp32 holds exactly."""
        return tuple(o if o.dtype == d else o.to(d)
                     for o, d in zip(outs, self.spec.out_dtypes(*args)))

    def extra_reasons(self, call: Call) -> List[str]:
        coefs = call.tensors["coefs"]
        return [] if coefs.dtype == torch.float32 else [
            f"coefs are {coefs.dtype}, not fp32 (the kernels compute from fp32 coefficients)"]


# Each tensor is read with its own strides: on a GPU the model output and the
# guidance gradient come out channels_last while x and the noise are NCHW.
_KERNEL_LAYOUTS = {name: ("contiguous", "channels_last") for name in _STEP_TENSORS}


class StepTriton(_StepKernels):
    backend = "triton"
    layouts = _KERNEL_LAYOUTS

    def forward(self, *args):
        return self.cast(getattr(TRITON.kernels("diffusion_step"), self.spec.name)(*args), args)


class _StepNative(_StepKernels):
    def __init__(self, op: StepOp, native_op):
        super().__init__(op)
        self.native_op = native_op

    def native_ops(self):
        return (self.native_op,)

    def forward(self, *args):
        return self.cast(self.native_op(*self.spec.native_args(*args)), args)


class StepCpu(_StepNative):
    backend = "cpu"  # any layout and float dtypes: the binding reads them as fp32 copies

    def forward(self, *args):
        outs = super().forward(*args)
        x = args[0]
        if not channels_last_like(x):
            return outs
        # The binding writes NCHW; the outputs are in x's layout on every backend.
        return tuple(o.movedim(1, -1).contiguous().movedim(-1, 1) for o in outs)


class StepCuda(_StepNative):
    backend = "cuda"
    layouts = _KERNEL_LAYOUTS

    def extra_reasons(self, call: Call) -> List[str]:
        why = super().extra_reasons(call)
        x = call.tensors["x"]
        for name in ("noise", "grad"):
            t = call.tensors.get(name)
            if t is not None and t.dtype != x.dtype:
                why.append(f"{name} dtype {t.dtype} differs from x's {x.dtype}")
        return why
