"""ddpm_step and ddim_step: one sampling step, x_t -> x_{t-1}, as one op each.

ddpm_step (Algorithm 1, ancestral): from the raw model output, the x_0
prediction (clipped), the posterior mean, the (learned-range) variance, the
classifier-guidance mean shift μ + Σ·g, and the noise.
ddim_step (Algorithm 2): x_0 from the model output (clipped), the
classifier-guidance shift on eps (eps − √(1−ᾱ_t)·g, x_0 re-derived from it),
eps re-derived from x_0, then DDIM's update with stochasticity eta.

Per-sample coefficients come in one fp32 tensor `coefs` [rows, B] (see
GaussianDiffusion.step_coefs), its rows named in adm_fast/kernels/step_codes.py
(DDPM_ROWS, DDIM_ROWS) for every implementation:
  ddpm  a, b (x_0 from the output; their meaning depends on mean_type),
        c1, c2 (posterior mean c1·x_0 + c2·x_t), lo, hi (log variance bounds;
        fixed: lo is the fixed log variance), var (the fixed variance, fixed
        only), nonzero (0 at t = 0: no noise on the last step, else 1)
  ddim  a, b, recip, recipm1 (√(1/ᾱ_t), √(1/ᾱ_t − 1)), alpha_bar,
        alpha_bar_prev (ᾱ_t, ᾱ_{t−1}), nonzero

The arithmetic below is shared by the samplers' composite path
(p_mean_variance, condition_mean, condition_score) and the references, so the
two cannot drift. Every function mirrors guided-diffusion's expression order,
so fp32 results match it to the last bit or so; per-sample coefficients
arrive as [B] fp32 vectors (gathered from the diffusion's float64 tables, then
cast, as guided-diffusion's `_extract_into_tensor` does) and broadcast over
C, H, W.

Implementations: eager (the reference), triton (adm_fast/kernels/diffusion_step.py),
cpu and cuda (csrc/*/diffusion_step.*). The kernels compute in fp32 from fp32
coefficients and write fp32, cast where the step's dtype rule says otherwise
(exact: only where x_0 is the model output itself), in x's layout (triton and
cuda read each input in its own, NCHW or channels_last). Steps have no kernel
backward: differentiating through a step (rare in sampling, but it must work)
runs the reference under autograd.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..kernels.step_codes import DDIM_ROWS, DDPM_ROWS, MEAN_TYPES, VAR_TYPES
from . import native
from .backends import TritonImpl
from .impl import Call, Impl
from .op import Op

# --- the arithmetic of one step ------------------------------------------------


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """A [B] vector as [B, 1, ..., 1] against a [B, C, ...] tensor."""
    return v.reshape(v.shape + (1,) * (like.dim() - 1))


def rows(coefs: Tensor, names: Mapping[str, int], like: Tensor) -> dict[str, Tensor]:
    """coefs' rows by name (DDPM_ROWS or DDIM_ROWS), each as per_sample's."""
    return {name: per_sample(coefs[i], like) for name, i in names.items()}


def split_output(model_out: Tensor, channels: int, learned_var: bool):
    """(mean part, variance part or None) of a model output."""
    if learned_var:
        return model_out[:, :channels], model_out[:, channels:]
    return model_out, None


def log_variance(v, lo: Tensor, hi: Tensor, var_type: str) -> Tensor:
    """The model's log variance: v itself (learned), the interpolation
    frac·log β_t + (1 − frac)·log β̃_t with frac = (v + 1)/2 (learned_range),
    or the fixed table value `lo` (fixed)."""
    if var_type == "learned":
        return v
    if var_type == "learned_range":
        frac = (v + 1) / 2
        return frac * hi + (1 - frac) * lo
    return lo


def pred_xstart(x: Tensor, out: Tensor, a: Tensor, b: Tensor, mean_type: str) -> Tensor:
    """x_0 from the model's mean output: eps: a·x − b·eps (a = √(1/ᾱ),
    b = √(1/ᾱ − 1)); x_prev: a·x_prev − b·x (a = 1/c1, b = c2/c1); x_start: out."""
    if mean_type == "eps":
        return a * x - b * out
    if mean_type == "x_prev":
        return a * out - b * x
    return out


def eps_from_xstart(x: Tensor, x0: Tensor, recip: Tensor, recipm1: Tensor) -> Tensor:
    return (recip * x - x0) / recipm1


def guide_eps(x, x0, grad, recip, recipm1, alpha_bar):
    """Classifier guidance on the score (Song et al.): eps −= √(1−ᾱ)·∇log p(y|x);
    returns the x_0 that the guided eps implies."""
    eps = eps_from_xstart(x, x0, recip, recipm1)
    eps = eps - (1 - alpha_bar).sqrt() * grad
    return recip * x - recipm1 * eps


def guide_mean(mean: Tensor, variance: Tensor, grad: Tensor) -> Tensor:
    """Classifier guidance on the mean (Sohl-Dickstein et al.): μ + Σ·∇log p(y|x)."""
    return mean.float() + variance * grad.float()


def ddim_update(x0, eps, alpha_bar, alpha_bar_prev, eta: float):
    """DDIM's equation 12: (mean, sigma) of x_{t−1}."""
    sigma = (eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt()
             * (1 - alpha_bar / alpha_bar_prev).sqrt())
    mean = x0 * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev - sigma ** 2).sqrt() * eps
    return mean, sigma


