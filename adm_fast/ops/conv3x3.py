"""conv3x3: a 3×3, stride-1, padding-1 convolution — ADM's res-block convs,
most of a UNet's arithmetic.

The eager reference is guided-diffusion's computation, F.conv2d (oneDNN on a
CPU, near the FMA peak). The cpu implementation is Winograd's F(2×2, 3×3)
(csrc/cpu/conv3x3_winograd.cpp): 16 products per 2×2 output tile and channel
pair instead of 36, between transforms that only add, by blocks of tiles kept
in cache, with its own AVX2+FMA product (csrc/cpu/conv3x3_gemm.cpp; a CPU
without them gets torch's convolution from the same op). It runs on fp32
channels_last maps, forward and backward: ∇x is the same convolution of ∇y
with the kernel turned by 180° (oneDNN's on the small maps where oneDNN is
faster: Cpu.backward_input), and the weights' gradient is Winograd's too —
per tile the transposed transforms, then 16 matrix products summed over the
tiles, by chunks kept in cache. The weights' transform, laid out in strips of
16 output channels for the products, is kept from call to call while the
weight holds the same bytes (winograd_weights.py: compared bit for bit, not
by version, which a write through `.data` leaves as it was): a sampling loop
makes it once. Guidance asks autograd for ∇x alone: the weights' gradient is
then skipped, as torch's own convolution skips it (Op: engine_needs).

Its rounding differs from a direct convolution's (the transforms sum up to 9
products where a direct convolution rounds each once); against an fp64
convolution its error stays within a small multiple of oneDNN's
(tests/test_conv3x3.py, verify_factor below). Non-finite inputs: the
transforms add and subtract the inputs of a tile (and the products of its 16
frequencies), so an output that eager's convolution gives as ±inf (an inf in
its window) may come out NaN here. Which outputs are finite is eager's: an
inf or NaN reaches exactly the outputs whose windows hold it, as in the
direct sum (tests/test_nonfinite_inputs.py). Giving eager's signs would take
a scan of every input for inf before each convolution, a pass over the map
that a sampling step does not otherwise make, to change one non-finite value
into another.

Auto times it against oneDNN per call signature, since which is faster
depends on the shape and the CPU (`adm-fast bench ops conv3x3`; the figures:
docs/performance.md, "Kernel decisions and their measurements").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .impl import Impl
from .op import Op
from .winograd_weights import CACHE as WEIGHTS

SIGNATURE = "Tensor x, Tensor weight, Tensor? bias"


def reference(x: Tensor, weight: Tensor, bias=None) -> Tensor:
    return F.conv2d(x, weight, bias, padding=1)


class Conv3x3(Op):
    name = "conv3x3"
    signature = SIGNATURE
    has_kernel_backward = True
    preferences = [{"device": "cpu", "order": ["eager", "cpu"]}]
    tune = {"cpu": ("eager", "cpu")}
    # Winograd's transforms sum up to 9 products where a direct convolution
    # rounds each once: its largest error against fp64, measured over ADM's
    # shapes, stays under 4x oneDNN's (docs/performance.md); the benchmark's
    # bound is 4x too.
    verify_factor = 4.0

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

    reference = staticmethod(reference)

    def features(self, x, weight, bias):
        return {"channels": x.shape[1], "out_channels": weight.shape[0]}

    def kernel_backward(self, impl, args, kept, grads, needs):
        x, weight, bias = args
        dy = grads[0].contiguous(memory_format=torch.channels_last)  # once, for both kernels
        dx = impl.backward_input(dy, x, weight) if needs[0] else None
        dw = impl.backward_weight(x, dy) if needs[1] else None
        db = dy.sum((0, 2, 3)) if needs[2] and bias is not None else None
        return dx, dw, db

    def fake(self, x, weight, bias):
        n, _, h, w = x.shape
        return (x.new_empty((n, weight.shape[0], h, w)).to(memory_format=torch.channels_last),)


CONV3X3 = Conv3x3()
NATIVE = native.define("conv3x3_winograd", SIGNATURE, 1,
                       lambda x, weight, bias: CONV3X3.fake(x, weight, bias)[0])
FROM_U = native.define(
    "conv3x3_winograd_u", "Tensor x, Tensor u, int out_channels, Tensor? bias", 1,
    lambda x, u, out_channels, bias: x.new_empty(
        (x.shape[0], out_channels, x.shape[2], x.shape[3])).to(memory_format=torch.channels_last))
NATIVE_WEIGHT_GRAD = native.define(
    "conv3x3_winograd_weight_grad", "Tensor x, Tensor dy", 1,
    lambda x, dy: x.new_empty((dy.shape[1], x.shape[1], 3, 3)).to(
        memory_format=torch.channels_last))


_RUNS: list = []


def _winograd_runs() -> bool:
    # Asked only by the cpu impl, i.e. once the extension is loaded: fixed from then on.
    if not _RUNS:
        from .backends import CPU
        _RUNS.append(CPU.ext is not None and CPU.ext.has_avx2_fma())
    return _RUNS[0]


class Cpu(Impl):
    backend = "cpu"
    dtypes = (torch.float32,)
    layouts = {"x": ("channels_last",)}  # the weight is read through its transform

    def native_ops(self):
        from .winograd_weights import TRANSFORM
        return NATIVE, FROM_U, NATIVE_WEIGHT_GRAD, TRANSFORM

    def forward(self, x, weight, bias):
        if not _winograd_runs():  # the composite op falls back to torch's convolution
            return NATIVE(x, weight, bias)
        return FROM_U(x, WEIGHTS.get(weight), weight.shape[0], bias)

    def backward_input(self, dy, x, weight):
        # ∇x of a 3x3, stride-1, pad-1 convolution is the same convolution of
        # ∇y with the kernel turned by 180° and its in/out channels swapped (its
        # transform reads the weight in place, and is kept while the weight
        # holds still: guidance). oneDNN's ∇x is faster on maps below 8x8 and
        # on 8x8 ones past 256x256 channels, where the transform's U outgrows
        # the cache (docs/performance.md). By shape alone, so that ∇x is the
        # same bytes whatever is kept, and whether or not the weights' gradient
        # is asked for too.
        hw, co = dy.shape[2] * dy.shape[3], weight.shape[0] * weight.shape[1]
        if not _winograd_runs() or hw < 64 or (hw < 256 and co > 256 * 256):
            return torch.ops.aten.convolution_backward(
                dy, x, weight.detach(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        return FROM_U(dy, WEIGHTS.get(weight, turned=True), weight.shape[1], None)

    def backward_weight(self, x, dy):
        # channels_last, as oneDNN's is for a channels_last x, whatever the weight's
        return NATIVE_WEIGHT_GRAD(x, dy)


CONV3X3.register(Cpu())


def conv3x3(x: Tensor, weight: Tensor, bias=None) -> Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a [O, C, 3, 3] weight. On the
    cpu backend (Winograd) an output eager gives as ±inf may be NaN (module
    docstring); which outputs are finite is eager's."""
    return CONV3X3(x, weight, bias)
