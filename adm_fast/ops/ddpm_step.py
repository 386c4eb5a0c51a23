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
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .group_norm_act import needs_custom_op
from . import step_math as sm

OP = "ddpm_step"
ROWS = 8


def check_step_args(op, x, model_out, noise, coefs, rows, grad, mean_type, var_type=None):
    if mean_type not in sm.MEAN_TYPES:
        raise ValueError(f"{op}: mean_type must be one of {sm.MEAN_TYPES}, got {mean_type!r}")
    if var_type is not None and var_type not in sm.VAR_TYPES:
        raise ValueError(f"{op}: var_type must be one of {sm.VAR_TYPES}, got {var_type!r}")
    for name, t in (("x", x), ("model_out", model_out), ("noise", noise), ("coefs", coefs),
                    ("grad", grad)):
        if t is None and name == "grad":
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    b, c = x.shape[:2]
    learned = var_type in ("learned", "learned_range")
    want = (b, 2 * c if learned else c) + tuple(x.shape[2:])
    if var_type is not None and tuple(model_out.shape) != want:
        raise ValueError(f"{op}: model_out must be {list(want)} for var_type={var_type!r} "
                         f"and x {list(x.shape)}, got {list(model_out.shape)}")
    if var_type is None and (model_out.shape[0] != b or model_out.shape[2:] != x.shape[2:]
                             or model_out.shape[1] not in (c, 2 * c)):
        raise ValueError(f"{op}: model_out {list(model_out.shape)} does not match x "
                         f"{list(x.shape)}")
    for name, t in (("noise", noise), ("grad", grad)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{op}: {name} must have x's shape {list(x.shape)}, "
                             f"got {list(t.shape)}")
    if tuple(coefs.shape) != (rows, b):
        raise ValueError(f"{op}: coefs must be [{rows}, {b}], got {list(coefs.shape)}")


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


def ddpm_step(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Optional[Tensor] = None, mean_type: str = "eps",
              var_type: str = "learned_range", clip: bool = True) -> Tuple[Tensor, Tensor]:
    """One DDPM step. x, noise, grad: [B, C, H, W]; model_out: [B, C or 2C, H, W]
    (2C when the variance is learned); coefs: [8, B] fp32 (module docstring).
    grad is the already-scaled guidance gradient s·∇x log p(y|x_t), or None.
    Returns (x_{t-1}, pred_xstart)."""
    check_step_args(OP, x, model_out, noise, coefs, ROWS, grad, mean_type, var_type)
    return dispatch.call(OP, x, model_out, noise, coefs, grad, mean_type, var_type, clip)


# --- the fused path: one custom op for every fused backend ---------------------------

IMPLS: Dict[str, Callable] = {}


@torch.library.triton_op("adm_fast::ddpm_step", mutates_args=())
def _fused(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor, grad: Optional[Tensor],
           mean_type: str, var_type: str, clip: bool, backend: str) -> Tuple[Tensor, Tensor]:
    return IMPLS[backend]().ddpm_step(x, model_out, noise, coefs, grad, mean_type, var_type,
                                      clip)


def step_fake(x, model_out, noise, coefs, grad, *args):
    """Outputs typed as the eager step's: guidance promotes the sample to fp32."""
    x0 = torch.promote_types(x.dtype, model_out.dtype)
    sample = torch.promote_types(x0, torch.float32) if grad is not None else x0
    return x.new_empty(x.shape, dtype=sample), x.new_empty(x.shape, dtype=x0)


_fused.register_fake(step_fake)


def recompute_autograd(op, reference_fn, n_tensors: int):
    """Gradients of a step op by re-running its eager reference under autograd:
    sampling rarely needs them, but differentiating through a step must work."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.rest = inputs[n_tensors:-1]  # the non-tensor arguments, minus backend

    def backward(ctx, *grad_outputs):
        leaves = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            outs = reference_fn(*leaves, *ctx.rest)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(outs, wanted, grad_outputs, allow_unused=True))
        grads = [next(got) if t is not None and t.requires_grad else None for t in leaves]
        return tuple(grads) + (None,) * (len(ctx.needs_input_grad) - n_tensors)

    op.register_autograd(backward, setup_context=setup)


recompute_autograd(_fused, reference, 5)


def fused(backend: str) -> Callable:
    def run(x, model_out, noise, coefs, grad, mean_type, var_type, clip):
        if needs_custom_op(x, model_out, noise, coefs, grad):
            return torch.ops.adm_fast.ddpm_step(x, model_out, noise, coefs, grad, mean_type,
                                                var_type, bool(clip), backend)
        return IMPLS[backend]().ddpm_step(x, model_out, noise, coefs, grad, mean_type,
                                          var_type, bool(clip))
    return run
