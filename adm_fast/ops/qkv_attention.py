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

import torch
from torch import Tensor

from . import dispatch

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
