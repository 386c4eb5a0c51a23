"""ddim_step: one DDIM step, x_t -> x_{t-1} (Algorithm 2).

x_0 from the model output (clipped), the classifier-guidance shift on eps
(eps − √(1−ᾱ_t)·g, x_0 re-derived from it), eps re-derived from x_0, then
DDIM's update with stochasticity eta. Per-sample coefficients come in one
fp32 tensor `coefs` [7, B] whose rows are (see GaussianDiffusion.step_coefs):
  0, 1  a, b            x_0 from the output (meaning depends on mean_type)
  2, 3  recip, recipm1  √(1/ᾱ_t), √(1/ᾱ_t − 1)
  4, 5  ᾱ_t, ᾱ_{t−1}
  6     nonzero         0 at t = 0, else 1

Implementations: those of every step (ops/step_op.py).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

from torch import Tensor

from . import native
from . import step_math as sm
from .step_op import StepOp, check_args, promote

ROWS = 7
SIGNATURE = ("Tensor x, Tensor model_out, Tensor noise, Tensor coefs, Tensor? grad, "
             "str mean_type, bool clip, float eta")
NATIVE_SIGNATURE = ("Tensor x, Tensor model_out, Tensor noise, Tensor coefs, Tensor? grad, "
                    "int mean_type, bool clip, float eta")


def reference(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Optional[Tensor], mean_type: str, clip: bool,
              eta: float) -> Tuple[Tensor, Tensor]:
    """guided-diffusion's ddim_sample arithmetic (with condition_score)."""
    a, b, recip, recipm1, alpha_bar, alpha_bar_prev, nonzero = (
        sm.per_sample(r, x) for r in coefs.unbind(0))
    out = model_out[:, : x.shape[1]]
    x0 = sm.pred_xstart(x, out, a, b, mean_type)
    if clip:
        x0 = x0.clamp(-1, 1)
    if grad is not None:
        x0 = sm.guide_eps(x, x0, grad, recip, recipm1, alpha_bar)
    eps = sm.eps_from_xstart(x, x0, recip, recipm1)
    mean, sigma = sm.ddim_update(x0, eps, alpha_bar, alpha_bar_prev, eta)
    return mean + nonzero * sigma * noise, x0


class DdimStep(StepOp):
    name = "ddim_step"
    signature = SIGNATURE
    rows = ROWS

    def out_dtypes(self, x, model_out, noise, coefs, grad, mean_type, clip, eta):
        """reference()'s promotions, expression by expression (guidance on the
        score re-derives x_0 from x and the gradient)."""
        c, xd, o = coefs.dtype, x.dtype, model_out.dtype
        x0 = o if mean_type == "x_start" else promote(c, xd, o)
        if grad is not None:
            x0 = promote(c, xd, x0, grad.dtype)
        eps = promote(c, xd, x0)
        return promote(x0, c, eps, noise.dtype), x0

    def check(self, x, model_out, noise, coefs, grad, mean_type, clip, eta) -> None:
        check_args(self.name, x, model_out, noise, coefs, ROWS, grad, mean_type)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
            raise ValueError(f"{self.name}: eta must be a finite number, got {eta!r}")

    def reference(self, *args):
        return reference(*args)

    def native_args(self, x, model_out, noise, coefs, grad, mean_type, clip, eta):
        return x, model_out, noise, coefs, grad, sm.MEAN_TYPES[mean_type], clip, eta


DDIM_STEP = DdimStep()
DDIM_STEP.register_impls(native.define("ddim_step", NATIVE_SIGNATURE, 2,
                                       DDIM_STEP.native_fake))


def ddim_step(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Optional[Tensor] = None, mean_type: str = "eps", clip: bool = True,
              eta: float = 0.0) -> Tuple[Tensor, Tensor]:
    """One DDIM step. x, noise, grad: [B, C, H, W]; model_out: [B, C or 2C, H, W]
    (a learned variance half is ignored); coefs: [7, B] fp32 (module docstring).
    grad is the already-scaled guidance gradient, or None. Returns
    (x_{t-1}, pred_xstart) where pred_xstart is the guided x_0."""
    return DDIM_STEP(x, model_out, noise, coefs, grad, mean_type, bool(clip), float(eta))