# --- the references ------------------------------------------------------------


def ddpm_reference(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
                   grad: Tensor | None, mean_type: str, var_type: str,
                   clip: bool) -> tuple[Tensor, Tensor]:
    """guided-diffusion's p_sample arithmetic (p_mean_variance, condition_mean)."""
    k = rows(coefs, DDPM_ROWS, x)
    out, v = split_output(model_out, x.shape[1], var_type != "fixed")
    log_var = log_variance(v, k["lo"], k["hi"], var_type)
    var = k["var"] if var_type == "fixed" else torch.exp(log_var)
    x0 = pred_xstart(x, out, k["a"], k["b"], mean_type)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = out if mean_type == "x_prev" else k["c1"] * x0 + k["c2"] * x
    if grad is not None:
        mean = guide_mean(mean, var, grad)
    return mean + k["nonzero"] * torch.exp(0.5 * log_var) * noise, x0


def ddim_reference(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
                   grad: Tensor | None, mean_type: str, clip: bool,
                   eta: float) -> tuple[Tensor, Tensor]:
    """guided-diffusion's ddim_sample arithmetic (with condition_score)."""
    k = rows(coefs, DDIM_ROWS, x)
    out = model_out[:, : x.shape[1]]
    x0 = pred_xstart(x, out, k["a"], k["b"], mean_type)
    if clip:
        x0 = x0.clamp(-1, 1)
    if grad is not None:
        x0 = guide_eps(x, x0, grad, k["recip"], k["recipm1"], k["alpha_bar"])
    eps = eps_from_xstart(x, x0, k["recip"], k["recipm1"])
    mean, sigma = ddim_update(x0, eps, k["alpha_bar"], k["alpha_bar_prev"], eta)
    return mean + k["nonzero"] * sigma * noise, x0


# --- what both specs share -----------------------------------------------------

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
    rows: Mapping[str, int] = {}  # the coefficient rows, by name (step_codes)
    # The native kernel's schema: the public one with the types as codes.
    native_signature = ""

    def __init__(self) -> None:
        super().__init__()
        native_op = native.define(self.name, self.native_signature, 2, self.native_fake)
        for impl in (StepTriton(self), StepCpu(self, native_op), StepCuda(self, native_op)):
            self.register(impl)

    def out_dtypes(self, *args) -> tuple[torch.dtype, torch.dtype]:
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


class DdpmStep(StepOp):
    name = "ddpm_step"
    signature = ("Tensor x, Tensor model_out, Tensor noise, Tensor coefs, Tensor? grad, "
                 "str mean_type, str var_type, bool clip")
    native_signature = ("Tensor x, Tensor model_out, Tensor noise, Tensor coefs, Tensor? grad, "
                        "int mean_type, int var_type, bool clip")
    rows = DDPM_ROWS

    def out_dtypes(self, x, model_out, noise, coefs, grad, mean_type, var_type, clip):
        """ddpm_reference()'s promotions, expression by expression."""
        c, xd, o = coefs.dtype, x.dtype, model_out.dtype
        x0 = o if mean_type == "x_start" else promote(c, xd, o)
        log_var = {"learned": o, "learned_range": promote(o, c)}.get(var_type, c)
        mean = o if mean_type == "x_prev" else promote(c, x0, xd)
        if grad is not None:  # guide_mean: mean.float() + var * grad.float()
            mean = promote(torch.float32, log_var)
        return promote(mean, c, log_var, noise.dtype), x0

    def check(self, x, model_out, noise, coefs, grad, mean_type, var_type, clip) -> None:
        check_args(self.name, x, model_out, noise, coefs, len(self.rows), grad, mean_type,
                   var_type)

    reference = staticmethod(ddpm_reference)

    def native_args(self, x, model_out, noise, coefs, grad, mean_type, var_type, clip):
        return (x, model_out, noise, coefs, grad, MEAN_TYPES[mean_type], VAR_TYPES[var_type],
                clip)


