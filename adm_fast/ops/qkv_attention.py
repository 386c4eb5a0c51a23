"""qkv_attention: multi-head softmax(qᵀk/√C)·v on the qkv conv's output.

qkv is [N, 3·H·C, T] exactly as ADM's 1×1 qkv convolution emits it. Two
channel orders exist in released models:
  legacy=True  (QKVAttentionLegacy): heads first, then q/k/v: [N, H, 3, C, T]
  legacy=False (QKVAttention):       q/k/v first, then heads: [N, 3, H, C, T]
The output is [N, H·C, T] in both cases.

The eager reference is guided-diffusion's arithmetic: q and k are each scaled
by C^-1/4 before the product (kinder to fp16 than dividing after), the
softmax runs in fp32 and is cast back, the products run in qkv's dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .group_norm_act import differentiable_grads, needs_grad

OP = "qkv_attention"


def check_args(qkv, num_heads) -> None:
    if not isinstance(qkv, Tensor) or not qkv.is_floating_point():
        raise TypeError(f"{OP}: qkv must be a floating-point tensor, got "
                        f"{getattr(qkv, 'dtype', type(qkv))}")
    if qkv.dim() != 3:
        raise ValueError(f"{OP}: qkv must be [N, 3*H*C, T], got shape {tuple(qkv.shape)}")
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"{OP}: num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[1] % (3 * num_heads):
        raise ValueError(f"{OP}: qkv has {qkv.shape[1]} channels, not divisible by "
                         f"3 * num_heads = {3 * num_heads}")


def split_heads(qkv: Tensor, num_heads: int, legacy: bool):
    """q, k, v as [N·H, C, T] views of qkv (no copy for contiguous qkv)."""
    n, width, t = qkv.shape
    c = width // (3 * num_heads)
    if legacy:
        q, k, v = qkv.reshape(n * num_heads, 3 * c, t).split(c, dim=1)
    else:
        q, k, v = (part.reshape(n * num_heads, c, t) for part in qkv.chunk(3, dim=1))
    return q, k, v


def reference(qkv: Tensor, num_heads: int, legacy: bool = True) -> Tensor:
    """guided-diffusion's eager attention (differentiable, any dtype incl. fp64)."""
    n, width, t = qkv.shape
    c = width // (3 * num_heads)
    q, k, v = split_heads(qkv, num_heads, legacy)
    s = 1 / math.sqrt(math.sqrt(c))
    weight = torch.einsum("bct,bcs->bts", q * s, k * s)
    up = torch.float64 if weight.dtype == torch.float64 else torch.float32
    weight = torch.softmax(weight.to(up), dim=-1).to(weight.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v)
    return out.reshape(n, -1, t)


def qkv_attention(qkv: Tensor, num_heads: int, legacy: bool = True) -> Tensor:
    """Multi-head attention over T tokens.

    qkv: [N, 3·H·C, T], fp32/fp16/bf16, in the legacy (heads, qkv) or the new
    (qkv, heads) channel order. Returns [N, H·C, T] in qkv's dtype.
    """
    check_args(qkv, num_heads)
    return dispatch.call(OP, qkv, num_heads, legacy)


# --- the fused path: one custom op for every fused backend ---------------------------
#
# torch.ops.adm_fast.qkv_attention returns (out, lse); the backward saves only
# qkv, out and the per-row logsumexp and recomputes the T×T weights, so training
# memory does not grow with T².

IMPLS: Dict[str, Callable] = {}


@torch.library.triton_op("adm_fast::qkv_attention", mutates_args=())
def _fused(qkv: Tensor, num_heads: int, legacy: bool, backend: str) -> Tuple[Tensor, Tensor]:
    return IMPLS[backend]().forward(qkv, num_heads, legacy)


@_fused.register_fake
def _(qkv, num_heads, legacy, backend):
    n, width, t = qkv.shape
    out = qkv.new_empty((n, width // 3, t))
    return out, qkv.new_empty((n, num_heads, t), dtype=torch.float32)


@torch.library.triton_op("adm_fast::qkv_attention_backward", mutates_args=())
def _fused_backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                    legacy: bool, backend: str) -> Tensor:
    return IMPLS[backend]().backward(dout, qkv, out, lse, num_heads, legacy)


@_fused_backward.register_fake
def _(dout, qkv, out, lse, num_heads, legacy, backend):
    return torch.empty_like(qkv)


def _setup(ctx, inputs, output):
    qkv, num_heads, legacy, backend = inputs
    ctx.save_for_backward(qkv, output[0], output[1])
    ctx.num_heads, ctx.legacy, ctx.backend = num_heads, legacy, backend


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # double backward: through the eager reference
        (dqkv,) = differentiable_grads(lambda q: reference(q, ctx.num_heads, ctx.legacy),
                                       (qkv,), (True,), dout)
        return dqkv, None, None, None
    dqkv = torch.ops.adm_fast.qkv_attention_backward(dout, qkv, out, lse, ctx.num_heads,
                                                     ctx.legacy, ctx.backend)
    return dqkv, None, None, None


_fused.register_autograd(_backward, setup_context=_setup)


class _Direct(torch.autograd.Function):
    """The custom op's autograd without its dispatch, for eager-mode training
    (as group_norm_act's)."""

    @staticmethod
    def forward(ctx, qkv, num_heads, legacy, backend):
        out, lse = IMPLS[backend]().forward(qkv, num_heads, legacy)
        _setup(ctx, (qkv, num_heads, legacy, backend), (out, lse))
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():
            return _backward(ctx, dout, None)
        qkv, out, lse = ctx.saved_tensors
        dqkv = IMPLS[ctx.backend]().backward(dout, qkv, out, lse, ctx.num_heads, ctx.legacy)
        return dqkv, None, None, None


def fused(backend: str) -> Callable:
    def run(qkv, num_heads, legacy):
        if torch.compiler.is_compiling():
            return torch.ops.adm_fast.qkv_attention(qkv, num_heads, bool(legacy), backend)[0]
        if needs_grad(qkv):
            return _Direct.apply(qkv, num_heads, bool(legacy), backend)
        return IMPLS[backend]().forward(qkv, num_heads, bool(legacy))[0]
    return run


def sdpa(qkv: Tensor, num_heads: int, legacy: bool = True) -> Tensor:
    """Attention through torch's scaled_dot_product_attention: q, k, v copied to
    [N, H, T, C] (the layout its fast kernels need), the output copied back."""
    n, width, t = qkv.shape
    c = width // (3 * num_heads)
    q, k, v = (p.reshape(n, num_heads, c, t).transpose(-1, -2).contiguous()
               for p in split_heads(qkv, num_heads, legacy))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(n, num_heads * c, t)
