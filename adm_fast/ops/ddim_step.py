"""ddim_step: one DDIM step, x_t -> x_{t-1} (Algorithm 2).

x_0 from the model output (clipped), the classifier-guidance shift on eps
(eps − √(1−ᾱ_t)·g, x_0 re-derived from it), eps re-derived from x_0, then
DDIM's update with stochasticity eta. Per-sample coefficients come in one
fp32 tensor `coefs` [7, B] whose rows are (see GaussianDiffusion.step_coefs):
  0, 1  a, b            x_0 from the output (meaning depends on mean_type)
  2, 3  recip, recipm1  √(1/ᾱ_t), √(1/ᾱ_t − 1)
  4, 5  ᾱ_t, ᾱ_{t−1}
  6     nonzero         0 at t = 0, else 1
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from . import step_math as sm
from .ddpm_step import check_step_args, recompute_autograd, step_fake
from .group_norm_act import needs_custom_op

OP = "ddim_step"
ROWS = 7


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


def ddim_step(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Optional[Tensor] = None, mean_type: str = "eps", clip: bool = True,
              eta: float = 0.0) -> Tuple[Tensor, Tensor]:
    """One DDIM step. x, noise, grad: [B, C, H, W]; model_out: [B, C or 2C, H, W]
    (a learned variance half is ignored); coefs: [7, B] fp32 (module docstring).
    grad is the already-scaled guidance gradient, or None. Returns
    (x_{t-1}, pred_xstart) where pred_xstart is the guided x_0."""
    check_step_args(OP, x, model_out, noise, coefs, ROWS, grad, mean_type)
    return dispatch.call(OP, x, model_out, noise, coefs, grad, mean_type, clip, float(eta))


# --- the fused path: one custom op for every fused backend ---------------------------

IMPLS: Dict[str, Callable] = {}


@torch.library.triton_op("adm_fast::ddim_step", mutates_args=())
def _fused(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor, grad: Optional[Tensor],
           mean_type: str, clip: bool, eta: float, backend: str) -> Tuple[Tensor, Tensor]:
    return IMPLS[backend]().ddim_step(x, model_out, noise, coefs, grad, mean_type, clip, eta)


_fused.register_fake(step_fake)
recompute_autograd(_fused, reference, 5)


def fused(backend: str) -> Callable:
    def run(x, model_out, noise, coefs, grad, mean_type, clip, eta):
        if needs_custom_op(x, model_out, noise, coefs, grad):
            return torch.ops.adm_fast.ddim_step(x, model_out, noise, coefs, grad, mean_type,
                                                bool(clip), float(eta), backend)
        return IMPLS[backend]().ddim_step(x, model_out, noise, coefs, grad, mean_type,
                                          bool(clip), float(eta))
    return run
