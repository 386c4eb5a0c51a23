"""Flash-style Triton kernels for ADM's QKV attention, fwd and bwd.

Layout. qkv is [N, 3·H·C, T] as the 1×1 qkv convolution emits it: token t of
channel c at n·s_n + c·s_c + t·s_t, either NCHW-like (s_t = 1, tokens
contiguous) or the [N, C, T] view of a channels_last map (s_c = 1, channels
contiguous; what conv1x1 gives for channels_last input). Head h's q, k, v
start at channel q_off + h·head_step (+ k_off, + v_off):
  legacy (heads, then q/k/v):  q_off, k_off, v_off = 0, C, 2C;   head_step = 3C
  new    (q/k/v, then heads):  q_off, k_off, v_off = 0, HC, 2HC; head_step = C
Tiles are read straight from there with strides (Triton specialises the unit
one, so loads vectorise along whichever axis is contiguous); the output
[N, H·C, T] is written in qkv's layout, dout is read in its own, and dqkv is
written in qkv's. Nothing is transposed or copied.

Math. softmax(QKᵀ/√C)·V with an online softmax (running max and sum, fp32),
in base 2: s = q·k·log2(e)/√C, p = 2^(s − m). The forward stores the per-row
logsumexp (base 2); the backward (FlashAttention-2) recomputes P from it:
  Δ = rowsum(dO∘O),  dV = Pᵀ·dO,  dS = P∘(dO·Vᵀ − Δ),
  dQ = dS·K/√C,      dK = dSᵀ·Q/√C,
writing dq, dk, dv into one dqkv in qkv's layout. fp32 inputs multiply as
three TF32 products (fp32 accuracy on tensor cores), so fp32 results match
an fp64 reference to ~1e-6.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """PREC 0: the tensor cores' native product (fp16/bf16 in, fp32 sums).
    1: fp32 operands as three TF32 products (fp32 accuracy on tensor cores).
    2: bf16 operands multiplied as fp32, for Triton 3.6's CPU interpreter,
    whose bf16 product is wrong; the result equals what a tensor core gives."""
    if PREC == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if PREC == 1:
        return tl.dot(a, b, input_precision="tf32x3")
    return tl.dot(a, b)


@triton.jit
def attn_fwd_kernel(
    qkv_ptr,  # *T   [N, 3HC, T]
    o_ptr,  # *T     [N, HC, T] output
    lse_ptr,  # *fp32 [N*H, T] per-row logsumexp, base 2
    T, H, C,  # tokens, heads, head channels
    s_n, s_c, s_t, so_n, so_c, so_t,  # sample, channel and token strides of qkv and o
    q_off, k_off, v_off, head_step,  # channel offsets (see module docstring)
    qk_scale,  # log2(e)/sqrt(C)
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    nh = tl.program_id(1).to(tl.int64)
    n, h = nh // H, nh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
    rmask, dmask = rows < T, d < C
    base = qkv_ptr + n * s_n + h * head_step * s_c
    q = tl.load(base + (q_off + d[None, :]) * s_c + rows[:, None] * s_t,
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # [M, D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, T, BLOCK_N):
        cols = start + cols0
        cmask = cols < T
        kt = tl.load(base + (k_off + d[:, None]) * s_c + cols[None, :] * s_t,
                     mask=dmask[:, None] & cmask[None, :], other=0.0)  # [D, N]
        s = _dot(q, kt, PREC) * qk_scale
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(base + (v_off + d[None, :]) * s_c + cols[:, None] * s_t,
                    mask=cmask[:, None] & dmask[None, :], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_ptr + n * so_n + (h * C + d[None, :]) * so_c + rows[:, None] * so_t,
             acc.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + nh * T + rows, m_i + tl.math.log2(l_i), mask=rmask)


@triton.jit
def attn_bwd_delta_kernel(
    o_ptr, do_ptr,  # *T [N, HC, T], each with its own strides
    delta_ptr,  # *fp32 [N*H, T]: rowsum(dO∘O)
    T, H, C, so_n, so_c, so_t, sd_n, sd_c, sd_t,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    nh = tl.program_id(1).to(tl.int64)
    n, h = nh // H, nh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (d < C)[None, :]
    ch = (h * C + d[None, :])
    o = tl.load(o_ptr + n * so_n + ch * so_c + rows[:, None] * so_t, mask=mask, other=0.0)
    do = tl.load(do_ptr + n * sd_n + ch * sd_c + rows[:, None] * sd_t, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + nh * T + rows, delta, mask=rows < T)


@triton.jit
def attn_bwd_dkdv_kernel(
    qkv_ptr, do_ptr, lse_ptr, delta_ptr,
    dqkv_ptr,  # *T [N, 3HC, T]: this kernel writes the k and v channels
    T, H, C, s_n, s_c, s_t, sd_n, sd_c, sd_t, sg_n, sg_c, sg_t,  # qkv, do, dqkv strides
    q_off, k_off, v_off, head_step, qk_scale, sm_scale,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One block of keys: dK and dV accumulated over all query blocks."""
    nh = tl.program_id(1).to(tl.int64)
    n, h = nh // H, nh % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    rows0 = tl.arange(0, BLOCK_M)
    cmask, dmask = cols < T, d < C
    base = qkv_ptr + n * s_n + h * head_step * s_c
    kv_mask = cmask[:, None] & dmask[None, :]
    k = tl.load(base + (k_off + d[None, :]) * s_c + cols[:, None] * s_t, mask=kv_mask,
                other=0.0)
    v = tl.load(base + (v_off + d[None, :]) * s_c + cols[:, None] * s_t, mask=kv_mask,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    do_base = do_ptr + n * sd_n + h * C * sd_c
    for start in range(0, T, BLOCK_M):
        rows = start + rows0
        rmask = rows < T
        qt = tl.load(base + (q_off + d[:, None]) * s_c + rows[None, :] * s_t,
                     mask=dmask[:, None] & rmask[None, :], other=0.0)  # [D, M]
        do = tl.load(do_base + d[None, :] * sd_c + rows[:, None] * sd_t,
                     mask=rmask[:, None] & dmask[None, :], other=0.0)  # [M, D]
        lse = tl.load(lse_ptr + nh * T + rows, mask=rmask, other=0.0)
        delta = tl.load(delta_ptr + nh * T + rows, mask=rmask, other=0.0)
        st = _dot(k, qt, PREC) * qk_scale  # [N, M]
        pt = tl.math.exp2(st - lse[None, :])
        pt = tl.where(rmask[None, :], pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, PREC)
        dpt = _dot(v, tl.trans(do), PREC)  # [N, M]
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), PREC)
    out = dqkv_ptr + n * sg_n + h * head_step * sg_c
    tl.store(out + (k_off + d[None, :]) * sg_c + cols[:, None] * sg_t,
             (dk * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(out + (v_off + d[None, :]) * sg_c + cols[:, None] * sg_t,
             dv.to(dqkv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def attn_bwd_dq_kernel(
    qkv_ptr, do_ptr, lse_ptr, delta_ptr,
    dqkv_ptr,  # *T [N, 3HC, T]: this kernel writes the q channels
    T, H, C, s_n, s_c, s_t, sd_n, sd_c, sd_t, sg_n, sg_c, sg_t,  # qkv, do, dqkv strides
    q_off, k_off, v_off, head_step, qk_scale, sm_scale,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One block of queries: dQ accumulated over all key blocks."""
    nh = tl.program_id(1).to(tl.int64)
    n, h = nh // H, nh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
    rmask, dmask = rows < T, d < C
    base = qkv_ptr + n * s_n + h * head_step * s_c
    q_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(base + (q_off + d[None, :]) * s_c + rows[:, None] * s_t, mask=q_mask,
                other=0.0)
    do = tl.load(do_ptr + n * sd_n + (h * C + d[None, :]) * sd_c + rows[:, None] * sd_t,
                 mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + nh * T + rows, mask=rmask, other=0.0)
    delta = tl.load(delta_ptr + nh * T + rows, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, T, BLOCK_N):
        cols = start + cols0
        cmask = cols < T
        t_mask = dmask[:, None] & cmask[None, :]
        kt = tl.load(base + (k_off + d[:, None]) * s_c + cols[None, :] * s_t, mask=t_mask,
                     other=0.0)
        vt = tl.load(base + (v_off + d[:, None]) * s_c + cols[None, :] * s_t, mask=t_mask,
                     other=0.0)
        s = _dot(q, kt, PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(cmask[None, :], p, 0.0)
        dp = _dot(do, vt, PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), PREC)
    tl.store(dqkv_ptr + n * sg_n + (h * head_step + q_off + d[None, :]) * sg_c
             + rows[:, None] * sg_t, (dq * sm_scale).to(dqkv_ptr.dtype.element_ty),
             mask=q_mask)


# --- launchers ----------------------------------------------------------------------

# Launch shapes: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, per padded
# head dim, for 16-bit and for fp32 inputs. Chosen from sm_90/sm_80 compiles
# (python -m adm_fast.benchmarks.aot) for no register spills and shared memory
# within both limits; the timings that should refine them come from
# bench/gpu_check. In the dK/dV kernel BLOCK_N keys are held and BLOCK_M
# queries stream past; in the others BLOCK_M queries are held. fp32 runs three
# TF32 products per tile, so its tiles are small; past head dim 128 even those
# spill registers (correct, slower: `auto` leaves fp32 attention to SDPA).
_CONFIGS = {
    "fwd": {False: {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 3)},
            True: {64: (64, 32, 8, 2), 128: (16, 32, 8, 2), 256: (16, 16, 8, 1)}},
    "dkdv": {False: {64: (32, 128, 8, 3), 128: (32, 64, 8, 3), 256: (32, 32, 8, 3)},
             True: {64: (32, 32, 8, 2), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)}},
    "dq": {False: {64: (128, 32, 8, 3), 128: (64, 32, 8, 3), 256: (64, 32, 8, 2)},
           True: {64: (32, 32, 8, 2), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)}},
}
# Ampere has no wgmma: register-resident MMA operands want smaller query tiles.
_SM80 = {("fwd", False, 128): (64, 64, 8, 3)}
# The architecture to pick launch shapes for, per device type whose own cannot
# be asked: the interpreter's; ahead-of-time compiles set it per target, and a
# plan traced on fake CUDA tensors sets "cuda".
TARGET_ARCH = {"cpu": 90}


def _arch(device: torch.device) -> int:
    if device.type in TARGET_ARCH:  # the interpreter, or a GPU plan traced without a GPU
        return TARGET_ARCH[device.type]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


# Triton's interpreter runs programs one by one and is indifferent to registers:
# there, fewer and larger tiles (tests override this to exercise small ones).
INTERPRETER_CONFIG = (128, 128, 4, 1)


def _config(kernel: str, c: int, t: int, fp32: bool, device: torch.device) -> dict:
    block_d = max(16, triton.next_power_of_2(c))
    key = max(64, block_d)
    bm, bn, warps, stages = _CONFIGS[kernel][fp32][key]
    if device.type in INTERPRETED_DEVICES:
        bm, bn, warps, stages = INTERPRETER_CONFIG
        t2 = triton.next_power_of_2(t)
        return dict(BLOCK_M=max(16, min(bm, t2)), BLOCK_N=max(16, min(bn, t2)),
                    BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    if _arch(device) < 90:
        bm, bn, warps, stages = _SM80.get((kernel, fp32, key), (bm, bn, warps, stages))
    # Short sequences (8² tokens, and 65 with the pooled one) take small tiles.
    cap = (16 if fp32 else 64) if t <= 128 else 1 << 30
    t2 = triton.next_power_of_2(t)
    bm, bn = max(16, min(bm, t2, cap)), max(16, min(bn, t2, cap))
    if fp32 and t <= 128:
        warps = 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


# Device types whose Triton runs in the interpreter (see _dot, PREC 2).
INTERPRETED_DEVICES = {"cpu"}


def _precision(qkv: Tensor) -> dict:
    if qkv.dtype == torch.float32:
        return dict(PREC=1)
    bf16_fix = qkv.device.type in INTERPRETED_DEVICES and qkv.dtype == torch.bfloat16
    return dict(PREC=2 if bf16_fix else 0)


def head_layout(channels: int, num_heads: int, legacy: bool):
    """(C, q_off, k_off, v_off, head_step) for qkv with `channels` = 3HC."""
    c = channels // (3 * num_heads)
    if legacy:
        return c, 0, c, 2 * c, 3 * c
    return c, 0, num_heads * c, 2 * num_heads * c, c


def channels_contiguous(qkv: Tensor) -> bool:
    """qkv is the [N, C, T] view of a channels_last map ([N, T, 3HC] in memory)
    rather than [N, 3HC, T] with tokens contiguous: the outputs then take that
    layout too (the op's fake, adm_fast.ops.qkv_attention, says the same)."""
    return qkv.stride(1) == 1 and qkv.stride(2) != 1


def empty_like_qkv(qkv: Tensor, channels: int) -> Tensor:
    """[N, channels, T] in qkv's layout, qkv's dtype."""
    n, _, t = qkv.shape
    if channels_contiguous(qkv):
        return torch.empty(n, t, channels, device=qkv.device, dtype=qkv.dtype).transpose(1, 2)
    return torch.empty(n, channels, t, device=qkv.device, dtype=qkv.dtype)


def forward(qkv: Tensor, num_heads: int, legacy: bool) -> tuple[Tensor, Tensor]:
    """(out [N, HC, T] in qkv's layout, lse [N, H, T] fp32 base 2)."""
    n, width, t = qkv.shape
    c, q_off, k_off, v_off, step = head_layout(width, num_heads, legacy)
    out = empty_like_qkv(qkv, num_heads * c)
    lse = torch.empty(n, num_heads, t, device=qkv.device, dtype=torch.float32)
    cfg = _config("fwd", c, t, qkv.dtype == torch.float32, qkv.device)
    wrap_triton(attn_fwd_kernel)[(triton.cdiv(t, cfg["BLOCK_M"]), n * num_heads)](
        qkv, out, lse, t, num_heads, c, *qkv.stride(), *out.stride(), q_off, k_off, v_off,
        step, LOG2E / math.sqrt(c), **_precision(qkv), **cfg)
    return out, lse


def backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
             legacy: bool) -> Tensor:
    """dqkv [N, 3HC, T] in qkv's layout; dout is read in place in either layout."""
    n, width, t = qkv.shape
    c, q_off, k_off, v_off, step = head_layout(width, num_heads, legacy)
    if dout.stride(1) != 1 and dout.stride(2) != 1:
        # Neither layout (an expanded gradient, say): the kernels reread dout
        # once per block of keys, so one copy costs less than strided rereads.
        dout = dout.contiguous()
    dqkv = empty_like_qkv(qkv, width)
    delta = torch.empty(n, num_heads, t, device=qkv.device, dtype=torch.float32)
    fp32 = qkv.dtype == torch.float32
    dkdv, dq = _config("dkdv", c, t, fp32, qkv.device), _config("dq", c, t, fp32, qkv.device)
    block_m = max(16, min(64, triton.next_power_of_2(t)))
    wrap_triton(attn_bwd_delta_kernel)[(triton.cdiv(t, block_m), n * num_heads)](
        out, dout, delta, t, num_heads, c, *out.stride(), *dout.stride(), BLOCK_M=block_m,
        BLOCK_D=dq["BLOCK_D"], num_warps=4)
    common = (t, num_heads, c, *qkv.stride(), *dout.stride(), *dqkv.stride(), q_off, k_off,
              v_off, step, LOG2E / math.sqrt(c), 1.0 / math.sqrt(c))
    wrap_triton(attn_bwd_dkdv_kernel)[(triton.cdiv(t, dkdv["BLOCK_N"]), n * num_heads)](
        qkv, dout, lse, delta, dqkv, *common, **_precision(qkv), **dkdv)
    wrap_triton(attn_bwd_dq_kernel)[(triton.cdiv(t, dq["BLOCK_M"]), n * num_heads)](
        qkv, dout, lse, delta, dqkv, *common, **_precision(qkv), **dq)
    return dqkv
