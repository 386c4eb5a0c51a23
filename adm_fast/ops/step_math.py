"""The arithmetic of one diffusion step, shared by the samplers' composite
path (p_mean_variance, condition_mean, condition_score) and the eager
references of the fused step ops, so the two cannot drift.

Every function mirrors guided-diffusion's expression order, so fp32 results
match it to the last bit or so. Per-sample coefficients arrive as [B] fp32
vectors (gathered from the diffusion's float64 tables, then cast, exactly as
guided-diffusion's `_extract_into_tensor` does) and broadcast over C, H, W.
"""

from __future__ import annotations

from torch import Tensor

from ..kernels.step_codes import MEAN_TYPES, VAR_TYPES  # noqa: F401  (name -> kernel code)


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """A [B] vector as [B, 1, ..., 1] against a [B, C, ...] tensor."""
    return v.reshape(v.shape + (1,) * (like.dim() - 1))


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
