"""qkv_attention: multi-head softmax(qᵀk/√C)·v on the qkv conv's output.

qkv is [N, 3·H·C, T] exactly as ADM's 1×1 qkv convolution emits it. Two
channel orders exist in released models:
  legacy=True  (QKVAttentionLegacy): heads first, then q/k/v: [N, H, 3, C, T]
  legacy=False (QKVAttention):       q/k/v first, then heads: [N, 3, H, C, T]
The output is [N, H·C, T] in both cases.

The eager reference is guided-diffusion's arithmetic: q and k are each scaled
by C^-1/4 before the product (kinder to fp16 than dividing after), the
softmax runs in fp32 and is cast back, the products run in qkv's dtype.

Implementations: eager (the reference), sdpa (torch's
scaled_dot_product_attention with the layout copies it needs), triton
(adm_fast/kernels/qkv_attention.py: reads q, k, v in place, online softmax; returns
(out, lse) and its backward keeps only qkv, out and the per-row logsumexp,
so training memory does not grow with T²).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import TritonImpl
from .impl import Call, Impl
from .op import Op


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
    return out.reshape(n, num_heads * c, t)


def channels_contiguous(qkv: Tensor) -> bool:
    """qkv is the [N, C, T] view of a channels_last map ([N, T, 3HC] in memory,
    what conv1x1 gives for channels_last input) rather than [N, 3HC, T] with
    tokens contiguous. The kernels (adm_fast/kernels/qkv_attention.py, the same test)
    write the output in that layout then."""
    return qkv.stride(1) == 1 and qkv.stride(2) != 1


def sdpa(qkv: Tensor, num_heads: int, legacy: bool = True) -> Tensor:
    """Attention through torch's scaled_dot_product_attention, which wants q, k,
    v as [N, H, T, C] with C contiguous. qkv with contiguous channels (the
    [N, C, T] view of a channels_last map) gives them as views, and the output
    comes back in that layout; NCHW qkv is copied to it and back."""
    n, width, t = qkv.shape
    if t == 1:
        # One token: the softmax of one score is 1, and SDPA returns v as it is
        # where eager's NaN or inf score gives NaN; eager's arithmetic is
        # as cheap here (one product per head) and gives eager's values.
        return reference(qkv, num_heads, legacy)
    c = width // (3 * num_heads)
    if qkv.stride(1) == 1:  # [N, T, 3HC] in memory
        rows = qkv.transpose(1, 2)
        parts = (rows.unflatten(-1, (num_heads, 3, c)).unbind(-2) if legacy
                 else rows.unflatten(-1, (3, num_heads, c)).unbind(-3))
        q, k, v = (p.transpose(1, 2) for p in parts)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(n, t, num_heads * c).transpose(1, 2)
    q, k, v = (p.reshape(n, num_heads, c, t).transpose(-1, -2).contiguous()
               for p in split_heads(qkv, num_heads, legacy))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(n, num_heads * c, t)


class QkvAttention(Op):
    name = "qkv_attention"
    signature = "Tensor qkv, int num_heads, bool legacy"
    kernel_returns = 2  # out, then the fp32 [N, H, T] logsumexp the backward keeps
    kept_outputs = (0, 1)
    has_kernel_backward = True
    preferences = [
        # On a CPU SDPA's flash kernel wins at 1024 tokens, while at 256 and
        # below its layout copies cost more than it saves; the rule switches at
        # 768, between the two sizes measured (`adm-fast bench ops
        # qkv_attention`, docs/performance.md). Another CPU has SDPA ahead from
        # 256 tokens, so auto times the two per call signature (tune); these
        # rules order them when it does not.
        {"device": "cpu", "min": {"tokens": 768}, "order": ["sdpa"]},
        {"device": "cpu", "order": ["eager", "sdpa"]},
    ]
    tune = {"cpu": ("eager", "sdpa")}

    def check(self, qkv, num_heads, legacy) -> None:
        op = self.name
        if not isinstance(qkv, Tensor) or not qkv.is_floating_point():
            raise TypeError(f"{op}: qkv must be a floating-point tensor, got "
                            f"{getattr(qkv, 'dtype', type(qkv))}")
        if qkv.dim() != 3:
            raise ValueError(f"{op}: qkv must be [N, 3*H*C, T], got shape {tuple(qkv.shape)}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
        if qkv.shape[1] % (3 * num_heads) or qkv.shape[1] == 0:
            raise ValueError(f"{op}: qkv has {qkv.shape[1]} channels, not divisible by "
                             f"3 * num_heads = {3 * num_heads}")

    reference = staticmethod(reference)

    def features(self, qkv, num_heads, legacy):
        return {"tokens": qkv.shape[-1], "head_dim": qkv.shape[1] // (3 * num_heads)}

    def fake(self, qkv, num_heads, legacy):
        n, width, t = qkv.shape
        if channels_contiguous(qkv):  # out in qkv's layout, as the kernels write it
            out = qkv.new_empty((n, t, width // 3)).transpose(1, 2)
        else:
            out = qkv.new_empty((n, width // 3, t))
        return out, qkv.new_empty((n, num_heads, t), dtype=torch.float32)

    def kernel_backward(self, impl, args, kept, grads, needs):
        qkv, num_heads, legacy = args
        return impl.backward(grads[0], qkv, *kept, num_heads, legacy), None, None


QKV_ATTENTION = QkvAttention()


class Sdpa(Impl):
    # First-order backward only: torch's fused SDPA kernels have no derivative of
    # their backward. Double backward: any other backend (a kernel's backward is
    # then the reference's, differentiated; ops/op.py).
    backend, kind = "sdpa", "composite"
    # torch's fp32 SDPA backward on CPU is less exact than the eager path's:
    # its gradients' largest error against fp64 ran past 8x the eager path's
    # in rare cases (few tokens, a sharp softmax), where its forward and its
    # fp16/bf16 gradients stayed within the default 2x (ops/verify.py;
    # docs/performance.md).
    verify_factor = 16.0

    def run(self, *args):
        return sdpa(*args)


class Triton(TritonImpl):
    module = "qkv_attention"
    max_features = {"head_dim": 256}

    def extra_reasons(self, call: Call) -> list[str]:
        # Tiles are read along whichever axis is contiguous; with neither, every
        # load would be a gather.
        qkv = call.tensors["qkv"]
        if qkv.stride(2) != 1 and qkv.stride(1) != 1:
            return [f"qkv's tokens are not contiguous and neither are its channels (strides "
                    f"{tuple(qkv.stride())}): it takes [N, 3HC, T] with tokens contiguous, or "
                    f"the channels_last_1d view of a channels_last map"]
        return []

    def layouts_accepted(self) -> str:
        return "qkv with its tokens or its channels contiguous (contiguous, channels_last_1d)"

    def auto_reasons(self, call: Call) -> list[str]:
        why = super().auto_reasons(call)
        if not why and call.tensors["qkv"].dtype == torch.float32:
            why = ["fp32 attention runs three TF32 products on small tiles here; auto "
                   "leaves it to SDPA"]
        return why

    def forward(self, *args):
        return self.kernels.forward(*args)

    def backward(self, *args):
        return self.kernels.backward(*args)


for _impl in (Sdpa(), Triton()):
    QKV_ATTENTION.register(_impl)


def qkv_attention(qkv: Tensor, num_heads: int, legacy: bool = True) -> Tensor:
    """Multi-head attention over T tokens.

    qkv: [N, 3·H·C, T], fp32/fp16/bf16 (fp64 on eager), in the legacy (heads,
    qkv) or the new (qkv, heads) channel order; tokens contiguous, or the
    channels_last_1d view of a channels_last map (channels contiguous).
    Returns [N, H·C, T] in qkv's dtype (triton and sdpa: in qkv's layout).
    Non-finite inputs: eager and sdpa give NaN or ±inf at the same outputs
    (tests/test_nonfinite_inputs.py; sdpa takes eager's arithmetic at T = 1,
    where torch's SDPA would return v for a NaN score).
    """
    return QKV_ATTENTION(qkv, num_heads, bool(legacy))
