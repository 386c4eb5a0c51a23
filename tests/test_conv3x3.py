"""conv3x3: Winograd F(2x2, 3x3) on the CPU against an fp64 convolution, within
4x oneDNN's own fp32 error on the same inputs (its error ran from 0.35x to 2.3x
oneDNN's over these shapes and seeds: a transform sums up to 9 products where a
direct convolution rounds each once); its dispatch; and its raw op's argument
checks."""

import pytest
import torch
import torch.nn.functional as F

from adm_fast import ops
from adm_fast.ops.conv3x3 import NATIVE, winograd_weight
from conftest import rel_err

SHAPES = [  # N, C, H, W, O: ADM res-block convs, then odd sizes and channel counts
    (2, 64, 16, 16, 64), (1, 128, 8, 8, 64), (3, 32, 16, 16, 32), (2, 96, 7, 7, 32),
    (1, 5, 9, 6, 3), (2, 3, 1, 2, 4), (1, 16, 1, 1, 8), (2, 24, 5, 11, 40)]


def inputs(n, c, h, w, o, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g) + 0.4
    x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides
    wt = torch.randn(o, c, 3, 3, generator=g) / (9 * c) ** 0.5 + 0.01
    b = torch.randn(o, generator=g) + 0.3 if bias else None
    return x, wt, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_within_4x_onednn_error(shape, bias):
    x, w, b = inputs(*shape, seed=sum(shape), bias=bias)
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    with ops.use_backend("cpu"):
        y = ops.conv3x3(x, w, b)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch_err = rel_err(F.conv2d(x, w, b, padding=1), ref)
    assert rel_err(y, ref) <= 4 * max(torch_err, 2 ** -23), (rel_err(y, ref), torch_err)


def test_auto_gives_the_convolution_with_and_without_grad():
    x, w, b = inputs(2, 64, 8, 8, 32, seed=3)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    with ops.use_backend("auto"), torch.no_grad():
        assert rel_err(ops.conv3x3(x, w, b), ref) <= 1e-6
    xg = x.clone().requires_grad_(True)
    with ops.use_backend("auto"):
        y = ops.conv3x3(xg, w, b)
    dy = torch.randn_like(y)
    dx, = torch.autograd.grad(y, xg, dy)
    x64 = x.double().requires_grad_(True)
    dx_ref, = torch.autograd.grad(F.conv2d(x64, w.double(), b.double(), padding=1), x64,
                                  dy.double())
    assert rel_err(dx, dx_ref) <= 1e-6


def test_explain_says_why_not_cpu():
    x, w, b = inputs(1, 8, 4, 4, 8, seed=5)
    assert "has no backward" in ops.explain("conv3x3", x.requires_grad_(True), w, b)
    assert "channels_last" in ops.explain("conv3x3", x.detach().contiguous(), w, b)
    assert "fp64" in ops.explain("conv3x3", x.detach().double(), w.double(), b.double())


def test_empty_batch():
    x, w, b = inputs(0, 8, 4, 4, 6, seed=7)
    with ops.use_backend("auto"), torch.no_grad():
        assert ops.conv3x3(x, w, b).shape == (0, 6, 4, 4)


@pytest.mark.parametrize("bad, message", [
    (lambda x, u, b: (x.contiguous(), u, b), "channels_last"),
    (lambda x, u, b: (x.double(), u, b), "fp32"),
    (lambda x, u, b: (x, u[:, :4], b), "transform"),
    (lambda x, u, b: (x, u.transpose(1, 2), b), "transform"),
    (lambda x, u, b: (x, u, b[:3]), "bias"),
    (lambda x, u, b: (x[0], u, b), r"\[N, C, H, W\]"),
])
def test_the_raw_op_checks_its_arguments(bad, message):
    x, w, b = inputs(2, 8, 5, 5, 8, seed=11)
    u = winograd_weight(w)
    with pytest.raises(RuntimeError, match=message):
        NATIVE(*bad(x, u, b))


def test_the_spec_checks_its_arguments():
    x, w, b = inputs(1, 8, 4, 4, 8, seed=13)
    with pytest.raises(ValueError, match="channels"):
        ops.conv3x3(x, w[:, :4], b)
    with pytest.raises(ValueError, match=r"\[O, C, 3, 3\]"):
        ops.conv3x3(x, w[..., :2], b)
    with pytest.raises(ValueError, match="bias"):
        ops.conv3x3(x, w, b[:2])
