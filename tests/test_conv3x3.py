"""conv3x3: Winograd F(2x2, 3x3) on the CPU against an fp64 convolution, within
4x oneDNN's own fp32 error on the same inputs (its error ran from 0.35x to 2.3x
oneDNN's over these shapes and seeds: a transform sums up to 9 products where a
direct convolution rounds each once); its dispatch; and its raw op's argument
checks."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from adm_fast import ops
from adm_fast.ops.conv3x3 import NATIVE, NATIVE_WEIGHT_GRAD

SHAPES = [  # N, C, H, W, O: ADM res-block convs, then odd sizes and channel counts;
    # the kernel takes maps whose V and M exceed 4 MiB by blocks of tiles (the
    # last two), smaller ones in three whole-map passes (the rest)
    (2, 64, 16, 16, 64), (1, 128, 8, 8, 64), (3, 32, 16, 16, 32), (2, 96, 7, 7, 32),
    (1, 5, 9, 6, 3), (2, 3, 1, 2, 4), (1, 16, 1, 1, 8), (2, 24, 5, 11, 40),
    (4, 32, 64, 64, 32), (3, 16, 65, 63, 24)]


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


GRAD_SHAPES = [  # ∇x: Winograd's from 8x8 on (8x9 too), oneDNN's below and on 8x8
    # past 256x256 channels (the 300 -> 240); ∇w by chunks of tiles, several in
    # the last two (one partial)
    (2, 64, 16, 16, 64), (2, 96, 7, 7, 32), (1, 5, 9, 6, 3), (2, 3, 1, 2, 4),
    (2, 64, 8, 8, 48), (1, 40, 8, 9, 24), (1, 300, 8, 8, 240),
    (3, 16, 65, 63, 24), (4, 32, 64, 64, 32), (2, 64, 50, 49, 64)]


@pytest.mark.parametrize("shape", GRAD_SHAPES)
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
def test_gradients_within_4x_onednn_error(shape, weight_layout):
    x, w, b = inputs(*shape, seed=sum(shape) + 1)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape[0], shape[4], *shape[2:4],
                     generator=torch.Generator().manual_seed(len(shape))) - 0.2
    leaves64 = [t.double().requires_grad_(True) for t in (x, w, b)]
    ref = torch.autograd.grad(F.conv2d(*leaves64, padding=1), leaves64, dy.double())
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    torch_grads = torch.autograd.grad(F.conv2d(*leaves, padding=1), leaves, dy)
    with ops.use_backend("cpu"):
        got = torch.autograd.grad(ops.conv3x3(*leaves), leaves, dy)
    for name, g, t, r in zip("xwb", got, torch_grads, ref):
        assert g.shape == r.shape and g.stride() == t.stride(), name
        assert rel_err(g, r) <= 4 * max(rel_err(t, r), 2 ** -23), (name, rel_err(g, r),
                                                                      rel_err(t, r))


def test_guidance_does_not_compute_the_weights_gradient(monkeypatch):
    # autograd.grad(y, x) with weights that require grad (a guiding classifier's):
    # the backward is asked for ∇x alone, as torch's own convolution would be.
    from adm_fast.ops.conv3x3 import CONV3X3
    asked = []
    real = CONV3X3.kernel_backward
    monkeypatch.setattr(CONV3X3, "kernel_backward",
                        lambda impl, args, kept, grads, needs: asked.append(needs)
                        or real(impl, args, kept, grads, needs))
    x, w, b = inputs(2, 8, 6, 6, 8, seed=23)
    w.requires_grad_(True)
    b.requires_grad_(True)
    x0 = x.clone().requires_grad_(True)
    with ops.use_backend("cpu"):
        y = ops.conv3x3(x0 * 1.5, w, b)
        dx, = torch.autograd.grad(y.square().sum(), x0)
        y = ops.conv3x3(x0 * 1.5, w, b)
        y.square().sum().backward()
    assert asked == [(True, False, False), (True, True, True)]
    assert w.grad is not None and b.grad is not None
    assert rel_err(dx, x0.grad) == 0
    with ops.use_backend("cpu"):  # a leaf named in autograd.grad's inputs is wanted
        torch.autograd.grad(ops.conv3x3(x0, w, b).sum(), [w])
    assert asked[-1] == (False, True, False)


def test_explain_says_why_not_cpu():
    x, w, b = inputs(1, 8, 4, 4, 8, seed=5)
    assert "cpu: supported" in ops.explain("conv3x3", x.requires_grad_(True), w, b)
    assert "channels_last" in ops.explain("conv3x3", x.detach().contiguous(), w, b)
    assert "fp64" in ops.explain("conv3x3", x.detach().double(), w.double(), b.double())


@pytest.mark.parametrize("layout", ["channels_last", "in_out_swapped", "flipped", "sliced"])
def test_weights_in_any_layout(layout):
    # use_preferred_layout makes a model's 4-D weights channels_last; ∇x passes
    # the turned kernel as it comes out of flip(transpose(w)). The kernel reads
    # the weight's strides: no copy, and no layout may change the result.
    x, w, b = inputs(2, 16, 6, 6, 8, seed=19)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    view = {"channels_last": lambda: w.contiguous(memory_format=torch.channels_last),
            "in_out_swapped": lambda: w.transpose(0, 1).contiguous().transpose(0, 1),
            "flipped": lambda: w.flip(2, 3).transpose(0, 1).contiguous().transpose(0, 1)
            .flip(2, 3),
            "sliced": lambda: torch.cat([w, w], 1)[:, 16:]}[layout]()
    assert torch.equal(view, w)
    with ops.use_backend("cpu"):
        y = ops.conv3x3(x, view, b)
    assert rel_err(y, ref) <= 4 * max(rel_err(F.conv2d(x, w, b, padding=1), ref), 2 ** -23)


def test_model_convs_go_through_the_op_under_auto_or_a_per_op_setting():
    """A model's 3x3 convs take the conv3x3 op under auto or a setting that
    names conv3x3; a backend chosen for every op leaves them to the module,
    unlike the other ops (adm_fast.models.fused.apply_conv says why: conv3x3
    has no triton, cuda or sdpa implementation, and such a setting names the
    fused ops)."""
    from torch import nn

    from adm_fast.models.fused import apply_conv, is_conv3x3
    from adm_fast.ops.conv3x3 import CONV3X3
    c3, strided = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
    assert is_conv3x3(c3) and not is_conv3x3(strided) and not is_conv3x3(nn.Conv2d(8, 8, 1))
    x = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    seen = []
    decide = CONV3X3.decide
    CONV3X3.decide = lambda args: seen.append(args) or decide(args)
    CONV3X3._decisions.clear()
    try:
        with torch.no_grad():
            for every_op in ("eager", "cpu"):
                with ops.use_backend(every_op):
                    assert torch.equal(apply_conv(c3, x), c3(x))
            assert not seen
            with ops.use_backend("auto"):
                assert rel_err(apply_conv(c3, x), c3(x)) <= 1e-6
                assert torch.equal(apply_conv(strided, x), strided(x))
            assert len(seen) == 1
            with ops.use_backend({"conv3x3": "eager"}):
                assert torch.equal(apply_conv(c3, x), c3(x))
            assert len(seen) == 2
    finally:
        del CONV3X3.decide
        CONV3X3._decisions.clear()


def test_empty_batch():
    x, w, b = inputs(0, 8, 4, 4, 6, seed=7)
    with ops.use_backend("auto"), torch.no_grad():
        assert ops.conv3x3(x, w, b).shape == (0, 6, 4, 4)


@pytest.mark.parametrize("bad, message", [
    (lambda x, w, b: (x.contiguous(), w, b), "channels_last"),
    (lambda x, w, b: (x.double(), w, b), "fp32"),
    (lambda x, w, b: (x, w[:, :4], b), r"\[O, C=8, 3, 3\]"),
    (lambda x, w, b: (x, w[..., :2], b), r"\[O, C=8, 3, 3\]"),
    (lambda x, w, b: (x, w, b[:3]), "bias"),
    (lambda x, w, b: (x, w, b.double()), "bias"),
    (lambda x, w, b: (x[0], w, b), r"\[N, C, H, W\]"),
])
def test_the_raw_op_checks_its_arguments(bad, message):
    x, w, b = inputs(2, 8, 5, 5, 8, seed=11)
    with pytest.raises(RuntimeError, match=message):
        NATIVE(*bad(x, w, b))


@pytest.mark.parametrize("bad, message", [
    (lambda x, dy: (x.contiguous(), dy), "channels_last"),
    (lambda x, dy: (x, dy.contiguous()), "channels_last"),
    (lambda x, dy: (x.double(), dy), "fp32"),
    (lambda x, dy: (x, dy[:1]), r"\[N, O, H, W\]"),
    (lambda x, dy: (x, dy[..., :3]), r"\[N, O, H, W\]"),
    (lambda x, dy: (x[0], dy), r"\[N, C, H, W\]"),
])
def test_the_raw_weight_gradient_checks_its_arguments(bad, message):
    x, _, _ = inputs(2, 8, 5, 5, 8, seed=17)
    dy, _, _ = inputs(2, 6, 5, 5, 8, seed=18)
    with pytest.raises(RuntimeError, match=message):
        NATIVE_WEIGHT_GRAD(*bad(x, dy))
    assert NATIVE_WEIGHT_GRAD(x[:0], dy[:0]).abs().sum() == 0  # no tiles: zero


def test_the_spec_checks_its_arguments():
    x, w, b = inputs(1, 8, 4, 4, 8, seed=13)
    with pytest.raises(ValueError, match="channels"):
        ops.conv3x3(x, w[:, :4], b)
    with pytest.raises(ValueError, match=r"\[O, C, 3, 3\]"):
        ops.conv3x3(x, w[..., :2], b)
    with pytest.raises(ValueError, match="bias"):
        ops.conv3x3(x, w, b[:2])


def test_the_public_torch_op_differentiates_through_the_kernels():
    # torch.ops.adm_fast.conv3x3 (what torch.compile traces) has the same
    # backward as the eager call path, and the same skipping of unwanted grads.
    x, w, b = inputs(2, 16, 20, 18, 8, seed=29)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    dy = torch.randn(2, 8, 20, 18, generator=torch.Generator().manual_seed(30))
    y = torch.ops.adm_fast.conv3x3(*leaves, "cpu")
    assert y.shape == (2, 8, 20, 18)  # a one-output kernel's tensor, not its first row
    assert rel_err(y, F.conv2d(x, w, b, padding=1)) <= 1e-6
    got = torch.autograd.grad(y, leaves, dy)
    ref = torch.autograd.grad(F.conv2d(*leaves, padding=1), leaves, dy)
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= 1e-5
    x0 = x.clone().requires_grad_(True)
    dx, = torch.autograd.grad(torch.ops.adm_fast.conv3x3(x0 * 2, leaves[1], leaves[2], "cpu"),
                              x0, dy)
    assert rel_err(dx, 2 * ref[0]) <= 1e-5


def test_the_benchmark_makes_the_transforms_anew_for_training(monkeypatch):
    # `bench ops conv3x3`: forward with the transform kept (sampling), forward +
    # backward with it made on every call (training), and the cache put back.
    import importlib
    bench = importlib.import_module("adm_fast.benchmarks.conv3x3")
    module = importlib.import_module("adm_fast.ops.conv3x3")
    kept = module.WEIGHTS
    seen = {"forward": set(), "fwd+bwd": set()}
    what = []
    real_get = type(kept).get
    monkeypatch.setattr(type(kept), "get",
                        lambda self, *a, **k: seen[what[-1]].add(self.budget) or
                        real_get(self, *a, **k))
    real_run, real_grad = bench.run, bench.run_grad
    monkeypatch.setattr(bench, "run", lambda *a: what.append("forward") or real_run(*a))
    monkeypatch.setattr(bench, "run_grad", lambda *a: what.append("fwd+bwd") or real_grad(*a))
    monkeypatch.setattr(bench, "median_ms", lambda fn, device: [fn(), 1.0][1])
    rows = bench.bench_case("tiny", 1, 8, 6, 8)
    assert [(r["what"], r["impl"]) for r in rows] == [
        (w, i) for w in ("forward", "fwd+bwd") for i in ("onednn", "winograd", "adm_fast")]
    assert all(float(r["rel_err"]) < 1e-5 for r in rows)
    assert seen["forward"] and 0 not in seen["forward"] and seen["fwd+bwd"] == {0}
    assert module.WEIGHTS is kept