class DdimStep(StepOp):
    name = "ddim_step"
    signature = ("Tensor x, Tensor model_out, Tensor noise, Tensor coefs, Tensor? grad, "
                 "str mean_type, bool clip, float eta")
    native_signature = ("Tensor x, Tensor model_out, Tensor noise, Tensor coefs, Tensor? grad, "
                        "int mean_type, bool clip, float eta")
    rows = DDIM_ROWS

    def out_dtypes(self, x, model_out, noise, coefs, grad, mean_type, clip, eta):
        """ddim_reference()'s promotions, expression by expression (guidance on
        the score re-derives x_0 from x and the gradient)."""
        c, xd, o = coefs.dtype, x.dtype, model_out.dtype
        x0 = o if mean_type == "x_start" else promote(c, xd, o)
        if grad is not None:
            x0 = promote(c, xd, x0, grad.dtype)
        eps = promote(c, xd, x0)
        return promote(x0, c, eps, noise.dtype), x0

    def check(self, x, model_out, noise, coefs, grad, mean_type, clip, eta) -> None:
        check_args(self.name, x, model_out, noise, coefs, len(self.rows), grad, mean_type)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
            raise ValueError(f"{self.name}: eta must be a finite number, got {eta!r}")

    reference = staticmethod(ddim_reference)

    def native_args(self, x, model_out, noise, coefs, grad, mean_type, clip, eta):
        return x, model_out, noise, coefs, grad, MEAN_TYPES[mean_type], clip, eta


# --- the kernel implementations ----------------------------------------------


class _StepKernels(Impl):
    def __init__(self, op: StepOp):
        self.spec = op

    def cast(self, outs, args):
        """The kernels write fp32; the dtype rule may want x_0 in the model's
        dtype (x_0 = the output itself), which fp32 holds exactly."""
        return tuple(o if o.dtype == d else o.to(d)
                     for o, d in zip(outs, self.spec.out_dtypes(*args)))

    def extra_reasons(self, call: Call) -> list[str]:
        coefs = call.tensors["coefs"]
        return [] if coefs.dtype == torch.float32 else [
            f"coefs are {coefs.dtype}, not fp32 (the kernels compute from fp32 coefficients)"]


# Each tensor is read with its own strides: on a GPU the model output and the
# guidance gradient come out channels_last while x and the noise are NCHW.
_KERNEL_LAYOUTS = {name: ("contiguous", "channels_last") for name in _STEP_TENSORS}


class StepTriton(_StepKernels, TritonImpl):
    module = "diffusion_step"
    layouts = _KERNEL_LAYOUTS

    def forward(self, *args):
        return self.cast(getattr(self.kernels, self.spec.name)(*args), args)


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

    def extra_reasons(self, call: Call) -> list[str]:
        why = super().extra_reasons(call)
        x = call.tensors["x"]
        for name in ("noise", "grad"):
            t = call.tensors.get(name)
            if t is not None and t.dtype != x.dtype:
                why.append(f"{name} dtype {t.dtype} differs from x's {x.dtype}")
        return why


DDPM_STEP = DdpmStep()
DDIM_STEP = DdimStep()


def ddpm_step(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Tensor | None = None, mean_type: str = "eps",
              var_type: str = "learned_range", clip: bool = True) -> tuple[Tensor, Tensor]:
    """One DDPM step. x, noise, grad: [B, C, H, W]; model_out: [B, C or 2C, H, W]
    (2C when the variance is learned); coefs: [8, B] fp32 (module docstring).
    grad is the already-scaled guidance gradient s·∇x log p(y|x_t), or None.
    Returns (x_{t-1}, pred_xstart), typed as DdpmStep.out_dtypes says."""
    return DDPM_STEP(x, model_out, noise, coefs, grad, mean_type, var_type, bool(clip))


def ddim_step(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Tensor | None = None, mean_type: str = "eps", clip: bool = True,
              eta: float = 0.0) -> tuple[Tensor, Tensor]:
    """One DDIM step. x, noise, grad: [B, C, H, W]; model_out: [B, C or 2C, H, W]
    (a learned variance half is ignored); coefs: [7, B] fp32 (module docstring).
    grad is the already-scaled guidance gradient, or None. Returns
    (x_{t-1}, pred_xstart) where pred_xstart is the guided x_0."""
    return DDIM_STEP(x, model_out, noise, coefs, grad, mean_type, bool(clip), float(eta))
