"""Triton kernels for one guided sampling step, x_t -> x_{t-1}, in one pass.

Each kernel reads x_t, the model output (its mean part and, for a learned
variance, the interpolation v), the guidance gradient and the noise, and
writes x_{t-1} and (optionally) pred_xstart: the ~20 elementwise launches of
the eager step become one. Programs are laid out (chunk, sample) so that the
per-sample coefficients (one column of coefs [K, B], fp32) are scalars.

The arithmetic follows adm_fast.ops.step_math (guided-diffusion's order of
operations) in fp32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import step_codes as codes

MEAN_EPS = tl.constexpr(codes.MEAN_EPS)
MEAN_X_START = tl.constexpr(codes.MEAN_X_START)
MEAN_X_PREV = tl.constexpr(codes.MEAN_X_PREV)
VAR_LEARNED = tl.constexpr(codes.VAR_LEARNED)
VAR_LEARNED_RANGE = tl.constexpr(codes.VAR_LEARNED_RANGE)
BLOCK = 1024


@triton.jit
def _pred_xstart(x, out, a, b, MEAN: tl.constexpr, CLIP: tl.constexpr):
    if MEAN == MEAN_EPS:
        x0 = a * x - b * out
    elif MEAN == MEAN_X_START:
        x0 = out
    else:  # x_prev
        x0 = a * out - b * x
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    return x0


@triton.jit
def ddpm_step_kernel(
    x_ptr,  # *T  x_t [B, CHW]
    out_ptr,  # *To model output [B, C or 2C, HW], sample stride OUT_SN
    noise_ptr, grad_ptr,  # *T [B, CHW] (grad unused without HAS_GRAD)
    coef_ptr,  # *fp32 [8, B]: a, b, c1, c2, lo, hi, var, nonzero
    sample_ptr, x0_ptr,  # *To outputs [B, CHW]
    B, CHW, OUT_SN,
    MEAN: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr, HAS_GRAD: tl.constexpr,
    WRITE_X0: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < CHW
    a = tl.load(coef_ptr + n)
    b = tl.load(coef_ptr + B + n)
    c1 = tl.load(coef_ptr + 2 * B + n)
    c2 = tl.load(coef_ptr + 3 * B + n)
    lo = tl.load(coef_ptr + 4 * B + n)
    hi = tl.load(coef_ptr + 5 * B + n)
    fixed_var = tl.load(coef_ptr + 6 * B + n)
    nonzero = tl.load(coef_ptr + 7 * B + n)
    row = n * CHW + offs
    x = tl.load(x_ptr + row, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + n * OUT_SN + offs, mask=mask, other=0.0).to(tl.float32)
    if VAR == VAR_LEARNED:  # the log variance itself
        log_var = tl.load(out_ptr + n * OUT_SN + CHW + offs, mask=mask, other=0.0).to(tl.float32)
        var = tl.exp(log_var)
    elif VAR == VAR_LEARNED_RANGE:
        v = tl.load(out_ptr + n * OUT_SN + CHW + offs, mask=mask, other=0.0).to(tl.float32)
        frac = (v + 1.0) / 2.0
        log_var = frac * hi + (1.0 - frac) * lo
        var = tl.exp(log_var)
    else:  # fixed
        log_var = tl.zeros([BLOCK], tl.float32) + lo
        var = tl.zeros([BLOCK], tl.float32) + fixed_var
    x0 = _pred_xstart(x, out, a, b, MEAN, CLIP)
    if MEAN == MEAN_X_PREV:
        mean = out
    else:
        mean = c1 * x0 + c2 * x
    if HAS_GRAD:
        mean += var * tl.load(grad_ptr + row, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + row, mask=mask, other=0.0).to(tl.float32)
    sample = mean + nonzero * tl.exp(0.5 * log_var) * noise
    tl.store(sample_ptr + row, sample.to(sample_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + row, x0.to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ddim_step_kernel(
    x_ptr, out_ptr, noise_ptr, grad_ptr,
    coef_ptr,  # *fp32 [7, B]: a, b, recip, recipm1, ᾱ_t, ᾱ_{t-1}, nonzero
    sample_ptr, x0_ptr,
    B, CHW, OUT_SN, eta,
    MEAN: tl.constexpr, CLIP: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_NOISE: tl.constexpr,
    WRITE_X0: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < CHW
    a = tl.load(coef_ptr + n)
    b = tl.load(coef_ptr + B + n)
    recip = tl.load(coef_ptr + 2 * B + n)
    recipm1 = tl.load(coef_ptr + 3 * B + n)
    ab = tl.load(coef_ptr + 4 * B + n)
    ab_prev = tl.load(coef_ptr + 5 * B + n)
    nonzero = tl.load(coef_ptr + 6 * B + n)
    row = n * CHW + offs
    x = tl.load(x_ptr + row, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + n * OUT_SN + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = _pred_xstart(x, out, a, b, MEAN, CLIP)
    if HAS_GRAD:  # guidance on the score: eps − √(1−ᾱ)·g, x_0 re-derived
        g = tl.load(grad_ptr + row, mask=mask, other=0.0).to(tl.float32)
        eps = (recip * x - x0) / recipm1
        eps = eps - tl.sqrt(1.0 - ab) * g
        x0 = recip * x - recipm1 * eps
    eps = (recip * x - x0) / recipm1
    sigma = eta * tl.sqrt((1.0 - ab_prev) / (1.0 - ab)) * tl.sqrt(1.0 - ab / ab_prev)
    sample = x0 * tl.sqrt(ab_prev) + tl.sqrt(1.0 - ab_prev - sigma * sigma) * eps
    if HAS_NOISE:
        noise = tl.load(noise_ptr + row, mask=mask, other=0.0).to(tl.float32)
        sample += nonzero * sigma * noise
    tl.store(sample_ptr + row, sample.to(sample_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + row, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, x, model_out, noise, coefs, grad, extra, flags):
    b = x.shape[0]
    chw = x.numel() // b
    # fp32 out: what adm_fast.ops.step_math.out_dtypes gives for fp32
    # coefficients, the only ones these kernels are given.
    sample = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    x0 = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(chw, BLOCK), b)
    wrap_triton(kernel)[grid](
        x, model_out, noise, grad if grad is not None else x, coefs.contiguous(), sample, x0,
        b, chw, model_out.stride(0), *extra, **flags, HAS_GRAD=grad is not None,
        WRITE_X0=True, BLOCK=BLOCK, num_warps=4)
    return sample, x0


def ddpm_step(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Optional[Tensor], mean_type: str, var_type: str,
              clip: bool) -> Tuple[Tensor, Tensor]:
    return _launch(ddpm_step_kernel, x, model_out, noise, coefs, grad, (),
                   dict(MEAN=codes.MEAN_TYPES[mean_type], VAR=codes.VAR_TYPES[var_type], CLIP=clip))


def ddim_step(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Optional[Tensor], mean_type: str, clip: bool,
              eta: float) -> Tuple[Tensor, Tensor]:
    return _launch(ddim_step_kernel, x, model_out, noise, coefs, grad, (float(eta),),
                   dict(MEAN=codes.MEAN_TYPES[mean_type], CLIP=clip, HAS_NOISE=eta != 0.0))
