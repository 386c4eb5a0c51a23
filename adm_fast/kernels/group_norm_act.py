"""Triton kernels for group_norm_act: y = SiLU((GN(x)·w + b)·(1 + s) + sh).

Math. With x̂ = (x − μ_g)·ρ_g (ρ = 1/√(σ² + ε)), h1 = x̂·w + b,
h2 = h1·(1 + s) + sh and y = SiLU(h2) (or h2 without act):
  forward   y = f((x − μ)·a + d),  a = ρ·w·(1 + s),  d = b·(1 + s) + sh
  backward  g = dy·SiLU'(h2),  r1 = Σ_hw g,  r2 = Σ_hw g·x̂     (per n, c)
            dsh = r1,  ds = w·r2 + b·r1,  db = Σ_n (1+s)·r1,  dw = Σ_n (1+s)·r2
            dx = ρ·(g·(1+s)·w − c1 − x̂·c2),  c1, c2 = group means of
            w·(1+s)·r1 and w·(1+s)·r2 over the group's M = C/G·HW elements.
Statistics are fp32 throughout: tiles are reduced two-pass in registers and
merged with Chan's parallel formula, never as E[x²] − E[x]².

Layout. x is [N, C, HW] with strides (sxn, sxc, sxhw): NCHW has sxhw = 1,
channels_last (4-D, 5-D, or the [N, C, T] view of a channels_last map that
attention's norm takes) has sxc = 1; Triton specialises on the unit stride, so
loads vectorise along whichever axis is contiguous (16 bytes per thread).

Kernels know pointers, strides and dtypes only; the launchers at the bottom
allocate and pick tile sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton


@triton.jit
def _silu_grad(h):
    sig = tl.sigmoid(h)
    return sig * (1.0 + h * (1.0 - sig))


@triton.jit
def _channel_params(w_ptr, b_ptr, s_ptr, sh_ptr, n, c, cmask, ssn, ssc, shn, shc,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr,
                    HAS_SH: tl.constexpr):
    """Per-channel w, b, (1 + s), sh as fp32 vectors (identity when absent)."""
    w = tl.full(c.shape, 1.0, tl.float32)
    b = tl.zeros(c.shape, tl.float32)
    one_s = tl.full(c.shape, 1.0, tl.float32)
    sh = tl.zeros(c.shape, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_S:
        one_s = 1.0 + tl.load(s_ptr + n * ssn + c * ssc, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SH:
        sh = tl.load(sh_ptr + n * shn + c * shc, mask=cmask, other=0.0).to(tl.float32)
    return w, b, one_s, sh


@triton.jit
def gn_stats_kernel(
    x_ptr,  # *T     input x[n, c, hw] at n*sxn + c*sxc + hw*sxhw
    part_ptr,  # *fp32  partials [N*G, SPLIT, 3]: (count, mean, M2) per split
    HW, G,  # spatial size, groups
    sxn, sxc, sxhw,  # strides of x, in elements
    HW_PER_SPLIT, SPLIT,  # spatial positions per split (a multiple of BLOCK_HW), splits
    CG: tl.constexpr,  # channels per group: a constant, so group offsets' alignment is known
    EVEN_C: tl.constexpr,  # CG == BLOCK_C: no channel mask, so channels_last loads vectorise
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Partial statistics of one (sample, group) over one range of positions."""
    ng = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n, g = ng // G, ng % G
    base = x_ptr + n * sxn + g * CG * sxc
    c = tl.arange(0, BLOCK_C)
    cmask = (c < CG) | EVEN_C
    hw0 = split * HW_PER_SPLIT
    hw_end = tl.minimum(hw0 + HW_PER_SPLIT, HW)
    count = tl.zeros([], tl.float32)
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    for start in range(hw0, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw < hw_end)[None, :]
        x = tl.load(base + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask, other=0.0)
        x = x.to(tl.float32)
        tile_n = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        tile_mean = tl.sum(tl.sum(x, axis=1), axis=0) / tile_n
        d = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        new_n = count + tile_n
        delta = tile_mean - mean
        mean += delta * (tile_n / new_n)
        m2 += tile_m2 + delta * delta * (count * tile_n / new_n)
        count = new_n
    out = part_ptr + (ng * SPLIT + split) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def gn_stats_finalize_kernel(
    part_ptr,  # *fp32 partials [N*G, SPLIT, 3]
    mean_ptr, rstd_ptr,  # *fp32 [N*G] outputs
    SPLIT, eps,
    BLOCK_S: tl.constexpr,
):
    """Combine a group's partials (Chan et al.) into its mean and 1/std."""
    ng = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    smask = s < SPLIT
    p = part_ptr + (ng * SPLIT + s) * 3
    cnt = tl.load(p, mask=smask, other=0.0)
    mu = tl.load(p + 1, mask=smask, other=0.0)
    m2 = tl.load(p + 2, mask=smask, other=0.0)
    total = tl.sum(cnt, axis=0)
    mean = tl.sum(cnt * mu, axis=0) / total
    dev = mu - mean
    var = (tl.sum(m2, axis=0) + tl.sum(cnt * dev * dev, axis=0)) / total
    tl.store(mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _tile_stats(mean_ptr, rstd_ptr, C, HW, G, CG: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_HW: tl.constexpr):
    """An elementwise program's tile (sample n, channels c, positions hw: program
    ids 0, 1, 2), its masks, each channel's group and that group's mean and 1/std."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(2).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cmask = c < C
    mask = cmask[:, None] & (hw < HW)[None, :]
    grp = n * G + c // CG
    mean = tl.load(mean_ptr + grp, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)
    return n, c, hw, cmask, mask, grp, mean, rstd


@triton.jit
def gn_fwd_apply_kernel(
    x_ptr, y_ptr,  # *T input and output, same logical shape
    mean_ptr, rstd_ptr,  # *fp32 [N*G]
    w_ptr, b_ptr,  # *Tw [C] affine (or dummies)
    s_ptr, sh_ptr,  # *Ts [N, C] scale and shift (or dummies)
    C, HW, G,
    sxn, sxc, sxhw, syn, syc, syhw,  # strides of x and y
    ssn, ssc, shn, shc,  # strides of scale and shift
    CG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr,
    HAS_SH: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """y = f((x − μ)·a + d) on one [BLOCK_C, BLOCK_HW] tile of one sample."""
    n, c, hw, cmask, mask, grp, mean, rstd = _tile_stats(mean_ptr, rstd_ptr, C, HW, G, CG,
                                                         BLOCK_C, BLOCK_HW)
    w, b, one_s, sh = _channel_params(w_ptr, b_ptr, s_ptr, sh_ptr, n, c, cmask, ssn, ssc,
                                      shn, shc, HAS_W, HAS_B, HAS_S, HAS_SH)
    a = rstd * w * one_s
    d = b * one_s + sh
    x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask,
                other=0.0).to(tl.float32)
    h = (x - mean[:, None]) * a[:, None] + d[:, None]
    if ACT:
        h = h * tl.sigmoid(h)
    tl.store(y_ptr + n * syn + c[:, None] * syc + hw[None, :] * syhw,
             h.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gn_fwd_fused_kernel(
    x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, sh_ptr,
    HW, G, eps,
    sxn, sxc, sxhw, syn, syc, syhw, ssn, ssc, shn, shc,
    CG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr,
    HAS_SH: tl.constexpr, ACT: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """One program per (sample, group) whose elements fit in registers: one
    read of x, two-pass statistics in registers, one write of y."""
    ng = tl.program_id(0).to(tl.int64)
    n, g = ng // G, ng % G
    cl = tl.arange(0, BLOCK_C)
    hw = tl.arange(0, BLOCK_HW)
    cmask = (cl < CG) | EVEN_C
    mask = cmask[:, None] & (hw < HW)[None, :]
    c = g * CG + cl
    x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask,
                other=0.0).to(tl.float32)
    m = CG * HW * 1.0
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / m
    dev = tl.where(mask, x - mean, 0.0)
    var = tl.sum(tl.sum(dev * dev, axis=1), axis=0) / m
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, rstd)
    w, b, one_s, sh = _channel_params(w_ptr, b_ptr, s_ptr, sh_ptr, n, c, cmask, ssn, ssc,
                                      shn, shc, HAS_W, HAS_B, HAS_S, HAS_SH)
    h = dev * (rstd * w * one_s)[:, None] + (b * one_s + sh)[:, None]
    if ACT:
        h = h * tl.sigmoid(h)
    tl.store(y_ptr + n * syn + c[:, None] * syc + hw[None, :] * syhw,
             h.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _recompute(x, dy, mean, rstd, w, b, one_s, sh, ACT: tl.constexpr):
    """(x̂, g = ∂L/∂h2) for a tile, from x and dy."""
    xhat = (x - mean[:, None]) * rstd[:, None]
    g = dy
    if ACT:
        h2 = (xhat * w[:, None] + b[:, None]) * one_s[:, None] + sh[:, None]
        g = dy * _silu_grad(h2)
    return xhat, g


@triton.jit
def gn_bwd_reduce_kernel(
    x_ptr, dy_ptr,  # *T input and upstream gradient
    mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, sh_ptr,
    part_ptr,  # *fp32 [2, SPLIT, N, C]: Σ g and Σ g·x̂ per split
    N, C, HW, G,
    sxn, sxc, sxhw, sdn, sdc, sdhw, ssn, ssc, shn, shc,
    HW_PER_SPLIT, SPLIT,
    CG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr,
    HAS_SH: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per-channel Σ_hw g and Σ_hw g·x̂ over one range of positions."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    cmask = c < C
    grp = n * G + c // CG
    mean = tl.load(mean_ptr + grp, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)
    w, b, one_s, sh = _channel_params(w_ptr, b_ptr, s_ptr, sh_ptr, n, c, cmask, ssn, ssc,
                                      shn, shc, HAS_W, HAS_B, HAS_S, HAS_SH)
    r1 = tl.zeros([BLOCK_C], tl.float32)
    r2 = tl.zeros([BLOCK_C], tl.float32)
    hw0 = split * HW_PER_SPLIT
    hw_end = tl.minimum(hw0 + HW_PER_SPLIT, HW)
    for start in range(hw0, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw < hw_end)[None, :]
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + n * sdn + c[:, None] * sdc + hw[None, :] * sdhw, mask=mask,
                     other=0.0).to(tl.float32)
        xhat, g = _recompute(x, dy, mean, rstd, w, b, one_s, sh, ACT)
        g = tl.where(mask, g, 0.0)
        r1 += tl.sum(g, axis=1)
        r2 += tl.sum(g * xhat, axis=1)
    out = part_ptr + (split * N + n) * C + c
    tl.store(out, r1, mask=cmask)
    tl.store(out + SPLIT * N * C, r2, mask=cmask)


@triton.jit
def gn_bwd_finalize_kernel(
    part_ptr,  # *fp32 [2, SPLIT, N, C]
    w_ptr, b_ptr, s_ptr,
    ds_ptr, dsh_ptr,  # *Ts [N, C] outputs (contiguous)
    wb_ptr,  # *fp32 [2, N, C]: (1+s)·r2 and (1+s)·r1, summed over N by the caller
    coef_ptr,  # *fp32 [2, N*G]: c1 and c2
    N, C, G, inv_m, SPLIT, ssn, ssc,
    CG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr,
    HAS_SH: tl.constexpr, NEED_WB: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per (sample, group): the small gradients and the group coefficients."""
    ng = tl.program_id(0).to(tl.int64)
    n, g = ng // G, ng % G
    cl = tl.arange(0, BLOCK_C)
    cmask = cl < CG
    c = g * CG + cl
    r1 = tl.zeros([BLOCK_C], tl.float32)
    r2 = tl.zeros([BLOCK_C], tl.float32)
    for sp in range(0, SPLIT):
        p = part_ptr + (sp * N + n) * C + c
        r1 += tl.load(p, mask=cmask, other=0.0)
        r2 += tl.load(p + SPLIT * N * C, mask=cmask, other=0.0)
    w, b, one_s, sh = _channel_params(w_ptr, b_ptr, s_ptr, s_ptr, n, c, cmask, ssn, ssc,
                                      ssn, ssc, HAS_W, HAS_B, HAS_S, False)
    if HAS_SH:
        tl.store(dsh_ptr + n * C + c, r1.to(dsh_ptr.dtype.element_ty), mask=cmask)
    if HAS_S:
        tl.store(ds_ptr + n * C + c, (w * r2 + b * r1).to(ds_ptr.dtype.element_ty),
                 mask=cmask)
    t1 = one_s * r1
    t2 = one_s * r2
    if NEED_WB:
        tl.store(wb_ptr + n * C + c, t2, mask=cmask)
        tl.store(wb_ptr + (N + n) * C + c, t1, mask=cmask)
    tl.store(coef_ptr + ng, tl.sum(w * t1, axis=0) * inv_m)
    tl.store(coef_ptr + N * G + ng, tl.sum(w * t2, axis=0) * inv_m)


@triton.jit
def gn_bwd_apply_kernel(
    x_ptr, dy_ptr, dx_ptr,
    mean_ptr, rstd_ptr, w_ptr, b_ptr, s_ptr, sh_ptr,
    coef_ptr,  # *fp32 [2, N*G]: c1, c2
    N, C, HW, G,
    sxn, sxc, sxhw, sdn, sdc, sdhw, son, soc, sohw, ssn, ssc, shn, shc,
    CG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr,
    HAS_SH: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dx = ρ·(g·(1+s)·w − c1 − x̂·c2) on one tile."""
    n, c, hw, cmask, mask, grp, mean, rstd = _tile_stats(mean_ptr, rstd_ptr, C, HW, G, CG,
                                                         BLOCK_C, BLOCK_HW)
    c1 = tl.load(coef_ptr + grp, mask=cmask, other=0.0)
    c2 = tl.load(coef_ptr + N * G + grp, mask=cmask, other=0.0)
    w, b, one_s, sh = _channel_params(w_ptr, b_ptr, s_ptr, sh_ptr, n, c, cmask, ssn, ssc,
                                      shn, shc, HAS_W, HAS_B, HAS_S, HAS_SH)
    x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + hw[None, :] * sxhw, mask=mask,
                other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + n * sdn + c[:, None] * sdc + hw[None, :] * sdhw, mask=mask,
                 other=0.0).to(tl.float32)
    xhat, g = _recompute(x, dy, mean, rstd, w, b, one_s, sh, ACT)
    dx = rstd[:, None] * (g * (one_s * w)[:, None] - c1[:, None] - xhat * c2[:, None])
    tl.store(dx_ptr + n * son + c[:, None] * soc + hw[None, :] * sohw,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --- launchers ----------------------------------------------------------------------

# Launch shapes per device type. On the GPU: tiles of ~2048 elements, groups of
# up to 4096 elements kept in one program's registers, reductions split until
# there are a few waves of programs for an H100/H200 (132 SMs). Triton's CPU
# interpreter runs programs one at a time, so there it gets fewer, larger ones;
# tests shrink these to exercise every tile, split and mask.
TILE = {"cuda": 2048, "cpu": 16384}
FUSED_MAX = {"cuda": 4096, "cpu": 65536}
TARGET_PROGRAMS = {"cuda": 528, "cpu": 4}


def layout_strides(t: Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_hw) of t viewed as [N, C, HW], for NCHW-contiguous
    or channels-last tensors (channels_last, channels_last_3d, and the 3-D
    [N, C, T] view of a channels_last map); None for other layouts."""
    n, c = t.shape[:2]
    hw = t.numel() // max(1, n * c)
    if t.is_contiguous():
        return c * hw, hw, 1
    if t.dim() >= 3 and t.movedim(1, -1).is_contiguous():
        return c * hw, 1, c
    return None


def _tiles(channels_fast: bool, hw: int, c: int, device: torch.device, share: int = 1):
    """(BLOCK_C, BLOCK_HW) of about TILE/share elements, long along the contiguous
    axis (backward kernels hold two tensors per element: share=2)."""
    tile = max(1, TILE.get(device.type, 2048) // share)
    if channels_fast:
        block_c = min(triton.next_power_of_2(c), 64, tile)
        return block_c, max(1, min(triton.next_power_of_2(hw), tile // block_c))
    block_hw = min(triton.next_power_of_2(hw), tile // 2)
    return max(1, min(triton.next_power_of_2(c), tile // block_hw)), block_hw


def _split(total_programs: int, hw: int, block_hw: int, device: torch.device):
    target = TARGET_PROGRAMS.get(device.type, 8)
    split = max(1, min(triton.cdiv(target, max(1, total_programs)), triton.cdiv(hw, block_hw)))
    per = triton.cdiv(triton.cdiv(hw, split), block_hw) * block_hw
    return per, triton.cdiv(hw, per)


def _vec_args(weight, bias, scale, shift, x):
    dummy = x  # never read: the HAS_* flags are off
    return (weight if weight is not None else dummy, bias if bias is not None else dummy,
            scale if scale is not None else dummy, shift if shift is not None else dummy,
            *(scale.stride() if scale is not None else (0, 0)),
            *(shift.stride() if shift is not None else (0, 0)))


def forward(x: Tensor, num_groups: int, weight, bias, scale, shift, eps: float,
            act: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y like x; mean, rstd fp32 [N, G]."""
    n, c = x.shape[:2]
    hw = x.numel() // max(1, n * c)
    g, cg = num_groups, c // num_groups
    sx = layout_strides(x)
    y = torch.empty_like(x)
    sy = layout_strides(y)
    mean = torch.empty(n, g, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_S=scale is not None,
                 HAS_SH=shift is not None, ACT=act)
    w, b, s, sh, ssn, ssc, shn, shc = _vec_args(weight, bias, scale, shift, x)
    block_cg = triton.next_power_of_2(cg)
    if block_cg * triton.next_power_of_2(hw) <= FUSED_MAX.get(x.device.type, 4096):
        block_hw = triton.next_power_of_2(hw)
        wrap_triton(gn_fwd_fused_kernel)[(n * g,)](
            x, y, mean, rstd, w, b, s, sh, hw, g, eps, *sx, *sy, ssn, ssc, shn, shc,
            CG=cg, **flags, EVEN_C=block_cg == cg, BLOCK_C=block_cg, BLOCK_HW=block_hw,
            num_warps=4 if block_cg * block_hw <= 2048 else 8)
        return y, mean, rstd
    channels_fast = sx[1] == 1 and c > 1
    stat_hw = max(1, min(triton.next_power_of_2(hw), 2 * TILE.get(x.device.type, 2048) // block_cg))
    per, split = _split(n * g, hw, stat_hw, x.device)
    part = torch.empty(n * g, split, 3, device=x.device, dtype=torch.float32)
    wrap_triton(gn_stats_kernel)[(n * g, split)](
        x, part, hw, g, *sx, per, split, CG=cg, EVEN_C=block_cg == cg, BLOCK_C=block_cg,
        BLOCK_HW=stat_hw,
        num_warps=4)
    wrap_triton(gn_stats_finalize_kernel)[(n * g,)](
        part, mean, rstd, split, eps, BLOCK_S=triton.next_power_of_2(split), num_warps=1)
    block_c, block_hw = _tiles(channels_fast, hw, c, x.device)
    grid = (n, triton.cdiv(c, block_c), triton.cdiv(hw, block_hw))
    wrap_triton(gn_fwd_apply_kernel)[grid](
        x, y, mean, rstd, w, b, s, sh, c, hw, g, *sx, *sy, ssn, ssc, shn, shc, CG=cg, **flags,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=4)
    return y, mean, rstd


def backward(dy: Tensor, x: Tensor, num_groups: int, weight, bias, scale, shift, mean: Tensor,
             rstd: Tensor, act: bool, need_wb: bool):
    """(dx, dweight, dbias, dscale, dshift); entries for absent inputs are None."""
    n, c = x.shape[:2]
    hw = x.numel() // max(1, n * c)
    g, cg = num_groups, c // num_groups
    sx = layout_strides(x)
    if layout_strides(dy) != sx:
        dy = dy.movedim(1, -1).contiguous().movedim(-1, 1) if (
            x.dim() >= 3 and sx[1] == 1 and c > 1) else dy.contiguous()
    sd = layout_strides(dy)
    dx = torch.empty_like(x)
    so = layout_strides(dx)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_S=scale is not None,
                 HAS_SH=shift is not None)
    w, b, s, sh, ssn, ssc, shn, shc = _vec_args(weight, bias, scale, shift, x)
    channels_fast = sx[1] == 1 and c > 1
    block_c, block_hw = _tiles(channels_fast, hw, c, x.device, share=2)
    per, split = _split(n * triton.cdiv(c, block_c), hw, block_hw, x.device)
    part = torch.empty(2, split, n, c, device=x.device, dtype=torch.float32)
    wrap_triton(gn_bwd_reduce_kernel)[(n, triton.cdiv(c, block_c), split)](
        x, dy, mean, rstd, w, b, s, sh, part, n, c, hw, g, *sx, *sd, ssn, ssc, shn, shc,
        per, split, CG=cg, **flags, ACT=act, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=4)
    dscale = torch.empty(n, c, device=x.device, dtype=scale.dtype) if scale is not None else None
    dshift = torch.empty(n, c, device=x.device, dtype=shift.dtype) if shift is not None else None
    wb = torch.empty(2, n, c, device=x.device, dtype=torch.float32) if need_wb else part
    coef = torch.empty(2, n * g, device=x.device, dtype=torch.float32)
    wrap_triton(gn_bwd_finalize_kernel)[(n * g,)](
        part, w, b, s, dscale if dscale is not None else part,
        dshift if dshift is not None else part, wb, coef, n, c, g, 1.0 / (cg * hw), split,
        ssn, ssc, CG=cg, **flags, NEED_WB=need_wb, BLOCK_C=triton.next_power_of_2(cg), num_warps=1)
    wrap_triton(gn_bwd_apply_kernel)[(n, triton.cdiv(c, block_c), triton.cdiv(hw, block_hw))](
        x, dy, dx, mean, rstd, w, b, s, sh, coef, n, c, hw, g, *sx, *sd, *so,
        ssn, ssc, shn, shc, CG=cg, **flags, ACT=act, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=4)
    dweight = dbias = None
    if need_wb:  # sums over the batch; separate tensors, as custom-op outputs may not alias
        if weight is not None:
            dweight = wb[0].sum(dim=0).to(weight.dtype)
        if bias is not None:
            dbias = wb[1].sum(dim=0).to(bias.dtype)
    return dx, dweight, dbias, dscale, dshift
