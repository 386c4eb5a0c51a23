"""conv3x3: a 3×3, stride-1, padding-1 convolution — ADM's res-block, input
and upsampling convs, most of a UNet's arithmetic.

The eager reference is guided-diffusion's computation, F.conv2d (oneDNN on a
CPU, near the FMA peak here). The cpu implementation is Winograd's
F(2×2, 3×3) (csrc/cpu/winograd.cpp): 16 products per 2×2 output tile and
channel pair instead of 36, as one batched matrix product between transforms
that only add. Its rounding differs from a direct convolution's: against an
fp64 convolution its max error ran from 0.35× to 2.3× oneDNN's, 1–5e-7 of the
output's scale (tests/test_conv3x3.py). It runs on fp32 channels_last maps,
forward only (training keeps oneDNN, whose backward it
would need anyway); auto times it against oneDNN per call signature, since
which wins depends on the channel count (its product is short along C: at 32
channels it loses) and on the CPU.

The weights' transform U = G·w·Gᵀ ([16, C, O]) is computed in fp64 and
rounded once, on every call. It is not cached: a weight changed through
`.data` keeps its version, so a cache keyed on it could serve stale values
without a word. Computed in Python it costs more than the Winograd product
saves at most ADM shapes (auto's timing includes it, and picks oneDNN there):
the models do not call this op yet. What it needs to pay: the transform in
C++, and the three stages blocked so V and M stay in cache (unblocked, V and M
are 4x the map each; at 64 px x 64 channels that traffic loses to oneDNN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .impl import Call, Impl, layout_of
from .op import Op

SIGNATURE = "Tensor x, Tensor weight, Tensor? bias"

# F(2, 3)'s weight transform; the input and output transforms (0, ±1) are in C++.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def reference(x: Tensor, weight: Tensor, bias=None) -> Tensor:
    return F.conv2d(x, weight, bias, padding=1)


def winograd_weight(weight: Tensor) -> Tensor:
    """[O, C, 3, 3] -> U[(a, b), c, o] = Σ_ij G[a][i]·w[o, c, i, j]·G[b][j], fp32."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,ocij,bj->abco", g, weight.detach().double(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).float().contiguous()


class Conv3x3(Op):
    name = "conv3x3"
    signature = SIGNATURE
    preferences = [{"device": "cpu", "order": ["eager", "cpu"]}]
    tune = {"cpu": ("eager", "cpu")}

    def check(self, x, weight, bias) -> None:
        op = self.name
        if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
            raise TypeError(f"{op}: x and weight must be tensors")
        if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
            raise ValueError(f"{op}: x must be [N, C, H, W] and weight [O, C, 3, 3], got "
                             f"{tuple(x.shape)} and {tuple(weight.shape)}")
        if weight.shape[1] != x.shape[1]:
            raise ValueError(f"{op}: weight takes {weight.shape[1]} channels, x has "
                             f"{x.shape[1]}")
        if bias is not None and (not isinstance(bias, Tensor)
                                 or tuple(bias.shape) != (weight.shape[0],)):
            raise ValueError(f"{op}: bias must be [{weight.shape[0]}], got "
                             f"{getattr(bias, 'shape', type(bias))}")

    def reference(self, *args):
        return reference(*args)

    def features(self, x, weight, bias):
        return {"channels": x.shape[1], "out_channels": weight.shape[0]}

    def fake(self, x, weight, bias):
        n, _, h, w = x.shape
        return (x.new_empty((n, weight.shape[0], h, w)).to(memory_format=torch.channels_last),)


CONV3X3 = Conv3x3()
NATIVE = native.define("conv3x3_winograd", "Tensor x, Tensor u, Tensor? bias", 1,
                       lambda x, u, bias: CONV3X3.fake(
                           x, x.new_empty((u.shape[2], u.shape[1], 3, 3)), bias)[0])


class Eager(Impl):
    backend, kind = "eager", "composite"
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def run(self, *args):
        return reference(*args)


class Cpu(Impl):
    backend = "cpu"
    dtypes = (torch.float32,)
    differentiable = False

    def extra_reasons(self, call: Call):
        # Not `layouts`: a 1x1 map is both layouts, and layout_of names it contiguous.
        why = []
        if not call.tensors["x"].is_contiguous(memory_format=torch.channels_last):
            why.append(f"x is not channels_last (it is {layout_of(call.tensors['x'])})")
        if not call.tensors["weight"].is_contiguous():
            why.append("weight is not contiguous")
        return why

    def forward(self, x, weight, bias):
        return NATIVE(x, winograd_weight(weight), bias)


for _impl in (Eager(), Cpu()):
    CONV3X3.register(_impl)


def conv3x3(x: Tensor, weight: Tensor, bias=None) -> Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a [O, C, 3, 3] weight."""
    return CONV3X3(x, weight, bias)
