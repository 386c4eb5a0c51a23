"""ddpm_step: one ancestral sampling step, x_t -> x_{t-1} (Algorithm 1).

From the raw model output: x_0 prediction (clipped), posterior mean, the
(learned-range) variance, the classifier-guidance mean shift μ + Σ·g, and the
noise. Per-sample coefficients come in one fp32 tensor `coefs` [8, B] whose
rows are (see GaussianDiffusion.step_coefs):
  0, 1  a, b     x_0 from the output (meaning depends on mean_type)
  2, 3  c1, c2   posterior mean c1·x_0 + c2·x_t
  4, 5  lo, hi   log variance bounds (fixed: lo is the fixed log variance)
  6     var      the fixed variance (fixed only)
  7     nonzero  0 at t = 0 (no noise on the last step), else 1

Implementations: eager (the reference: step_math, guided-diffusion's order of
operations), triton (adm_fast/kernels/diffusion_step.py), cpu (csrc/cpu/diffusion_step.cpp),
cuda (csrc/cuda/diffusion_step.cu). Gradients, when asked for, come from the
reference under autograd.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import native
from . import step_math as sm
from .step_op import StepOp, check_args, promote

ROWS = 8
SIGNATURE = ("Tensor x, Tensor model_out, Tensor noise, Tensor coefs, Tensor? grad, "
             "str mean_type, str var_type, bool clip")
# The native kernels take the types as codes (adm_fast/kernels/step_codes.py).
NATIVE_SIGNATURE = ("Tensor x, Tensor model_out, Tensor noise, Tensor coefs, Tensor? grad, "
                    "int mean_type, int var_type, bool clip")


def reference(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Optional[Tensor], mean_type: str, var_type: str,
              clip: bool) -> Tuple[Tensor, Tensor]:
    """guided-diffusion's p_sample arithmetic (p_mean_variance, condition_mean)."""
    a, b, c1, c2, lo, hi, var, nonzero = (sm.per_sample(r, x) for r in coefs.unbind(0))
    out, v = sm.split_output(model_out, x.shape[1], var_type != "fixed")
    log_var = sm.log_variance(v, lo, hi, var_type)
    if var_type != "fixed":
        var = torch.exp(log_var)
    x0 = sm.pred_xstart(x, out, a, b, mean_type)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = out if mean_type == "x_prev" else c1 * x0 + c2 * x
    if grad is not None:
        mean = sm.guide_mean(mean, var, grad)
    return mean + nonzero * torch.exp(0.5 * log_var) * noise, x0


class DdpmStep(StepOp):
    name = "ddpm_step"
    signature = SIGNATURE
    rows = ROWS

    def out_dtypes(self, x, model_out, noise, coefs, grad, mean_type, var_type, clip):
        """reference()'s promotions, expression by expression."""
        c, xd, o = coefs.dtype, x.dtype, model_out.dtype
        x0 = o if mean_type == "x_start" else promote(c, xd, o)
        log_var = {"learned": o, "learned_range": promote(o, c)}.get(var_type, c)
        mean = o if mean_type == "x_prev" else promote(c, x0, xd)
        if grad is not None:  # guide_mean: mean.float() + var * grad.float()
            mean = promote(torch.float32, log_var)
        return promote(mean, c, log_var, noise.dtype), x0

    def check(self, x, model_out, noise, coefs, grad, mean_type, var_type, clip) -> None:
        check_args(self.name, x, model_out, noise, coefs, ROWS, grad, mean_type, var_type)

    def reference(self, *args):
        return reference(*args)

    def native_args(self, x, model_out, noise, coefs, grad, mean_type, var_type, clip):
        return (x, model_out, noise, coefs, grad, sm.MEAN_TYPES[mean_type],
                sm.VAR_TYPES[var_type], clip)


DDPM_STEP = DdpmStep()
DDPM_STEP.register_impls(native.define("ddpm_step", NATIVE_SIGNATURE, 2,
                                       DDPM_STEP.native_fake))


def ddpm_step(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Optional[Tensor] = None, mean_type: str = "eps",
              var_type: str = "learned_range", clip: bool = True) -> Tuple[Tensor, Tensor]:
    """One DDPM step. x, noise, grad: [B, C, H, W]; model_out: [B, C or 2C, H, W]
    (2C when the variance is learned); coefs: [8, B] fp32 (module docstring).
    grad is the already-scaled guidance gradient s·∇x log p(y|x_t), or None.
    Returns (x_{t-1}, pred_xstart), typed as DdpmStep.out_dtypes says."""
    return DDPM_STEP(x, model_out, noise, coefs, grad, mean_type, var_type, bool(clip))
