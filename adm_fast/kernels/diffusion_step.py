"""Triton kernels for one guided sampling step, x_t -> x_{t-1}, in one pass.

Each kernel reads x_t, the model output (its mean part and, for a learned
variance, the interpolation v), the guidance gradient and the noise, and
writes x_{t-1} and (optionally) pred_xstart: the ~20 elementwise launches of
the eager step become one. Programs are laid out (positions, channels, sample)
so that the per-sample coefficients (one column of coefs [K, B], fp32) are
scalars.

Layout. Every tensor is read as [B, C, HW] with its own strides, NCHW or
channels-last (on a GPU the model output and the classifier's gradient come
out channels_last while x and the noise, drawn NCHW, do not); the variance
half of a learned-variance output is channel C on. A program's tile is all of
an image's few channels by a run of positions, so each load runs along its
tensor's contiguous axis (Triton specialises the unit stride). The outputs
take x's layout.

The arithmetic follows adm_fast.ops.diffusion_step (guided-diffusion's order of
operations) in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import step_codes as codes
from .group_norm_act import layout_strides

MEAN_EPS = tl.constexpr(codes.MEAN_EPS)
MEAN_X_START = tl.constexpr(codes.MEAN_X_START)
MEAN_X_PREV = tl.constexpr(codes.MEAN_X_PREV)
VAR_LEARNED = tl.constexpr(codes.VAR_LEARNED)
VAR_LEARNED_RANGE = tl.constexpr(codes.VAR_LEARNED_RANGE)
# The coefficient rows (step_codes.DDPM_ROWS, DDIM_ROWS), as the kernels read them.
P_A, P_B, P_C1, P_C2, P_LO, P_HI, P_VAR, P_NONZERO = (
    tl.constexpr(codes.DDPM_ROWS[k]) for k in ("a", "b", "c1", "c2", "lo", "hi", "var", "nonzero"))
I_A, I_B, I_RECIP, I_RECIPM1, I_AB, I_AB_PREV, I_NONZERO = (
    tl.constexpr(codes.DDIM_ROWS[k]) for k in ("a", "b", "recip", "recipm1", "alpha_bar",
                                                "alpha_bar_prev", "nonzero"))
BLOCK = 1024


@triton.jit
def _program_tile(C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """This program's sample n, channels c, positions hw and their mask."""
    n = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return n, c, hw, (c < C)[:, None] & (hw < HW)[None, :]


@triton.jit
def _at(n, c, hw, s_b, s_c, s_hw):
    """Offsets of the tile (n, c, hw) in a [B, C, HW] tensor with these strides."""
    return n * s_b + c[:, None] * s_c + hw[None, :] * s_hw


@triton.jit
def _load_f32(ptr, n, c, hw, s_b, s_c, s_hw, mask):
    return tl.load(ptr + _at(n, c, hw, s_b, s_c, s_hw), mask=mask, other=0.0).to(tl.float32)


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
    x_ptr,  # *T  x_t [B, C, HW]
    out_ptr,  # *To model output [B, C or 2C, HW]: the mean part, then (learned) v at channel C
    noise_ptr, grad_ptr,  # *T [B, C, HW] (grad unused without HAS_GRAD)
    coef_ptr,  # *fp32 [rows, B]: step_codes.DDPM_ROWS
    sample_ptr, x0_ptr,  # *fp32 outputs [B, C, HW], x's strides
    B, C, HW,
    sx_b, sx_c, sx_hw, so_b, so_c, so_hw,  # strides of x (and the outputs), model_out
    sn_b, sn_c, sn_hw, sg_b, sg_c, sg_hw,  # strides of noise, grad
    MEAN: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr, HAS_GRAD: tl.constexpr,
    WRITE_X0: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n, c, hw, mask = _program_tile(C, HW, BLOCK_C, BLOCK_HW)
    a = tl.load(coef_ptr + P_A * B + n)
    b = tl.load(coef_ptr + P_B * B + n)
    c1 = tl.load(coef_ptr + P_C1 * B + n)
    c2 = tl.load(coef_ptr + P_C2 * B + n)
    lo = tl.load(coef_ptr + P_LO * B + n)
    hi = tl.load(coef_ptr + P_HI * B + n)
    fixed_var = tl.load(coef_ptr + P_VAR * B + n)
    nonzero = tl.load(coef_ptr + P_NONZERO * B + n)
    at_x = _at(n, c, hw, sx_b, sx_c, sx_hw)
    x = tl.load(x_ptr + at_x, mask=mask, other=0.0).to(tl.float32)
    out = _load_f32(out_ptr, n, c, hw, so_b, so_c, so_hw, mask)
    if VAR == VAR_LEARNED:  # the log variance itself
        log_var = _load_f32(out_ptr + C * so_c, n, c, hw, so_b, so_c, so_hw, mask)
        var = tl.exp(log_var)
    elif VAR == VAR_LEARNED_RANGE:
        v = _load_f32(out_ptr + C * so_c, n, c, hw, so_b, so_c, so_hw, mask)
        frac = (v + 1.0) / 2.0
        log_var = frac * hi + (1.0 - frac) * lo
        var = tl.exp(log_var)
    else:  # fixed
        log_var = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32) + lo
        var = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32) + fixed_var
    x0 = _pred_xstart(x, out, a, b, MEAN, CLIP)
    if MEAN == MEAN_X_PREV:
        mean = out
    else:
        mean = c1 * x0 + c2 * x
    if HAS_GRAD:
        mean += var * _load_f32(grad_ptr, n, c, hw, sg_b, sg_c, sg_hw, mask)
    noise = _load_f32(noise_ptr, n, c, hw, sn_b, sn_c, sn_hw, mask)
    sample = mean + nonzero * tl.exp(0.5 * log_var) * noise
    tl.store(sample_ptr + at_x, sample.to(sample_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + at_x, x0.to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ddim_step_kernel(
    x_ptr, out_ptr, noise_ptr, grad_ptr,
    coef_ptr,  # *fp32 [rows, B]: step_codes.DDIM_ROWS
    sample_ptr, x0_ptr,
    B, C, HW,
    sx_b, sx_c, sx_hw, so_b, so_c, so_hw, sn_b, sn_c, sn_hw, sg_b, sg_c, sg_hw,
    eta,
    MEAN: tl.constexpr, CLIP: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_NOISE: tl.constexpr,
    WRITE_X0: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n, c, hw, mask = _program_tile(C, HW, BLOCK_C, BLOCK_HW)
    a = tl.load(coef_ptr + I_A * B + n)
    b = tl.load(coef_ptr + I_B * B + n)
    recip = tl.load(coef_ptr + I_RECIP * B + n)
    recipm1 = tl.load(coef_ptr + I_RECIPM1 * B + n)
    ab = tl.load(coef_ptr + I_AB * B + n)
    ab_prev = tl.load(coef_ptr + I_AB_PREV * B + n)
    nonzero = tl.load(coef_ptr + I_NONZERO * B + n)
    at_x = _at(n, c, hw, sx_b, sx_c, sx_hw)
    x = tl.load(x_ptr + at_x, mask=mask, other=0.0).to(tl.float32)
    out = _load_f32(out_ptr, n, c, hw, so_b, so_c, so_hw, mask)
    x0 = _pred_xstart(x, out, a, b, MEAN, CLIP)
    if HAS_GRAD:  # guidance on the score: eps − √(1−ᾱ)·g, x_0 re-derived
        g = _load_f32(grad_ptr, n, c, hw, sg_b, sg_c, sg_hw, mask)
        eps = (recip * x - x0) / recipm1
        eps = eps - tl.sqrt(1.0 - ab) * g
        x0 = recip * x - recipm1 * eps
    eps = (recip * x - x0) / recipm1
    sigma = eta * tl.sqrt((1.0 - ab_prev) / (1.0 - ab)) * tl.sqrt(1.0 - ab / ab_prev)
    sample = x0 * tl.sqrt(ab_prev) + tl.sqrt(1.0 - ab_prev - sigma * sigma) * eps
    if HAS_NOISE:
        noise = _load_f32(noise_ptr, n, c, hw, sn_b, sn_c, sn_hw, mask)
        sample += nonzero * sigma * noise
    tl.store(sample_ptr + at_x, sample.to(sample_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + at_x, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _strides(t: Tensor, name: str) -> tuple[int, int, int]:
    s = layout_strides(t)
    if s is None:
        raise ValueError(f"{name} must be NCHW-contiguous or channels-last, got strides "
                         f"{tuple(t.stride())} for shape {tuple(t.shape)}")
    return s


def _tile(c: int, hw: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of at most BLOCK elements: all of an image's few
    channels and a run of positions, so that each tensor's loads run along its
    own contiguous axis whichever layout it has."""
    block_hw = min(triton.next_power_of_2(hw), BLOCK // min(triton.next_power_of_2(c), 16))
    return min(triton.next_power_of_2(c), BLOCK // block_hw), block_hw


def _launch(kernel, x, model_out, noise, coefs, grad, extra, flags):
    b, c = x.shape[:2]
    hw = x.numel() // max(1, b * c)
    sx = _strides(x, "x")
    # fp32 out: what the step ops' out_dtypes give for fp32
    # coefficients, the only ones these kernels are given. In x's layout, so
    # that x's strides index them (as adm_fast.ops.diffusion_step.like_x allocates).
    if sx[2] == 1:
        sample = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        x0 = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    else:  # channels-last x is dense: empty_like keeps its strides
        sample = torch.empty_like(x, dtype=torch.float32)
        x0 = torch.empty_like(x, dtype=torch.float32)
    block_c, block_hw = _tile(c, hw)
    grid = (triton.cdiv(hw, block_hw), triton.cdiv(c, block_c), b)
    sg = _strides(grad, "grad") if grad is not None else (0, 0, 0)
    wrap_triton(kernel)[grid](
        x, model_out, noise, grad if grad is not None else x, coefs.contiguous(), sample, x0,
        b, c, hw, *sx, *_strides(model_out, "model_out"), *_strides(noise, "noise"), *sg,
        *extra, **flags, HAS_GRAD=grad is not None, WRITE_X0=True, BLOCK_C=block_c,
        BLOCK_HW=block_hw, num_warps=4)
    return sample, x0


def ddpm_step(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Tensor | None, mean_type: str, var_type: str,
              clip: bool) -> tuple[Tensor, Tensor]:
    return _launch(ddpm_step_kernel, x, model_out, noise, coefs, grad, (),
                   dict(MEAN=codes.MEAN_TYPES[mean_type], VAR=codes.VAR_TYPES[var_type], CLIP=clip))


def ddim_step(x: Tensor, model_out: Tensor, noise: Tensor, coefs: Tensor,
              grad: Tensor | None, mean_type: str, clip: bool,
              eta: float) -> tuple[Tensor, Tensor]:
    return _launch(ddim_step_kernel, x, model_out, noise, coefs, grad, (float(eta),),
                   dict(MEAN=codes.MEAN_TYPES[mean_type], CLIP=clip, HAS_NOISE=eta != 0.0))
